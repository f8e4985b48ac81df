"""Classify new slides with a trained experiment: the ensemble of its fold models.

For each slide (--slide, or every row of --sheet) the whole chain runs in this process:
thumbnail, tissue mask, [lesion mask with --segmentation-checkpoint], 20x/10x/5x patch
coordinates, features with the experiment's encoder, and every fold's model. The slide's class
probabilities are the mean over the fold models; each fold's vote (its most probable class) is
listed too. Outputs in --out: predictions.json and predictions.csv (slide_id, label, predicted,
prob_<class>, votes_<class>, fold<k>); with --heatmaps also heatmaps/<slide>/ (attention averaged
over the folds; see `msamil heatmap --help` for the files).

Per-slide outputs go to the workflow's places under --results (slides/<slide>/, coords/<scale>/)
and the bag to --features; those that exist already are reused, so slides the workflow has
processed cost one model pass. Preprocessing options must be the ones the experiment was trained
with (the workflow passes the config's); the encoder is checked against the checkpoint's
(name plus weight hash) and a mismatch fails naming both. A slide that fails stops the run with
one line naming the slide and the checkpoint, and leaves no file of that slide and no predictions.

Examples:
  msamil predict --models results/models/msamil_multiscale --slide new.svs --out predictions/ \\
      --encoder resnet18 --input-size 64 --patch-size 256 --heatmaps
  msamil predict --models results/models/msamil_multiscale --sheet new_slides.csv --out predictions/ ...
"""

from __future__ import annotations

import argparse

HELP = "new slides + trained experiment -> ensemble predictions (JSON, CSV) [+ heatmaps]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .extract import add_encoder_arguments, add_runtime_arguments
    from .tissue import add_tissue_arguments

    io = parser.add_argument_group("input and output")
    io.add_argument("--models", required=True, help="experiment folder holding fold<k>/checkpoint.pt")
    io.add_argument("--fold", type=int, nargs="+", help="use only these folds (default: every fold found)")
    which = io.add_mutually_exclusive_group(required=True)
    which.add_argument("--slide", help="one slide file (anything OpenSlide opens)")
    which.add_argument("--sheet", help="CSV/TSV of slides: slide_id, path [, label, patient_id, mpp, annotation]")
    io.add_argument("--slide-id", help="with --slide: its id (default: the file's stem)")
    io.add_argument("--mpp", type=float, help="with --slide: level-0 µm/px, overriding the file's")
    io.add_argument("--out", required=True, help="folder for predictions.json, predictions.csv [and heatmaps/]")
    io.add_argument("--results", default="results",
                    help="results folder whose slides/ and coords/ are reused and filled (default: results)")
    io.add_argument("--features", help="feature folder of the bags (default: <results>/features/<encoder id>)")
    io.add_argument("--heatmaps", action="store_true", help="also write attention heatmaps of every slide")
    io.add_argument("--top-k", type=int, default=8, help="with --heatmaps: patches per row of the montage (default 8)")

    pre = parser.add_argument_group("preprocessing (use the experiment's settings)")
    pre.add_argument("--long-side", type=int, default=1024, help="thumbnail long side in px (default 1024)")
    pre.add_argument("--patch-size", type=int, default=512, help="patch size in px at each magnification (default 512)")
    pre.add_argument("--min-fraction", type=float, default=0.7,
                     help="minimum selection-mask fraction of a kept patch (default 0.7)")
    pre.add_argument("--base-mpp", type=float, default=0.5, help="µm/px that defines 20x (default 0.5)")
    pre.add_argument("--segmentation-checkpoint",
                     help="UNet++ checkpoint (`msamil segment-train`): select patches on lesion ∩ tissue")
    add_tissue_arguments(pre)
    add_encoder_arguments(parser)
    add_runtime_arguments(parser)


def run(args: argparse.Namespace) -> None:
    import logging
    from pathlib import Path

    import pandas as pd

    from ..encoders import encoder_id
    from ..errors import MsamilError
    from ..inference import (Preprocess, SlideFiles, check_encoder, fold_probabilities, load_fold_models,
                             prediction_record, prepare_slide, read_new_slides, slide_attention, write_predictions)
    from ..train import resolve_device
    from .extract import check_runtime, encoder_spec
    from .tissue import tissue_params

    log = logging.getLogger("msamil.predict")
    check_runtime(args)
    if args.sheet:
        sheet = read_new_slides(args.sheet)
    else:
        if not Path(args.slide).exists():
            raise MsamilError(f"slide {args.slide_id or Path(args.slide).stem!r}: file not found: {args.slide}")
        sid = args.slide_id or Path(args.slide).stem
        sheet = pd.DataFrame([{"slide_id": sid, "path": str(Path(args.slide).resolve()), "label": "",
                               "mpp": args.mpp}]).set_index("slide_id", drop=False)
    device = resolve_device(args.device)
    folds = load_fold_models(args.models, device, args.fold)
    spec = encoder_spec(args)
    expected = folds[0].checkpoint.get("encoder", "")
    given = encoder_id(spec)
    check_encoder(expected, given, str(folds[0].path), "the encoder given")
    settings = Preprocess(
        encoder=spec, long_side=args.long_side, tissue=tissue_params(args), min_tissue_fraction=args.min_tissue_fraction,
        patch_size=args.patch_size, min_fraction=args.min_fraction, base_mpp=args.base_mpp,
        segmentation_checkpoint=args.segmentation_checkpoint, batch_size=args.batch_size, workers=args.workers,
        device=args.device, fp16=args.fp16, progress=not args.no_progress,
    )
    feature_dir = Path(args.features) if args.features else Path(args.results) / "features" / given
    out = Path(args.out)
    records, heatmap_jobs = [], []
    checkpoints = ", ".join(str(f.path) for f in folds)
    for sid, row in sheet.iterrows():
        mpp = row.get("mpp")
        mpp = None if mpp is None or pd.isna(mpp) else float(mpp)
        files = SlideFiles.under(args.results, feature_dir, sid)
        try:
            bag_path = prepare_slide(row["path"], sid, mpp, settings, files, expected or given)
            if args.heatmaps:
                att, per_fold = slide_attention(folds, bag_path, sid, device)
                heatmap_jobs.append((att, row, files, mpp))
            else:
                per_fold = fold_probabilities(folds, bag_path, sid, device)
        except MsamilError as exc:
            raise MsamilError(f"slide {sid!r} with {checkpoints}: {exc}") from None
        records.append(prediction_record(sid, per_fold, folds, row.get("label", "")))
        log.info("%s: %s (%s)", sid, records[-1]["predicted"],
                 ", ".join(f"{c} {p:.3f}" for c, p in records[-1]["probabilities"].items()))
    for att, row, files, mpp in heatmap_jobs:
        from .heatmap import draw_slide

        try:
            draw_slide(att, row, files.meta, files.thumbnail, out / "heatmaps" / att.slide_id, mpp, args.top_k,
                       Path(args.models).name)
        except MsamilError as exc:
            raise MsamilError(f"slide {att.slide_id!r} with {checkpoints}: {exc}") from None
    write_predictions(out, records, folds, args.models)
