"""Screen a cohort: which slides and annotations the run can use, and why the others are left out.

Every slide of the sheet is opened, its µm/px found, its thumbnail-level image decoded, and its
tissue found with the tissue step's own settings; its annotation, if any, must parse and fit the
slide. A slide that fails is left out with a one-line reason (a bad annotation leaves out only
the annotation). Writes the screened sheet (the kept slides, absolute paths, bad annotations
blanked), which later steps read, and left_out.csv (slide_id, patient_id, label, what, reason).

More slides left out than --max-left-out of the sheet (or any, with --no-leave-out) fails the
screening, naming the first reasons, and writes nothing. Verdicts are cached (--cache) by the
files' path, size and mtime and the settings: a rerun screens only new or changed files.
"""

from __future__ import annotations

import argparse

from .options import add_tissue_arguments, tissue_params

HELP = "slide sheet -> screened sheet + left_out.csv (unreadable slides, bad annotations)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sheet", required=True, help="slide sheet (CSV/TSV: slide_id, path, label, patient_id, ...)")
    parser.add_argument("--out", required=True, help="screened sheet to write (CSV)")
    parser.add_argument("--left-out", required=True, help="table of what was left out and why (CSV)")
    parser.add_argument("--cache", help="verdict cache (JSON), reused for unchanged files")
    parser.add_argument("--record", help="JSON to write what the screening was made from (settings, policy, "
                        "which files existed): the workflow reads it to know the screened sheet is current")
    parser.add_argument("--long-side", type=int, default=1024, help="thumbnail long side in px, as the thumbnail step")
    parser.add_argument("--max-left-out", type=float, default=0.1,
                        help="largest share of the sheet's slides that may be left out (default %(default)s)")
    parser.add_argument("--no-leave-out", dest="leave_out", action="store_false",
                        help="fail when any slide cannot be used instead of leaving it out")
    parser.add_argument("--threads", type=int, default=1, help="slides screened at once")
    add_tissue_arguments(parser)


def run(args: argparse.Namespace) -> None:
    from ..cohort.screening import (ScreenPolicy, ScreenSettings, keep_usable, screen_cohort, screening_record,
                                    write_screened)
    from ..cohort.sheet import load_sheet
    from ..fileio import write_json

    sheet = load_sheet(args.sheet)
    settings = ScreenSettings(args.long_side, tissue_params(args), args.min_tissue_fraction)
    policy = ScreenPolicy(args.leave_out, args.max_left_out)
    verdicts = screen_cohort(sheet, settings, args.cache, args.threads)
    kept, left_out = keep_usable(sheet, verdicts, policy, f"slide sheet {args.sheet}")
    if args.record:
        write_json(args.record, screening_record(sheet, settings, policy))
    write_screened(kept, left_out, args.out, args.left_out)
