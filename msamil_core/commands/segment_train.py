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
torchvision/timm/smp state dict of that encoder).

Example:
  msamil segment-train --sheet slides.csv --slides-dir results/slides \\
      --out results/segmentation/checkpoint.pt --encoder resnet18 --input-size 256 --epochs 30
"""

from __future__ import annotations

import argparse

HELP = "annotated thumbnails -> UNet++ lesion segmentation checkpoint (+ metrics.json)"


def add_annotation_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that turn annotation files into lesion masks (classes, mask labels, bounds)."""
    from ..annotations import DEFAULT_IGNORE_CLASSES, DEFAULT_SUBTRACT_CLASSES, DEFAULT_TOLERANCE

    g = parser.add_argument_group("annotations")
    g.add_argument(
        "--lesion-classes",
        nargs="+",
        metavar="PATTERN",
        help="annotation classes that are lesion (shell patterns, case-insensitive, e.g. Tumor 'Carcinoma*'); "
        "default: every class not ignored or subtracted",
    )
    g.add_argument(
        "--ignore-classes",
        nargs="*",
        metavar="PATTERN",
        default=list(DEFAULT_IGNORE_CLASSES),
        help="classes that are not lesion when --lesion-classes is not given (default: %(default)s); "
        "give the option with no pattern to ignore none",
    )
    g.add_argument(
        "--subtract-classes",
        nargs="*",
        metavar="PATTERN",
        default=list(DEFAULT_SUBTRACT_CLASSES),
        help="classes cut out of the lesion, e.g. exclusion regions and CAMELYON16's ASAP group _2 "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--mask-labels",
        nargs="+",
        type=int,
        metavar="VALUE",
        help="label values that are lesion in a label-image annotation (default: any nonzero pixel)",
    )
    g.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="how far vertices may lie outside the slide, as a fraction of its width/height (default %(default)s)",
    )


def class_rules(args: argparse.Namespace):
    from ..annotations import ClassRules

    return ClassRules(lesion=args.lesion_classes, ignore=args.ignore_classes, subtract=args.subtract_classes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..segmentation import SegmentationConfig
    from .segment import add_postprocess_arguments

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
    import logging
    from dataclasses import fields
    from pathlib import Path

    import torch

    from ..errors import MsamilError
    from ..fileio import save_torch, write_json
    from ..segmentation import PostProcess, SegmentationConfig, load_sample, train_segmentation
    from ..sheet import load_sheet

    log = logging.getLogger("msamil.segment_train")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    # Every training option's dest is the SegmentationConfig field of the same name.
    cfg = SegmentationConfig(**{f.name: getattr(args, f.name) for f in fields(SegmentationConfig)})
    post = PostProcess(args.threshold, args.min_object_fraction, args.max_hole_fraction)
    sheet = load_sheet(args.sheet)
    if "annotation" not in sheet.columns:
        raise MsamilError(
            f"slide sheet {args.sheet}: no `annotation` column; segmentation training needs annotated slides"
        )
    annotated = sheet[sheet["annotation"] != ""]
    if args.thumbnails:
        thumbs = {Path(p).parent.name: Path(p) for p in args.thumbnails}
        unknown = sorted(set(thumbs) - set(sheet.index))
        if unknown:
            raise MsamilError(
                f"thumbnails of slides not in the sheet {args.sheet}: {', '.join(unknown[:5])}; each thumbnail must "
                "sit in a folder named by its slide_id"
            )
        annotated = annotated[annotated.index.isin(list(thumbs))]
    else:
        thumbs = {sid: Path(args.slides_dir) / sid / "thumbnail.png" for sid in annotated.index}
    if annotated.empty:
        raise MsamilError(
            f"slide sheet {args.sheet}: no slide with an `annotation` among those given; annotate some slides first"
        )
    rules = class_rules(args)
    samples = []
    for sid, row in annotated.iterrows():
        samples.append(
            load_sample(sid, row["patient_id"], thumbs[sid], row["annotation"], rules, args.mask_labels, args.tolerance)
        )
        log.info("%s: lesion %.1f %% of the thumbnail", sid, 100.0 * samples[-1].lesion.mean())
    checkpoint, metrics = train_segmentation(samples, cfg, post, device=args.device)
    metrics_path = Path(args.metrics) if args.metrics else Path(args.out).with_name("metrics.json")
    # Metrics first: the checkpoint is the rule's main output and marks the step complete.
    write_json(metrics_path, metrics)
    save_torch(args.out, checkpoint)
    if args.probabilities_dir:
        from ..fileio import file_sha256
        from ..lesionmask import save_probabilities
        from ..segmentation import load_segmentation_checkpoint, thumbnail_probabilities
        from ..train import resolve_device

        # the saved checkpoint rebuilt as `msamil segment` rebuilds it, on the same pixels
        device = resolve_device(args.device)
        model, ckpt = load_segmentation_checkpoint(args.out, device)
        digest = file_sha256(args.out)
        for sample in samples:
            prob = thumbnail_probabilities(model, ckpt, sample.rgb, device)
            save_probabilities(args.probabilities_dir, sample.slide_id, prob, digest, thumbs[sample.slide_id],
                               ckpt.get("postprocess", {}))
        log.info("wrote the lesion probabilities of %d slides to %s", len(samples), args.probabilities_dir)
    held = metrics["holdout"]["iou"]
    log.info(
        "wrote %s (best epoch %d, val IoU %s, hold-out IoU %s, %.0f s)",
        args.out,
        metrics["best_epoch"],
        "n/a" if metrics["val"].get("iou") is None else f"{metrics['val']['iou']:.4f}",
        "n/a" if held is None else f"{held:.4f}",
        metrics["train_seconds"],
    )
