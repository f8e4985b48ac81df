"""Write the cohort report: index.html, summary.csv (mean ± sd over folds), ROC and confusion PNGs.

Each --experiment NAME=DIR points at an experiment directory with fold<k>/metrics.json (from
`msamil evaluate`) and fold<k>/checkpoint.pt (for its config). Transfer experiments are set
beside their from-scratch twins, and experiments on the same task that use different scales
are compared, automatically. --section TITLE=CSV adds a table (e.g. patch-selection figures);
--heatmaps NAME=DIR links an experiment's attention heatmaps.
"""

from __future__ import annotations

import argparse

HELP = "fold metrics of experiments -> report/index.html + summary.csv + plots"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", action="append", required=True, metavar="NAME=DIR",
                        help="an experiment and its directory (repeat for each)")
    parser.add_argument("--section", action="append", default=[], metavar="TITLE=CSV",
                        help="an extra table to include, from a CSV file (repeatable)")
    parser.add_argument("--features", action="append", default=[], metavar="NAME=DIR",
                        help="an experiment's feature folder (repeatable): the patch counts of the strategy comparison")
    parser.add_argument("--benchmarks", help="Snakemake benchmark folder: the extraction and inference times")
    parser.add_argument("--segmentation", metavar="JSON", help="metrics.json of `msamil segment-train`")
    parser.add_argument("--heatmaps", action="append", default=[], metavar="NAME=DIR",
                        help="an experiment's `msamil heatmap` folder (summary.csv + <slide>/), linked with its "
                        "attention inside vs outside the lesions (repeatable)")
    parser.add_argument("--out-dir", required=True, help="report directory to write")
    parser.add_argument("--title", default="msamil report")


def _pairs(items: list[str], what: str) -> dict[str, str]:
    from ..errors import MsamilError

    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise MsamilError(f"{what} {item!r}: expected NAME=PATH")
        out[name] = value
    return out


def run(args: argparse.Namespace) -> None:
    import pandas as pd

    from ..report import write_report

    sections = [(title, pd.read_csv(path)) for title, path in _pairs(args.section, "--section").items()]
    write_report(_pairs(args.experiment, "--experiment"), args.out_dir, sections, title=args.title,
                 features=_pairs(args.features, "--features"), benchmarks=args.benchmarks,
                 segmentation=args.segmentation,
                 heatmaps=_pairs(args.heatmaps, "--heatmaps"))
