"""Classify new slides with a trained experiment: the ensemble of its fold models.

For each slide (--slide, or every row of --sheet) the whole chain runs in this process:
thumbnail, tissue mask, [lesion mask with --segmentation-checkpoint], 20x/10x/5x patch
coordinates, features with the experiment's encoder, and every fold's model. The slide's class
probabilities are the mean over the fold models; each fold's vote (its most probable class) is
listed too. Outputs in --out: predictions.json and predictions.csv (slide_id, label, predicted,
prob_<class>, votes_<class>, fold<k>); with --heatmaps also heatmaps/<slide>/ (attention averaged
over the folds; see `msamil heatmap --help` for the files).

Per-slide files are reused when they were made from the same slide file (meta.json records the
file's identity, coordinates and bags its digest): from --out, or read-only from the workflow's
--results (slides/<slide>/, coords/<scale>/) and --features, so slides the workflow has processed
cost one model pass; a different file under a cohort slide's id gets its own files. Whatever is
missing is computed into --out (slides/, coords/, features/): predict never writes into the
cohort's folders. Preprocessing options must be the ones the experiment was trained with (the
workflow passes the config's); the encoder is checked against the checkpoint's (name plus weight
hash) and a mismatch fails naming both. A slide that fails stops the run with one line naming
the slide and the checkpoint, and leaves no file of that slide and no predictions.

Examples:
  msamil predict --models results/models/msamil_multiscale --slide new.svs --out predictions/ \\
      --encoder resnet18 --input-size 64 --patch-size 256 --heatmaps
  msamil predict --models results/models/msamil_multiscale --sheet new_slides.csv --out predictions/ ...
"""


from __future__ import annotations

import argparse

from .options import (add_encoder_arguments, add_extract_arguments, add_patch_arguments, add_tissue_arguments,
                      encoder_spec, extract_options, patch_settings, tissue_params)

HELP = "new slides + trained experiment -> ensemble predictions (JSON, CSV) [+ heatmaps]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("input and output")
    io.add_argument("--models", required=True, help="experiment folder holding fold<k>/checkpoint.pt")
    io.add_argument("--fold", type=int, nargs="+", help="use only these folds (default: every fold found)")
    which = io.add_mutually_exclusive_group(required=True)
    which.add_argument("--slide", help="one slide file (anything OpenSlide opens)")
    which.add_argument("--sheet", help="CSV/TSV of slides: slide_id, path [, label, patient_id, mpp, annotation]")
    io.add_argument("--slide-id", help="with --slide: its id (default: the file's stem)")
    io.add_argument("--mpp", type=float, help="with --slide: level-0 µm/px, overriding the file's")
    io.add_argument("--out", required=True,
                    help="folder for predictions.json, predictions.csv [and heatmaps/], and the per-slide files made")
    io.add_argument("--results", help="the workflow's results folder: its slides/ and coords/ are reused (read only)")
    io.add_argument("--features", help="folder of existing bags to reuse (read only), e.g. the experiment's features")
    io.add_argument("--heatmaps", action="store_true", help="also write attention heatmaps of every slide")
    io.add_argument("--top-k", type=int, default=8, help="with --heatmaps: patches per row of the montage (default 8)")

    pre = parser.add_argument_group("preprocessing (use the experiment's settings)")
    pre.add_argument("--long-side", type=int, default=1024, help="thumbnail long side in px (default 1024)")
    add_patch_arguments(pre)
    pre.add_argument("--strategy", choices=["lesion", "tissue", "random"],
                     help="patch selection (default: lesion with --segmentation-checkpoint, else tissue)")
    pre.add_argument("--segmentation-checkpoint",
                     help="UNet++ checkpoint (`msamil segment-train`): select patches on lesion ∩ tissue")
    add_tissue_arguments(pre)
    add_encoder_arguments(parser)
    add_extract_arguments(parser)


def run(args: argparse.Namespace) -> None:
    from ..pipeline import SlideSettings
    from ..prediction import predict_slides, read_new_slides, single_slide
    from ..runtime import resolve_device

    sheet = read_new_slides(args.sheet) if args.sheet else single_slide(args.slide, args.slide_id, args.mpp)
    settings = SlideSettings(
        encoder=encoder_spec(args), long_side=args.long_side, tissue=tissue_params(args),
        min_tissue_fraction=args.min_tissue_fraction, patches=patch_settings(args),
        strategy=args.strategy or ("lesion" if args.segmentation_checkpoint else "tissue"),
        segmentation_checkpoint=args.segmentation_checkpoint, extract=extract_options(args))
    predict_slides(args.models, sheet, args.out, settings, resolve_device(args.device), results=args.results,
                   features=args.features, folds=args.fold, heatmaps=args.heatmaps, top_k=args.top_k)
