"""Options several commands share, and the options of the settings model.

A command's settings options are made from the setting classes of :mod:`msamil_core.settings`
by :func:`add_settings`: one option per setting, named, typed, bounded and explained as the
setting is, with its default (or, for a command that takes the setting from a file such as an
experiment's manifest, no default). :func:`from_args` turns the parsed options back into the
settings object the core takes. So a command's defaults and help are those of the config, and
the workflow's option strings (:func:`msamil_core.settings.cli_args`) are read back exactly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import MsamilError
from ..settings import Section, default_of, fields_of, flag_of

# ----------------------------------------------------------------------------- settings as options


def dest(cls: type, name: str) -> str:
    """Where a setting's option is stored in the parsed namespace (a class may share field names
    with another in one command, e.g. the encoder's and the training's ``seed``)."""
    return f"{cls.__name__}.{name}"


def _selected(cls: type, only, exclude):
    for f, tp in fields_of(cls):
        if only is not None:
            if f.name in only:
                yield f, tp
        elif f.name not in exclude and f.metadata.get("cli", True):
            yield f, tp


def _json_mapping(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"depth\": 2}'")
    return value


def add_settings(parser, cls: type, only=None, exclude=(), defaults: bool = True, source: str = "") -> None:
    """One option per setting of ``cls`` (those with ``cli=True``, or those named in ``only``).

    With ``defaults`` each option defaults to its setting's default, shown in the help. Without,
    it defaults to None and only overrides (or, where ``source`` says so, must agree with) the
    settings read elsewhere; ``source`` says where in the help, e.g. "the manifest's" or
    "--experiment's, else {default}".
    """
    import typing

    from ..settings import unwrap_optional

    for f, tp in _selected(cls, only, exclude):
        kind, _ = unwrap_optional(tp)
        text = f.metadata.get("help", "")
        meta = f.metadata
        value = default_of(f)
        kwargs = {"dest": dest(cls, f.name), "default": value if defaults else None}
        shown = ("none" if value is None else " ".join(map(str, value)) if isinstance(value, list)
                 else json.dumps(value) if isinstance(value, dict) else str(value).lower() if isinstance(value, bool)
                 else value)
        where = source.format(default=shown) if source else shown
        if kind is bool:  # --flag / --no-flag; argparse adds the default to the help when there is one
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["help"] = (text if defaults else f"{text} (default: {where})").replace("%", "%%")
        else:
            kwargs["help"] = f"{text} (default: {shown if defaults else where})".replace("%", "%%")
            if typing.get_origin(kind) is list:
                item = typing.get_args(kind)[0]
                name = f.name.upper()
                kwargs.update(nargs="*", type=item, metavar=name[:-2] if name.endswith("SES") else name.rstrip("S"))
                if meta.get("choices"):
                    kwargs["choices"] = meta["choices"]
            elif kind is dict or typing.get_origin(kind) is dict:
                kwargs.update(type=_json_mapping, metavar="JSON")
            elif meta.get("auto"):  # a number or `auto`, checked by the settings class
                kwargs.update(type=str, metavar=f"{f.name.upper()}|auto")
            else:
                kwargs["type"] = kind
                if meta.get("choices"):
                    kwargs["choices"] = meta["choices"]
                else:
                    kwargs["metavar"] = f.name.upper()
        parser.add_argument(flag_of(f), **kwargs)


def given(args: argparse.Namespace, cls: type) -> dict:
    """The settings of ``cls`` whose options the namespace holds and that are not None."""
    values = {}
    for f, _ in fields_of(cls):
        value = getattr(args, dest(cls, f.name), None)
        if value is not None:
            values[f.name] = value
    return values


def from_args(args: argparse.Namespace, cls: type, base: Section | dict | None = None, **fixed):
    """The settings object of ``cls``: ``base`` (an object or mapping; default the defaults),
    with the options given on top and then ``fixed``."""
    values = base.to_dict() if isinstance(base, Section) else dict(base or {})
    values.update(given(args, cls))
    values.update(fixed)
    return cls(**{k: v for k, v in values.items() if k in cls.names()})


# ----------------------------------------------------------------------------- slides and outputs


def add_slide_arguments(parser: argparse.ArgumentParser) -> None:
    """--slide, --slide-id and --mpp: the slide a command opens."""
    parser.add_argument("--slide", required=True, help="slide file (anything OpenSlide opens)")
    parser.add_argument("--slide-id", help="slide name used in messages and outputs (default: the file's stem)")
    parser.add_argument("--mpp", type=float, help="level-0 µm/px; overrides the file's value (sheet column `mpp`)")


def add_output_arguments(parser) -> None:
    """--strategy-out, --geojson and --geojson-strategy (also `msamil preprocess`'s)."""
    from ..settings import STRATEGIES

    parser.add_argument("--strategy-out", action="append", default=[], metavar="NAME:SCALE=H5",
                        help="the file of one strategy (lesion, tissue, random) and scale (20x, 10x, 5x), repeatable "
                        "(`msamil coords`: instead of --out-*)")
    parser.add_argument("--geojson", metavar="FILE",
                        help="also export the masks and one strategy's patch grids as QuPath GeoJSON, as "
                        "`msamil export-geojson` does")
    parser.add_argument("--geojson-strategy", choices=STRATEGIES,
                        help="the strategy whose grids --geojson draws (default: the first written)")


def strategy_files(items: list[str]) -> dict[str, dict[str, str]]:
    """strategy -> {scale: file} of --strategy-out NAME:SCALE=H5 items."""
    files: dict[str, dict[str, str]] = {}
    for key, path in named(items, "--strategy-out"):
        strategy, sep, scale = key.partition(":")
        if not sep or scale in files.get(strategy, {}):
            raise MsamilError(f"--strategy-out {key}={path}: name each file once as STRATEGY:SCALE, e.g. lesion:20x")
        files.setdefault(strategy, {})[scale] = path
    return files


# ----------------------------------------------------------------------------- encoders and extraction


def add_encoder_arguments(parser: argparse.ArgumentParser, defaults: bool = True, source: str = "",
                          checkpoint: bool = True) -> None:
    """The encoder options (an `encoders` entry of the config) and, with ``checkpoint``, --encoder-checkpoint."""
    from ..settings import EncoderSettings

    enc = parser.add_argument_group("encoder")
    if checkpoint:
        enc.add_argument("--encoder-checkpoint",
                         help="an e2e checkpoint (results/e2e/<name>/fold<k>/checkpoint.pt): its tuned encoder, with "
                         "the name, input size, normalisation and options it was trained with; replaces the other "
                         "encoder options")
    add_settings(enc, EncoderSettings, defaults=defaults, source=source)


def encoder_spec(args: argparse.Namespace):
    """The :class:`~msamil_core.features.encoders.EncoderSpec` of :func:`add_encoder_arguments`'
    options (an e2e checkpoint's tuned encoder with ``--encoder-checkpoint``)."""
    from ..features.encoders import EncoderSpec
    from ..settings import EncoderSettings

    if getattr(args, "encoder_checkpoint", None):
        from ..training.e2e import encoder_spec_from_checkpoint

        return encoder_spec_from_checkpoint(args.encoder_checkpoint)
    return EncoderSpec.from_settings(from_args(args, EncoderSettings))


def add_extract_arguments(parser: argparse.ArgumentParser) -> None:
    """Batch size, readers and precision (the config's `features`), and device, threads, progress."""
    from ..settings import FeatureSettings

    rt = parser.add_argument_group("runtime")
    add_settings(rt, FeatureSettings)
    rt.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    rt.add_argument("--threads", type=int, help="torch threads for the model (default: torch's choice)")
    rt.add_argument("--no-progress", action="store_true", help="no progress bar")


def extract_options(args: argparse.Namespace):
    """The :class:`~msamil_core.pipeline.ExtractOptions` of :func:`add_extract_arguments`; sets
    torch's threads."""
    from ..pipeline import ExtractOptions
    from ..runtime import set_threads
    from ..settings import FeatureSettings

    set_threads(args.threads)
    return ExtractOptions(features=from_args(args, FeatureSettings), device=args.device,
                          progress=not args.no_progress)


# ----------------------------------------------------------------------------- cohorts and folds


def add_fold_arguments(parser) -> None:
    """Sheet, folds, the config's `splits` and `classes`, and the task: shared by train, evaluate and e2e."""
    from ..settings import Config, SplitSettings

    parser.add_argument("--sheet", required=True, help="slide sheet (CSV/TSV with slide_id, path, label, patient_id; "
                        "train and evaluate read bags only and need no path)")
    parser.add_argument("--folds", help="folds.csv from `msamil splits`; default: made from the sheet")
    parser.add_argument("--fold", default="all", help="fold index, or `all` (default)")
    add_settings(parser, SplitSettings)
    add_settings(parser, Config, only=["classes"])
    parser.add_argument("--task", help="JSON: class name -> list of sheet labels (e.g. a two-class task)")


def split_settings(args: argparse.Namespace):
    from ..settings import SplitSettings

    return from_args(args, SplitSettings)


def classes_option(args: argparse.Namespace) -> list[str] | None:
    from ..settings import Config

    return given(args, Config).get("classes") or None


def load_folds(args: argparse.Namespace, sheet, out_dir=None):
    """folds.csv from --folds, or made from the sheet (and written to out_dir/folds.csv)."""
    from ..training.splits import make_folds, read_folds, write_folds

    if args.folds:
        return read_folds(args.folds)
    splits = split_settings(args)
    folds = make_folds(sheet, n_folds=splits.n_folds, seed=splits.seed)
    if out_dir is not None:
        write_folds(Path(out_dir) / "folds.csv", folds)
    return folds


def fold_indices(args: argparse.Namespace, folds) -> list[int]:
    """The folds --fold names (``all``: every fold of the folds table)."""
    from ..training.splits import count_folds

    n = count_folds(folds)
    if args.fold == "all":
        return list(range(n))
    try:
        k = int(args.fold)
    except ValueError:
        raise MsamilError(f"--fold must be a fold index or `all`, got {args.fold!r}") from None
    if not 0 <= k < n:
        raise MsamilError(f"--fold {k}: the folds file has folds 0..{n - 1}")
    return [k]


def read_options(text: str, flag: str = "--experiment") -> dict:
    """Options from inline JSON or a JSON/YAML file."""
    import yaml

    try:
        if text.lstrip().startswith("{"):  # inline JSON
            options = json.loads(text)
        elif Path(text).is_file():
            options = yaml.safe_load(Path(text).read_text()) or {}
        else:
            raise MsamilError(f"{flag} {text}: no such file (give a JSON/YAML file or inline JSON)")
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise MsamilError(f"{flag}: not valid JSON/YAML ({exc})") from None
    if not isinstance(options, dict):
        raise MsamilError(f"{flag} must be a mapping of options")
    return options


def json_option(text: str | None, flag: str):
    """A JSON-valued option (None when not given), failing as one line."""
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MsamilError(f"{flag}: not JSON ({exc})") from None


def named(items: list[str], flag: str) -> list[tuple[str, str]]:
    """``NAME=VALUE`` options as (name, value) pairs, split at the first ``=`` (values may hold ``=``)."""
    pairs = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise MsamilError(f"{flag} {item!r}: expected NAME=VALUE")
        pairs.append((name, value))
    return pairs
