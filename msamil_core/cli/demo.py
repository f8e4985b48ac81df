"""Write the built-in synthetic demo cohort.

Writes, under --out:
  slides/<slide_id>.tiff           pyramidal JPEG-tiled TIFF, 0.5 µm/px (20x),
                                   levels at downsample 1, 4, 16 (OpenSlide generic-tiff)
  annotations/<slide_id>.geojson   QuPath GeoJSON lesion polygons ("Tumor"), level-0 px
  slides.csv                       the sheet: slide_id, path, label, patient_id, annotation
                                   (paths relative to it; always the whole cohort)

Four classes, label = <cytology>_<architecture>: bland or atypical nuclei in the
lesion nests (resolved at 20x) and an alternating (checkerboard) or zonal
arrangement of dense and sparse nests (seen at 10x and 5x, never inside one 20x
patch). Nests are --patch-size level-0 px on the grid that starts at (0, 0),
i.e. the pipeline's 20x patch grid: run the pipeline with the same patch size.
Slides are 32 x 24 patch sizes (8192 x 6144 px at 256). About 20% of the
patients have two slides; labels are balanced over patients.

The output depends only on --seed, --n-slides and --patch-size: the same
arguments give byte-identical files, and --slides writes exactly the files a
full run would write for those slides. See msamil_core/demo.py for the full rule.
"""

from __future__ import annotations

import argparse

from .options import add_settings, from_args

HELP = "write the synthetic demo cohort (pyramidal TIFFs, lesion GeoJSONs, slide sheet)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_data", metavar="DIR", help="output folder (default: %(default)s)")
    from ..settings import DemoSettings, PatchSettings

    add_settings(parser, DemoSettings)
    # nests are this many level-0 px and slides 32 x 24 times it (a multiple of 16, >= 32)
    add_settings(parser, PatchSettings, only=["patch_size"])
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="worker processes, one slide each (default: %(default)s)")
    parser.add_argument("--slides", nargs="+", metavar="ID", default=None,
                        help="write only these slides (ids as in the sheet, e.g. demo_000); the sheet still lists all")


def run(args: argparse.Namespace) -> None:
    from ..cohort.demo import generate_cohort
    from ..settings import DemoSettings, PatchSettings

    demo, patches = from_args(args, DemoSettings), from_args(args, PatchSettings)
    generate_cohort(args.out, n_slides=demo.n_slides, seed=demo.seed, patch_size=patches.patch_size, threads=args.threads,
                    slide_ids=args.slides, progress=True)
