"""Options several commands share, and their conversion into the core's settings.

Each ``add_*`` function adds one group of options to a command's parser; the function beside it
turns the parsed group into the dataclass the core takes (:class:`~msamil_core.wsi.tissue.TissueParams`,
:class:`~msamil_core.features.encoders.EncoderSpec`, :class:`~msamil_core.pipeline.ExtractOptions`, ...).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import MsamilError


def add_config_arguments(group, cls, helps: dict[str, str], defaults: bool = True,
                         choices: dict[str, tuple] | None = None, flags: dict[str, str] | None = None) -> None:
    """One ``--field-name`` option per field of the config dataclass ``cls`` named in ``helps``,
    typed like the field's default. With ``defaults`` the option defaults to the field's default
    (shown in the help); without, to None, so that it only overrides options read elsewhere
    (``--experiment``, ``--options``)."""
    default = cls()
    for name, text in helps.items():
        value = getattr(default, name)
        kwargs = {"choices": (choices or {}).get(name), "default": value if defaults else None,
                  "help": f"{text} (default {value})"}
        if isinstance(value, list):
            kwargs.update(nargs="+", type=type(value[0]) if value else str)
        elif value is not None:
            kwargs["type"] = type(value)
        group.add_argument((flags or {}).get(name, f"--{name.replace('_', '-')}"), dest=name, **kwargs)


def config_flags(args: argparse.Namespace, helps: dict[str, str]) -> dict:
    """The options of :func:`add_config_arguments` (without defaults) that were given."""
    return {name: getattr(args, name) for name in helps if getattr(args, name) is not None}


def add_slide_arguments(parser: argparse.ArgumentParser) -> None:
    """--slide, --slide-id and --mpp: the slide a command opens."""
    parser.add_argument("--slide", required=True, help="slide file (anything OpenSlide opens)")
    parser.add_argument("--slide-id", help="slide name used in messages and outputs (default: the file's stem)")
    parser.add_argument("--mpp", type=float, help="level-0 µm/px; overrides the file's value (sheet column `mpp`)")


# ----------------------------------------------------------------------------- tissue


TISSUE_OPTIONS = {
    "min_saturation": "floor of the saturation threshold, 0..1",
    "dark_threshold": "brightest channel below this (0..1) is an artefact",
    "close_radius": "closing radius in thumbnail px",
    "min_object_fraction": "drop tissue pieces smaller than this fraction of the thumbnail",
    "max_hole_fraction": "fill holes up to this fraction of the thumbnail",
}


def add_tissue_arguments(parser) -> None:
    """The tissue-mask options (the config's `tissue` section)."""
    from ..wsi.tissue import TissueParams

    parser.add_argument("--mode", choices=["auto", "brightfield", "fluorescence"], default="auto",
                        help="tissue detection: auto (dark background = fluorescence), brightfield or fluorescence")
    add_config_arguments(parser, TissueParams, TISSUE_OPTIONS)
    parser.add_argument("--no-pen-removal", dest="remove_pen", action="store_false", help="keep blue/green ink")
    parser.add_argument("--min-tissue-fraction", type=float, default=1e-3,
                        help="fail when less than this fraction of the thumbnail is tissue")


def tissue_params(args: argparse.Namespace):
    """The :class:`~msamil_core.wsi.tissue.TissueParams` of :func:`add_tissue_arguments`' options."""
    from ..wsi.tissue import TissueParams

    return TissueParams(mode=args.mode, remove_pen=args.remove_pen, **{name: getattr(args, name) for name in TISSUE_OPTIONS})


# ----------------------------------------------------------------------------- patches


PATCH_OPTIONS = {
    "patch_size": "patch size in px at each magnification",
    "min_fraction": "minimum selection-mask fraction of a kept patch",
    "base_mpp": "µm/px that defines 20x",
    "random_n": "the random strategy: N random tissue patches at 20x (N/4 at 10x, N/16 at 5x)",
    "random_seed": "seed of the random strategy",
}


def add_patch_arguments(parser) -> None:
    """Patch grids (the config's `patches` section); ``random_n`` is ``--random N``."""
    from ..pipeline import PatchSettings

    add_config_arguments(parser, PatchSettings, PATCH_OPTIONS, flags={"random_n": "--random"})


def patch_settings(args: argparse.Namespace):
    from ..pipeline import PatchSettings

    return PatchSettings(**{name: getattr(args, name) for name in PATCH_OPTIONS})


def add_output_arguments(parser) -> None:
    """--strategy-out, --geojson and --geojson-strategy (also `msamil preprocess`'s)."""
    parser.add_argument("--strategy-out", action="append", default=[], metavar="NAME:SCALE=H5",
                        help="the file of one strategy (lesion, tissue, random) and scale (20x, 10x, 5x), repeatable "
                        "(`msamil coords`: instead of --out-*)")
    parser.add_argument("--geojson", metavar="FILE",
                        help="also export the masks and one strategy's patch grids as QuPath GeoJSON, as "
                        "`msamil export-geojson` does")
    parser.add_argument("--geojson-strategy", choices=["lesion", "tissue", "random"],
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


def add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    """The encoder options (the config's `encoders` entries)."""
    enc = parser.add_argument_group("encoder")
    enc.add_argument("--encoder-checkpoint",
                     help="an e2e checkpoint (results/e2e/<name>/fold<k>/checkpoint.pt): its tuned encoder, with the "
                     "name, input size, normalisation and options it was trained with; replaces the other encoder options")
    enc.add_argument("--encoder", default="msfem",
                     help="a preset (`msamil list-models`: uni_v1, virchow2, resnet50_trunc, ...), msfem or a timm model "
                     "name (default msfem)")
    enc.add_argument("--weights", help="weights: a local file (.safetensors, .bin, .pth), a folder with the model's "
                     "published files, or hf-hub:<org>/<repo> fetched by `msamil fetch-weights`; default: random init")
    enc.add_argument("--input-size", type=int,
                     help="patch side fed to the encoder, px (default: the preset's, else 224; paper: 512)")
    rgb = ("R", "G", "B")
    enc.add_argument("--mean", type=float, nargs=3, metavar=rgb, help="normalisation mean (default: the preset's, "
                     "else ImageNet)")
    enc.add_argument("--std", type=float, nargs=3, metavar=rgb, help="normalisation std (default: the preset's, "
                     "else ImageNet)")
    enc.add_argument("--encoder-arg", action="append", default=[], metavar="KEY=VALUE",
                     help="encoder option, repeatable; VALUE is read as JSON when it parses (msfem: depth=2 heads=8 "
                     "dim=512 backbone=efficientnet_b3 backbone_weights=FILE; timm: e.g. init_values=1e-5)")
    enc.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default 0)")


def encoder_spec(args: argparse.Namespace):
    """The :class:`~msamil_core.features.encoders.EncoderSpec` of :func:`add_encoder_arguments`'
    options (an e2e checkpoint's tuned encoder with ``--encoder-checkpoint``)."""
    from ..features.encoders import EncoderSpec

    if getattr(args, "encoder_checkpoint", None):
        from ..training.e2e import encoder_spec_from_checkpoint

        return encoder_spec_from_checkpoint(args.encoder_checkpoint)
    if args.input_size is not None and args.input_size < 1:
        raise MsamilError(f"--input-size must be at least 1, got {args.input_size}")
    return EncoderSpec(name=args.encoder, weights=args.weights, input_size=args.input_size,
                       mean=tuple(args.mean) if args.mean else None, std=tuple(args.std) if args.std else None,
                       kwargs=parse_encoder_args(args.encoder_arg), seed=args.seed)


def parse_encoder_args(items: list[str]) -> dict:
    """``["depth=2", "backbone=efficientnet_b3"]`` -> ``{"depth": 2, "backbone": "efficientnet_b3"}``."""
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MsamilError(f"--encoder-arg {item!r}: expected KEY=VALUE, e.g. depth=2")
        try:
            kwargs[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.strip()] = value  # a bare string such as a model or file name
    return kwargs


def add_extract_arguments(parser: argparse.ArgumentParser) -> None:
    """Batch size, reader processes, device, threads, fp16, progress."""
    rt = parser.add_argument_group("runtime")
    rt.add_argument("--batch-size", type=int, default=32, help="patches per forward pass (default 32)")
    rt.add_argument("--workers", type=int, default=2, help="reader processes decoding patches (0 = none; default 2)")
    rt.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    rt.add_argument("--threads", type=int, help="torch threads for the model (default: torch's choice)")
    rt.add_argument("--fp16", action="store_true", help="store features as float16 (computation unchanged)")
    rt.add_argument("--no-progress", action="store_true", help="no progress bar")


def extract_options(args: argparse.Namespace):
    """The :class:`~msamil_core.pipeline.ExtractOptions` of :func:`add_extract_arguments`; sets
    torch's threads."""
    from ..pipeline import ExtractOptions
    from ..runtime import set_threads

    set_threads(args.threads)
    return ExtractOptions(batch_size=args.batch_size, workers=args.workers, device=args.device, fp16=args.fp16,
                          progress=not args.no_progress)


# ----------------------------------------------------------------------------- lesion masks and annotations


def add_postprocess_arguments(parser: argparse.ArgumentParser, from_checkpoint: bool) -> None:
    """--threshold, --min-object-fraction, --max-hole-fraction; with ``from_checkpoint`` they
    default to the checkpoint's values (None here)."""
    from ..segmentation.postprocess import PostProcess

    d = PostProcess()
    where = "the checkpoint's" if from_checkpoint else "%(default)s"
    g = parser.add_argument_group("lesion mask")
    g.add_argument("--threshold", type=float, default=None if from_checkpoint else d.threshold,
                   help=f"lesion where the probability is at least this (default {where})")
    g.add_argument("--min-object-fraction", type=float, default=None if from_checkpoint else d.min_object_fraction,
                   help=f"drop lesion pieces smaller than this fraction of the thumbnail (default {where})")
    g.add_argument("--max-hole-fraction", type=float, default=None if from_checkpoint else d.max_hole_fraction,
                   help=f"fill holes in lesions up to this fraction of the thumbnail (default {where})")


def add_annotation_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that turn annotation files into lesion masks (classes, mask labels, bounds)."""
    from ..wsi.annotations import DEFAULT_IGNORE_CLASSES, DEFAULT_SUBTRACT_CLASSES, DEFAULT_TOLERANCE

    g = parser.add_argument_group("annotations")
    g.add_argument("--lesion-classes", nargs="+", metavar="PATTERN",
                   help="annotation classes that are lesion (shell patterns, case-insensitive, e.g. Tumor 'Carcinoma*'); "
                   "default: every class not ignored or subtracted")
    g.add_argument("--ignore-classes", nargs="*", metavar="PATTERN", default=list(DEFAULT_IGNORE_CLASSES),
                   help="classes that are not lesion when --lesion-classes is not given (default: %(default)s); "
                   "give the option with no pattern to ignore none")
    g.add_argument("--subtract-classes", nargs="*", metavar="PATTERN", default=list(DEFAULT_SUBTRACT_CLASSES),
                   help="classes cut out of the lesion, e.g. exclusion regions and CAMELYON16's ASAP group _2 "
                   "(default: %(default)s)")
    g.add_argument("--mask-labels", nargs="+", type=int, metavar="VALUE",
                   help="label values that are lesion in a label-image annotation (default: any nonzero pixel)")
    g.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="how far vertices may lie outside the slide, as a fraction of its width/height "
                   "(default %(default)s)")


def class_rules(args: argparse.Namespace):
    from ..wsi.annotations import ClassRules

    return ClassRules(lesion=args.lesion_classes, ignore=args.ignore_classes, subtract=args.subtract_classes)


# ----------------------------------------------------------------------------- cohorts and folds


def add_fold_arguments(parser) -> None:
    """Sheet, folds and task options shared by train, evaluate and e2e."""
    parser.add_argument("--sheet", required=True, help="slide sheet (CSV/TSV with slide_id, path, label, patient_id; "
                        "train and evaluate read bags only and need no path)")
    parser.add_argument("--folds", help="folds.csv from `msamil splits`; default: made from the sheet")
    parser.add_argument("--fold", default="all", help="fold index, or `all` (default)")
    parser.add_argument("--n-folds", type=int, default=5, help="folds to make when --folds is not given (default 5)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of training patients used for validation")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the folds and validation parts")
    parser.add_argument("--classes", nargs="+", help="class order (default: sorted sheet labels)")
    parser.add_argument("--task", help="JSON: class name -> list of sheet labels (e.g. a two-class task)")


def load_folds(args: argparse.Namespace, sheet, out_dir=None):
    """folds.csv from --folds, or made from the sheet (and written to out_dir/folds.csv)."""
    from ..training.splits import make_folds, read_folds, write_folds

    if args.folds:
        return read_folds(args.folds)
    folds = make_folds(sheet, n_folds=args.n_folds, seed=args.split_seed)
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
