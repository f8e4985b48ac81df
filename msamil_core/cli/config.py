"""Every setting msamil has, with its default and what it does; or check config files.

Without arguments, prints the documented defaults: what config/config.yaml holds (`msamil config
> config/config.yaml` regenerates it after a setting was added or changed in
msamil_core/settings.py). With --check, reads the given YAML files merged in order, as Snakemake
merges `configfile` and `--configfile` (later files win, mappings key by key), on top of the
defaults, and checks every key and value as the workflow does before any job runs: a misspelt key
or value stops with one line naming it and the closest valid one.

Examples:
  msamil config                                   # the defaults, documented
  msamil config --check config/config.yaml my.yaml
  msamil config --schema > msamil.schema.json     # the JSON schema, for editors
"""

from __future__ import annotations

import argparse

HELP = "print every setting with its default and help (config/config.yaml), or --check config files"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--check", nargs="+", metavar="YAML", help="config files to check, merged in this order")
    what.add_argument("--schema", action="store_true", help="print the config's JSON schema (draft 2020-12)")


def run(args: argparse.Namespace) -> None:
    from ..settings import json_schema, load_config, merge, render_config

    if args.schema:
        import json

        print(json.dumps(json_schema(), indent=2))
        return
    if not args.check:
        print(render_config(), end="")
        return
    import yaml

    from ..errors import MsamilError

    merged: dict = {}
    for path in args.check:
        try:
            with open(path, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise MsamilError(f"{path}: cannot read ({exc})") from None
        if not isinstance(values, dict):
            raise MsamilError(f"{path}: a config file holds a mapping of settings")
        merged = merge(merged, values)
    load_config(merged)
    print(f"ok: {', '.join(args.check)}")
