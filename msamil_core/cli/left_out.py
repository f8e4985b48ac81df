"""The run's list of what was left out: the screening's (unreadable slides, bad annotations) and
the slides that failed after it, each with its reason.

A slide can pass the screening (which reads a coarse level) and still be unusable: its
full-resolution tiles fail to decode in extraction (`msamil extract --leave-out-unreadable` then writes its
bags empty, recording why), or no patch is kept at any scale. Training, evaluation and the
heatmaps leave such slides out; this command lists them after the screening's rows, one row per
slide (`what`: `slide` when every bag of it is empty, `bags` when only some feature folders' are),
and applies the screening's policy to the slides left out in all.

Example:
  msamil left-out --sheet results/cohort/slides.csv --screening results/cohort/screening_left_out.csv \
      --bag-index results/features/*/bags.tsv --out results/cohort/left_out.csv
"""

from __future__ import annotations

import argparse

from .options import add_settings, from_args

HELP = "screening's left-out list + slides whose bags are empty -> left_out.csv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sheet", required=True, help="the screened sheet (msamil screen --out)")
    parser.add_argument("--screening", required=True, help="the screening's left-out table (msamil screen --left-out)")
    parser.add_argument("--bag-index", nargs="*", default=[], metavar="TSV",
                        help="feature folders' bag indexes (bags.tsv: slide_id, bag)")
    parser.add_argument("--out", required=True, help="the left-out table to write (CSV: slide_id, patient_id, label, "
                        "what, reason)")
    from ..settings import ScreeningSettings

    add_settings(parser.add_argument_group("policy"), ScreeningSettings)


def run(args: argparse.Namespace) -> None:
    from ..cohort.screening import cohort_left_out
    from ..settings import ScreeningSettings

    cohort_left_out(args.sheet, args.screening, args.bag_index, from_args(args, ScreeningSettings), args.out)
