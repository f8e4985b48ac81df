"""The ``msamil`` command line: one sub-command per pipeline step.

Each sub-command lives in ``msamil_core/cli/<name>.py`` (found by its name: a new module is a new
command) and defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args)``, which turns the arguments into the core's settings
and calls one core function. Options several commands share are in :mod:`.options`. Heavy
imports (torch, OpenSlide) happen inside ``run`` so that ``msamil --help`` stays fast.

Expected failures raise :class:`msamil_core.errors.MsamilError`; they are printed
as one line (``msamil <command>: error: ...``) and the process exits with status 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .. import __version__
from ..errors import MsamilError

def commands() -> list[str]:
    """Every command: one module per command in this package (``options`` holds shared options),
    named with dashes for underscores, in alphabetical order."""
    import pkgutil

    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(__path__) if m.name != "options")


def _load(name: str):
    return importlib.import_module(f"{__name__}.{name.replace('-', '_')}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``only``, just that command's module is imported."""
    parser = argparse.ArgumentParser(
        prog="msamil",
        description=(
            "Multi-scale MIL for whole-slide images. Each command is one pipeline step; "
            "the Snakemake workflow calls them, and you can call them yourself. "
            "`msamil <command> --help` explains each option."
        ),
    )
    parser.add_argument("--version", action="version", version=f"msamil {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name in [only] if only else commands():
        module = _load(name)
        p = sub.add_parser(
            name, help=module.HELP, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _command_in(argv: list[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in commands() else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        args._module.run(args)
    except MsamilError as exc:
        print(f"msamil {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"msamil {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
