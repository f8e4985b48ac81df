"""Screen a cohort: which slides and annotations the run can use, and why the others are left out.

Every slide of the sheet is opened, its µm/px found, its thumbnail-level image decoded, and its
tissue found with the tissue step's own settings; its annotation, if any, must parse and fit the
slide. A slide that fails is left out with a one-line reason (a bad annotation leaves out only
the annotation). Writes the screened sheet (the kept slides, paths inside the project relative
to it, bad annotations blanked), which later steps read, and left_out.csv (slide_id, patient_id, label, what, reason).

More slides left out than --max-left-out of the sheet (or any, with --no-leave-out) fails the
screening, naming the first reasons, and writes nothing. Verdicts are cached (--cache) by the
files' path, size and mtime and the settings: a rerun screens only new or changed files.
"""

from __future__ import annotations

import argparse

from .options import add_settings, from_args

HELP = "slide sheet -> screened sheet + left_out.csv (unreadable slides, bad annotations)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sheet", required=True, help="slide sheet (CSV/TSV: slide_id, path, label, patient_id, ...)")
    parser.add_argument("--out", required=True, help="screened sheet to write (CSV)")
    parser.add_argument("--left-out", required=True, help="table of what was left out and why (CSV)")
    parser.add_argument("--cache", help="verdict cache (JSON), reused for unchanged files")
    parser.add_argument("--record", help="JSON to write what the screening was made from (settings, policy, "
                        "which files existed): the workflow reads it to know the screened sheet is current")
    parser.add_argument("--threads", type=int, default=1, help="slides screened at once")
    from ..settings import ScreeningSettings, ThumbnailSettings, TissueSettings

    add_settings(parser.add_argument_group("policy"), ScreeningSettings)
    steps = parser.add_argument_group("thumbnail and tissue (as those steps)")
    add_settings(steps, ThumbnailSettings)
    add_settings(steps, TissueSettings)


def run(args: argparse.Namespace) -> None:
    from ..cohort.screening import ScreenSettings, keep_usable, screen_cohort, screening_record, write_screened
    from ..cohort.sheet import load_sheet
    from ..fileio import write_json
    from ..settings import ScreeningSettings, ThumbnailSettings, TissueSettings

    sheet = load_sheet(args.sheet)
    settings = ScreenSettings(from_args(args, ThumbnailSettings), from_args(args, TissueSettings))
    policy = from_args(args, ScreeningSettings)
    verdicts = screen_cohort(sheet, settings, args.cache, args.threads)
    kept, left_out = keep_usable(sheet, verdicts, policy, f"slide sheet {args.sheet}")
    if args.record:
        write_json(args.record, screening_record(sheet, settings, policy))
    write_screened(kept, left_out, args.out, args.left_out)
