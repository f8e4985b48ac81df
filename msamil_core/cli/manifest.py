"""Write an experiment's manifest: everything its models' inputs depend on (SPEC "Outputs").

The workflow's write_manifest rule runs this once an experiment's folds are trained, with the
settings it trained them with (--settings, JSON: thumbnail, tissue, patches, lesion model,
encoder, stored precision, splits, task, training settings and relations) and every fold's
checkpoint. Each checkpoint is checked against the settings (model, scales, encoder id) and the
others (classes) before models/<experiment>/manifest.json is written; `msamil predict --models`
and the report read it.

Example:
  msamil manifest --settings settings.json --checkpoints models/x/fold*/checkpoint.pt \\
      --out models/x/manifest.json
"""

from __future__ import annotations

import argparse

from .options import read_options

HELP = "experiment settings + fold checkpoints -> models/<experiment>/manifest.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--settings", required=True, help="inline JSON or a JSON/YAML file: the experiment's settings")
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="PT",
                        help="every fold's checkpoint.pt ([repeat<r>/]fold<k>/ beside the manifest)")
    parser.add_argument("--out", required=True, help="manifest.json to write, in the experiment's folder")


def run(args: argparse.Namespace) -> None:
    from ..manifest import write_manifest

    write_manifest(read_options(args.settings, "--settings"), args.checkpoints, args.out)
