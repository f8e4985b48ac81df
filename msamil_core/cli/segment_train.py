"""Train the lesion segmentation network (UNet++) on annotated slides' thumbnails.

Uses the slides of the sheet with an `annotation` (QuPath GeoJSON, ASAP XML or a mask image,
level-0 coordinates) whose thumbnail.png, meta.json and tissue_mask.png exist in
--slides-dir/<slide_id>/ (or are given with --thumbnails). Targets are the lesion classes of the
annotation within the tissue mask.

Patients are split (seeded) into training, validation (picks the best epoch) and hold-out (never
used for training or selection); the hold-out IoU is logged and written to the metrics JSON. The
network sees each thumbnail with its long side at --input-size px, optionally as random
--crop-size crops; predictions are made at the same scale and upsampled to the thumbnail.

Nothing is downloaded: the encoder starts from random weights or from --encoder-weights (a local
torchvision/timm/smp state dict of that encoder). Training runs on msamil's one training engine:
a killed or preempted (SIGTERM) run resumes from resume.pt beside --out when run again.

Example:
  msamil segment-train --sheet slides.csv --slides-dir results/slides \\
      --out results/segmentation/checkpoint.pt --encoder resnet18 --input-size 256 --epochs 30
"""

from __future__ import annotations

import argparse

from .options import add_annotation_arguments, add_config_arguments, add_postprocess_arguments, class_rules

HELP = "annotated thumbnails -> UNet++ lesion segmentation checkpoint (+ metrics.json)"


MODEL_OPTIONS = {
    "encoder": "segmentation_models_pytorch encoder",
    "encoder_weights": "local encoder state dict (.pth, .bin, .safetensors); None = random init",
    "encoder_depth": "encoder stages, 1..5",
    "decoder_channels": "UNet++ decoder widths, one per stage",
}
TRAINING_OPTIONS = {
    "input_size": "long side (px) of the thumbnail as the network sees it (paper: 1024)",
    "crop_size": "train on random square crops of this many px; 0 = whole images",
    "epochs": "epochs",
    "batch_size": "thumbnails per batch",
    "lr": "peak AdamW learning rate",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_epochs": "linear warm-up",
    "weight_decay": "AdamW weight decay",
    "bce_weight": "weight of BCE in the loss",
    "dice_weight": "weight of soft Dice in the loss",
    "holdout_fraction": "annotated patients held out for the final IoU",
    "val_fraction": "annotated patients that pick the best epoch",
    "grad_clip": "max gradient norm; 0 = off",
    "grad_accum": "batches per optimizer step",
    "patience": "stop after this many epochs without a better validation IoU; 0 = never",
    "hue": "max hue shift, fraction of the colour circle",
    "saturation": "max relative saturation change",
    "brightness": "max relative brightness change",
    "contrast": "max relative contrast change",
    "seed": "seed of the split, the initialisation and the augmentation",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..segmentation.training import SegmentationConfig

    io = parser.add_argument_group("input and output")
    io.add_argument("--sheet", required=True, help="slide sheet (CSV/TSV) with slide_id, patient_id and annotation columns")
    src = io.add_mutually_exclusive_group(required=True)
    src.add_argument("--slides-dir", help="folder holding <slide_id>/thumbnail.png, meta.json and tissue_mask.png")
    src.add_argument("--thumbnails", nargs="+", metavar="PNG",
                     help="thumbnail PNGs, each in its slide's folder (named by slide_id) beside meta.json and tissue_mask.png")
    io.add_argument("--out", required=True, help="checkpoint to write (.pt)")
    io.add_argument("--metrics", help="metrics JSON to write (default: metrics.json beside --out)")
    io.add_argument("--probabilities-dir", metavar="DIR",
                    help="also write each given slide's lesion probabilities under the saved checkpoint to "
                    "DIR/<slide_id>.npz, for `msamil segment --reuse DIR` (which then need not load the network)")
    add_config_arguments(parser.add_argument_group("model"), SegmentationConfig, MODEL_OPTIONS)
    t = parser.add_argument_group("training")
    add_config_arguments(t, SegmentationConfig, TRAINING_OPTIONS)
    t.add_argument("--no-augment", dest="augment", action="store_false", help="no flips, rotations or colour jitter")
    t.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N] (default %(default)s)")
    t.add_argument("--threads", type=int, default=0, help="CPU threads for torch; 0 = torch's default")
    add_postprocess_arguments(parser, from_checkpoint=False)
    add_annotation_arguments(parser)


def run(args: argparse.Namespace) -> None:
    from dataclasses import fields

    from ..runtime import set_threads
    from ..segmentation.postprocess import PostProcess
    from ..segmentation.training import SegmentationConfig, train_from_sheet

    set_threads(args.threads)
    # every training option's dest is the SegmentationConfig field of the same name
    cfg = SegmentationConfig(**{f.name: getattr(args, f.name) for f in fields(SegmentationConfig)})
    post = PostProcess(args.threshold, args.min_object_fraction, args.max_hole_fraction)
    train_from_sheet(args.sheet, args.out, cfg, post, class_rules(args), args.mask_labels, args.tolerance,
                     slides_dir=args.slides_dir, thumbnails=args.thumbnails, metrics_path=args.metrics,
                     probabilities_dir=args.probabilities_dir, device=args.device)
