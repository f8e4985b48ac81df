"""Attention heatmaps of one fold's model on slides: by default the fold's test slides.

For each slide, <out-dir>/<slide>/ gets (all files or none):
  attention_<scale>.png   the thumbnail with each patch of that scale (20x, 10x, 5x) painted by
                          its attention, with a colour bar in attention units
  attention_combined.png  the attention of every scale summed at each point
  top_bottom.png          the --top-k patches with the highest and the lowest attention
  attention.geojson       one square per patch in level-0 px with `attention`, `attention x N`
                          (1 = uniform) [and `lesion fraction`] as measurements, for QuPath
                          (File > Import objects from file; Measure > Show measurement maps)
  attention.csv, slide.json  the same scores; the prediction and lesion figures
and <out-dir>/summary.csv (written last) has, per slide and scale, the mean `attention x N` of
the patches inside the annotated lesion (sheet column `annotation`; at least half of the patch
annotated) and outside it.

Thumbnails and meta.json come from --slides-dir (`msamil thumbnail`'s outputs), or are made
from the slide when missing there. Every registered model returns attention; a model that does
not fails with a message saying so.
"""


from __future__ import annotations

import argparse

from .options import add_settings, from_args

HELP = "a fold's model + its test slides -> attention heatmaps (PNG), montage, QuPath GeoJSON"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", required=True, help="experiment folder holding fold<k>/checkpoint.pt")
    parser.add_argument("--fold", type=int, default=0, help="the fold whose model is drawn (default 0)")
    parser.add_argument("--features", required=True, help="feature folder of the bags (<slide_id>.pt)")
    parser.add_argument("--sheet", required=True,
                        help="slide sheet: slide paths, labels and `annotation` files (for the lesion figures)")
    parser.add_argument("--folds", help="folds.csv: draw the fold's test slides (those of the experiment's task)")
    parser.add_argument("--slide-ids", nargs="+", help="draw these slides instead of the fold's test slides")
    from ..layout import slides_root

    parser.add_argument("--slides-dir", default=slides_root(),
                        help="folder of <slide>/thumbnail.png and meta.json (default %(default)s)")
    parser.add_argument("--out-dir", required=True, help="folder to write <slide>/ folders and summary.csv into")
    from ..settings import HeatmapSettings

    add_settings(parser, HeatmapSettings)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")


def run(args: argparse.Namespace) -> None:
    from ..prediction import draw_fold_heatmaps
    from ..runtime import resolve_device, set_threads
    from ..settings import HeatmapSettings

    set_threads(args.threads)
    draw_fold_heatmaps(args.models, args.fold, args.features, args.sheet, args.out_dir, resolve_device(args.device),
                       folds_path=args.folds, slide_ids=args.slide_ids, slides_dir=args.slides_dir,
                       top_k=from_args(args, HeatmapSettings).top_k)
