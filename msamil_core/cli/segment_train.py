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

from .options import add_settings, from_args

HELP = "annotated thumbnails -> UNet++ lesion segmentation checkpoint (+ metrics.json)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..settings import (AnnotationSettings, PostProcessSettings, SegmentationSettings, SegmentationTraining)

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
    # every option is a setting of the config's `segmentation` section, under the same name
    add_settings(parser.add_argument_group("model and training"), SegmentationSettings,
                 only=[n for n in SegmentationTraining.names() if n != "checkpoint"])
    add_settings(parser.add_argument_group("lesion mask"), SegmentationSettings, only=PostProcessSettings.names())
    add_settings(parser.add_argument_group("annotations"), SegmentationSettings, only=AnnotationSettings.names())
    t = parser.add_argument_group("runtime")
    t.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N] (default %(default)s)")
    t.add_argument("--threads", type=int, default=0, help="CPU threads for torch; 0 = torch's default")


def run(args: argparse.Namespace) -> None:
    from ..runtime import set_threads
    from ..segmentation.training import train_from_sheet
    from ..settings import SegmentationSettings

    set_threads(args.threads)
    train_from_sheet(args.sheet, args.out, from_args(args, SegmentationSettings), slides_dir=args.slides_dir,
                     thumbnails=args.thumbnails, metrics_path=args.metrics, probabilities_dir=args.probabilities_dir,
                     device=args.device)
