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

from .options import add_annotation_arguments, add_postprocess_arguments, class_rules

HELP = "annotated thumbnails -> UNet++ lesion segmentation checkpoint (+ metrics.json)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..segmentation.training import SegmentationConfig

    d = SegmentationConfig()
    io = parser.add_argument_group("input and output")
    io.add_argument(
        "--sheet", required=True, help="slide sheet (CSV/TSV) with slide_id, patient_id and annotation columns"
    )
    src = io.add_mutually_exclusive_group(required=True)
    src.add_argument("--slides-dir", help="folder holding <slide_id>/thumbnail.png, meta.json and tissue_mask.png")
    src.add_argument(
        "--thumbnails",
        nargs="+",
        metavar="PNG",
        help="thumbnail PNGs, each in its slide's folder (named by slide_id) beside meta.json and tissue_mask.png",
    )
    io.add_argument("--out", required=True, help="checkpoint to write (.pt)")
    io.add_argument("--metrics", help="metrics JSON to write (default: metrics.json beside --out)")
    io.add_argument(
        "--probabilities-dir",
        metavar="DIR",
        help="also write each given slide's lesion probabilities under the saved checkpoint to DIR/<slide_id>.npz, "
        "for `msamil segment --reuse DIR` (which then need not load the network)",
    )

    m = parser.add_argument_group("model")
    m.add_argument("--encoder", default=d.encoder, help="segmentation_models_pytorch encoder (default %(default)s)")
    m.add_argument(
        "--encoder-weights",
        metavar="PATH",
        help="local encoder state dict (.pth, .bin, .safetensors); default: random init",
    )
    m.add_argument(
        "--encoder-depth", type=int, default=d.encoder_depth, help="encoder stages, 1..5 (default %(default)s)"
    )
    m.add_argument(
        "--decoder-channels",
        type=int,
        nargs="+",
        metavar="C",
        default=d.decoder_channels,
        help="UNet++ decoder widths, one per stage (default %(default)s)",
    )

    t = parser.add_argument_group("training")
    t.add_argument(
        "--input-size",
        type=int,
        default=d.input_size,
        help="long side (px) of the thumbnail as the network sees it (default %(default)s; paper: 1024)",
    )
    t.add_argument(
        "--crop-size",
        type=int,
        default=d.crop_size,
        help="train on random square crops of this many px; 0 = whole images (default %(default)s)",
    )
    t.add_argument("--epochs", type=int, default=d.epochs, help="default %(default)s")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="default %(default)s")
    t.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate (default %(default)s)")
    t.add_argument(
        "--min-lr",
        type=float,
        default=d.min_lr,
        help="learning rate at the end of the cosine decay (default %(default)s)",
    )
    t.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warm-up (default %(default)s)")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay, help="default %(default)s")
    t.add_argument(
        "--bce-weight", type=float, default=d.bce_weight, help="weight of BCE in the loss (default %(default)s)"
    )
    t.add_argument(
        "--dice-weight", type=float, default=d.dice_weight, help="weight of soft Dice in the loss (default %(default)s)"
    )
    t.add_argument(
        "--holdout-fraction",
        type=float,
        default=d.holdout_fraction,
        help="annotated patients held out for the final IoU (default %(default)s)",
    )
    t.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        help="annotated patients that pick the best epoch (default %(default)s)",
    )
    t.add_argument(
        "--grad-clip", type=float, default=d.grad_clip, help="max gradient norm; 0 = off (default %(default)s)"
    )
    t.add_argument("--grad-accum", type=int, default=d.grad_accum, help="batches per optimizer step (default %(default)s)")
    t.add_argument("--patience", type=int, default=d.patience,
                   help="stop after this many epochs without a better validation IoU; 0 = never (default %(default)s)")
    t.add_argument("--no-augment", dest="augment", action="store_false", help="no flips, rotations or colour jitter")
    t.add_argument(
        "--hue", type=float, default=d.hue, help="max hue shift, fraction of the colour circle (default %(default)s)"
    )
    t.add_argument(
        "--saturation", type=float, default=d.saturation, help="max relative saturation change (default %(default)s)"
    )
    t.add_argument(
        "--brightness", type=float, default=d.brightness, help="max relative brightness change (default %(default)s)"
    )
    t.add_argument(
        "--contrast", type=float, default=d.contrast, help="max relative contrast change (default %(default)s)"
    )
    t.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of the split, the initialisation and the augmentation (default %(default)s)",
    )
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
