"""List the registered MIL models (for `msamil train --model` and the config's `experiments`)
and the patch encoders: the named presets with their output width, input size, licence and
Hugging Face repo, then the other registered encoders (any timm model name works too).

With ``--json`` it prints every name, timm's included, as one JSON object
(``{"mil": [...], "encoders": {"presets": [...], "registered": [...], "timm": [...]}}``):
:mod:`msamil_core.names` runs it in a subprocess and caches the result, so that the workflow
checks the config's names at parse time without importing torch.
"""

from __future__ import annotations

import argparse
import json

HELP = "list registered MIL models and patch encoders (presets with width and source)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", help="fnmatch pattern, e.g. 'clam*'")
    parser.add_argument("--json", action="store_true",
                        help="print every name (timm's models included) as one JSON object, for programs")


def run(args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(all_names(args.pattern)))
        return
    from fnmatch import fnmatch

    from ..features.encoders import list_encoders
    from ..features.presets import PRESETS
    from ..mil import list_models

    print("MIL models:")
    for name in list_models(args.pattern):
        print(f"  {name}")
    print("patch encoder presets (name, width, input px, weights repo, licence):")
    for name, p in PRESETS.items():
        if args.pattern and not fnmatch(name, args.pattern):
            continue
        gate = "gated, " if p.gated else ""
        print(f"  {name:<15} {p.width:>5}  {p.input_size:>4}  hf-hub:{p.repo_id:<28} {gate}{p.licence}")
        print(f"  {'':<15} {p.description}; source: {p.source.split(';')[0]}")
    print("other patch encoders (besides any timm model name):")
    for name in list_encoders():
        if name not in PRESETS and (not args.pattern or fnmatch(name, args.pattern)):
            print(f"  {name}")


def all_names(pattern: str | None = None) -> dict:
    """Every MIL model and encoder name (``pattern`` filters them with fnmatch), by kind."""
    from fnmatch import fnmatchcase

    import timm

    from ..features.encoders import list_encoders
    from ..features.presets import PRESETS
    from ..mil import list_models

    def keep(names) -> list[str]:
        return [n for n in names if not pattern or fnmatchcase(n, pattern)]

    return {
        "mil": list_models(pattern),
        "encoders": {
            "presets": keep(PRESETS),
            "registered": keep(n for n in list_encoders() if n not in PRESETS),
            "timm": keep(timm.list_models()),
        },
    }
