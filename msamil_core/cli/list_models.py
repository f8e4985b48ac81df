"""List the registered MIL models (for `msamil train --model` and the config's `experiments`)
and the registered patch encoders (any timm model name works as an encoder too).
"""

from __future__ import annotations

import argparse

HELP = "list registered MIL models and patch encoders"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", help="fnmatch pattern, e.g. 'clam*'")


def run(args: argparse.Namespace) -> None:
    from ..features.encoders import list_encoders
    from ..mil import list_models

    print("MIL models:")
    for name in list_models(args.pattern):
        print(f"  {name}")
    print("patch encoders (besides any timm model name):")
    for name in list_encoders():
        print(f"  {name}")
