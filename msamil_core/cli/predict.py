"""Classify new slides with a trained experiment: the ensemble of its fold models.

For each slide (--slide, or every row of --sheet) the whole chain runs in this process:
thumbnail, tissue mask, [lesion mask with --segmentation-checkpoint], 20x/10x/5x patch
coordinates, features with the experiment's encoder, and every fold's model. The slide's class
probabilities are the mean over the fold models; each fold's vote (its most probable class) is
listed too. Outputs in --out: predictions.json and predictions.csv (slide_id, label, predicted,
prob_<class>, votes_<class>, fold<k>, patches, note); with --heatmaps also heatmaps/<slide>/ (attention averaged
over the folds; see `msamil heatmap --help` for the files).

Everything the models' inputs depend on (thumbnail, tissue and patch settings, the lesion model,
the encoder with its input size and normalisation, the stored precision) comes from the
experiment's manifest (<models>/manifest.json, written by the workflow): the models are given
exactly the inputs they were trained on. An option below that contradicts the manifest stops the
run, naming both values; one that agrees is only checked. An experiment folder without a manifest
(trained with `msamil train` by hand) is run with the options given, unchecked, with a warning.

Per-slide files are reused when they were made from the same slide file (meta.json records the
file's identity, coordinates and bags its digest) with the same settings: from --out, or
read-only from the workflow's --results (slides/<slide>/, coords/) and --features, so slides the
workflow has processed cost one model pass; a different file under a cohort slide's id gets its
own files. Whatever is missing is computed into --out (slides/, coords/, features/): predict never
writes into the cohort's folders.

No slide is lost to another: a slide that fails (unreadable, no patch passing the mask, ...) gets
a row whose `note` says why, leaves no file of its own, and the others are classified; a bag of
fewer than --min-patches patches is classified and flagged in its `note` and the log. The command
fails (status 1, after writing the tables) only when no slide at all could be classified.

Examples:
  msamil predict --models results/models/msamil_multiscale --slide new.svs --out predictions/ --heatmaps
  msamil predict --models results/models/msamil_multiscale --sheet new_slides.csv --out predictions/
"""


from __future__ import annotations

import argparse

from .options import add_encoder_arguments, add_settings, from_args, given

HELP = "new slides + trained experiment -> ensemble predictions (JSON, CSV) [+ heatmaps]"
FROM_MANIFEST = "the manifest's; given, it must agree"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..settings import FeatureSettings, HeatmapSettings, PatchSettings, PredictSettings, ThumbnailSettings, TissueSettings

    io = parser.add_argument_group("input and output")
    io.add_argument("--models", required=True, help="experiment folder holding manifest.json and fold<k>/checkpoint.pt")
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
    add_settings(io, HeatmapSettings)
    add_settings(io, PredictSettings)

    pre = parser.add_argument_group("preprocessing and encoder (the experiment's manifest's: give one only to check it)")
    add_settings(pre, ThumbnailSettings, defaults=False, source=FROM_MANIFEST)
    add_settings(pre, TissueSettings, defaults=False, source=FROM_MANIFEST)
    add_settings(pre, PatchSettings, defaults=False, source=FROM_MANIFEST)
    pre.add_argument("--segmentation-checkpoint",
                     help="the lesion model (`msamil segment-train`) of an experiment on lesion patches (default: "
                     "the manifest's; given, it must be that very file's content)")
    add_encoder_arguments(parser, defaults=False, source=FROM_MANIFEST, checkpoint=False)
    add_settings(pre, FeatureSettings, only=["fp16"], defaults=False, source=FROM_MANIFEST)
    rt = parser.add_argument_group("runtime")
    add_settings(rt, FeatureSettings, only=["batch_size", "workers"])
    rt.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    rt.add_argument("--threads", type=int, help="torch threads for the model (default: torch's choice)")
    rt.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> None:
    from ..pipeline import ExtractOptions
    from ..prediction import predict_slides, read_new_slides, single_slide, slide_settings
    from ..runtime import resolve_device, set_threads
    from ..settings import (EncoderSettings, FeatureSettings, HeatmapSettings, PatchSettings, PredictSettings,
                            ThumbnailSettings, TissueSettings)

    set_threads(args.threads)
    sheet = read_new_slides(args.sheet) if args.sheet else single_slide(args.slide, args.slide_id, args.mpp)
    flags = {cls: given(args, cls) for cls in (ThumbnailSettings, TissueSettings, PatchSettings, EncoderSettings)}
    features = from_args(args, FeatureSettings)
    settings = slide_settings(args.models, flags, args.segmentation_checkpoint, given(args, FeatureSettings).get("fp16"),
                              ExtractOptions(features, args.device, not args.no_progress))
    predict_slides(args.models, sheet, args.out, settings, resolve_device(args.device), results=args.results,
                   features=args.features, folds=args.fold, heatmaps=args.heatmaps,
                   top_k=from_args(args, HeatmapSettings).top_k, min_patches=from_args(args, PredictSettings).min_patches)
