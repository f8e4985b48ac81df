"""Patient-level, label-stratified k-fold splits of the slide sheet -> folds.csv.

Every patient gets one test fold; all slides of a patient share it. Labels are spread evenly
over the folds. The file has the columns slide_id, patient_id, label, fold, n_folds and
val_rank; for fold k, the test part is fold k, and the validation part is, per label, the
lowest-val_rank fraction (the training step's validation fraction) of the other folds'
patients; msamil_core/splits.py states the exact rule.

With --previous (which may be the --out file itself: it is read before anything is written),
patients already in that file keep their fold and only new patients are placed, so adding
slides to the sheet does not move existing patients. A --previous file that does not exist
yet is ignored. In Snakemake, mark the output `update(...)` so it is kept for the next run.

Example:
  msamil splits --sheet slides.csv --out results/splits/folds.csv --n-folds 5 --split-seed 0 \\
      --previous results/splits/folds.csv
"""

from __future__ import annotations

import argparse

from .options import add_settings, from_args

HELP = "slide sheet -> patient-level stratified folds (folds.csv)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sheet", required=True, help="slide sheet (CSV or TSV: slide_id, label, patient_id; path may be empty)")
    parser.add_argument("--out", required=True, help="folds CSV to write, e.g. results/splits/folds.csv")
    from ..settings import SplitSettings

    add_settings(parser, SplitSettings, only=["n_folds", "seed"])
    parser.add_argument(
        "--previous",
        metavar="CSV",
        help="earlier folds CSV whose patients keep their fold (may equal --out; ignored if it does not exist)",
    )


def run(args: argparse.Namespace) -> None:
    from ..settings import SplitSettings
    from ..training.splits import split_sheet

    splits = from_args(args, SplitSettings)
    split_sheet(args.sheet, args.out, splits.n_folds, splits.seed, args.previous)
