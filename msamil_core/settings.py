"""Every setting msamil has, declared once: name, type, default, bounds and help.

Each section of the config (``tissue``, ``patches``, ``training``, ...) is a dataclass below;
each field is one setting, made with :func:`setting`. Everything else derives from these
classes, so that no two places can disagree:

* the config's validation and defaults (:func:`load_config`: an unknown key or value fails in one
  line naming it and the closest valid name; types are coerced, YAML 1.1's ``1e-6`` included);
* ``config/config.yaml``, the documented defaults (:func:`render_config`, ``msamil config``);
* each ``msamil`` command's options, defaults and help (:func:`add_arguments`,
  :func:`from_args` in :mod:`msamil_core.cli.options`);
* the options the workflow passes to the commands (:func:`cli_args`);
* the core's settings objects: the same classes reach the functions that compute.

Dataclasses (not pydantic): the standard library only, so that Snakemake's parse of the
workflow imports this module in milliseconds, and no dependency outside the design card.

A field is a setting of the experiment, not of the machine: threads, devices and progress bars
are command-line options only.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import math
import re
import shlex
import textwrap
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar

from .errors import MsamilError

#: Magnifications, finest first (µm/px: base_mpp, 2x, 4x).
SCALES = ("20x", "10x", "5x")
#: Patch-selection strategies (MsaMIL-Net Table 1); ``auto`` is lesion where a lesion mask can be
#: had (annotations or a segmentation checkpoint), else tissue.
STRATEGIES = ("lesion", "tissue", "random")
TISSUE_MODES = ("auto", "brightfield", "fluorescence")
BALANCE_CHOICES = ("loss", "sampling", "none")
MONITOR_CHOICES = ("val_loss", "val_auc", "val_balanced_accuracy")
FREEZE_CHOICES = ("none", "all_but_head")
#: Equal-width confidence bins of the expected calibration error and the reliability diagram.
ECE_BINS = 10
#: Annotation classes that are not lesion unless ``lesion_classes`` names them: non-lesion tissue
#: and QuPath's housekeeping classes.
DEFAULT_IGNORE_CLASSES = ("Other", "Ignore*", "Region*", "Stroma", "Immune cells", "Normal*", "Background", "Tissue")
#: Classes cut out of the lesion: exclusion regions and CAMELYON16's ASAP group ``_2``.
DEFAULT_SUBTRACT_CLASSES = ("Exclu*", "_2")
NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"


def setting(default: Any = MISSING, help: str = "", *, min: float | None = None, max: float | None = None,
            above: float | None = None, below: float | None = None, choices: tuple | None = None,
            pattern: str | None = None, length: int | None = None, flag: str | None = None, cli: bool = True,
            auto: bool = False) -> Any:
    """One setting: its default (none: required), a one-line help (config.yaml's comment and the
    command's ``--help``), and what a value must be: ``min``/``max`` (inclusive) and
    ``above``/``below`` (exclusive) for numbers and each number of a list, ``choices`` and
    ``pattern`` for strings (each string of a list), ``length`` for lists. ``flag`` names the
    command-line option when ``--<name>`` would clash; ``cli=False`` keeps a setting out of the
    commands (the workflow alone uses it). ``auto=True``: the value may also be the word ``auto``
    (the code that uses the setting decides then, e.g. from the job's threads)."""
    meta = {"help": help, "min": min, "max": max, "above": above, "below": below, "choices": choices,
            "pattern": pattern, "length": length, "flag": flag, "cli": cli, "auto": auto}
    if default is MISSING:
        return field(metadata=meta)
    if isinstance(default, (list, dict, tuple)):
        value = list(default) if isinstance(default, tuple) else default
        return field(default_factory=functools.partial(copy.deepcopy, value), metadata=meta)
    return field(default=default, metadata=meta)


def section(default_factory, help: str) -> Any:
    """A field holding a whole section (a :class:`Section` subclass)."""
    return field(default_factory=default_factory, metadata={"help": help, "cli": False})


# ----------------------------------------------------------------------------- types and values


def unwrap_optional(tp) -> tuple[Any, bool]:
    """(the type, whether None is allowed) of ``X | None`` or ``X``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"settings support `X | None` only, not {tp}")
        return args[0], True
    return tp, False


def is_section(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, Section)


@functools.lru_cache(maxsize=None)
def fields_of(cls) -> tuple[tuple[dataclasses.Field, Any], ...]:
    """(field, resolved type) of every setting of a section class, in declaration order."""
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls))


def default_of(f: dataclasses.Field) -> Any:
    """A field's default value (MISSING when the setting is required)."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def flag_of(f: dataclasses.Field) -> str:
    """The command-line option of a setting: ``--<name with dashes>`` unless it names its own."""
    return f.metadata.get("flag") or f"--{f.name.replace('_', '-')}"


def describe(tp) -> str:
    """What a value of type ``tp`` is, in words ("a number", "a list of strings", ...)."""
    tp, optional = unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin is list:
        words = describe(typing.get_args(tp)[0]).replace("a ", "", 1).replace("an ", "", 1)
        text = f"a list of {words}s"
    elif origin is dict or tp is dict:
        text = "a mapping"
    elif is_section(tp):
        text = f"a mapping of {tp.KEY or 'settings'}"
    else:
        text = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(tp, str(tp))
    return f"{text} or null" if optional else text


def _bounds_text(meta: dict) -> str:
    parts = [f">= {meta['min']}" if meta.get("min") is not None else "",
             f"> {meta['above']}" if meta.get("above") is not None else "",
             f"<= {meta['max']}" if meta.get("max") is not None else "",
             f"< {meta['below']}" if meta.get("below") is not None else ""]
    return " and ".join(p for p in parts if p)


def _check_scalar(value, tp, meta: dict, label: str):
    """One scalar value coerced to ``tp`` and checked against the field's bounds and choices."""
    wrong = MsamilError(f"{label} must be {describe(tp)}, got {value!r}")
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not value.is_integer()):
            raise wrong
        value = int(value)
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise wrong from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise wrong
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise wrong
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        ok = ((meta.get("min") is None or value >= meta["min"]) and (meta.get("max") is None or value <= meta["max"])
              and (meta.get("above") is None or value > meta["above"])
              and (meta.get("below") is None or value < meta["below"]))
        if not ok:
            raise MsamilError(f"{label} must be {_bounds_text(meta)}, got {value!r}")
    if isinstance(value, str):
        choices = meta.get("choices")
        if choices and value not in choices:
            raise MsamilError(f"{label} must be one of {', '.join(choices)}, got {value!r}{did_you_mean(value, choices)}")
        if meta.get("pattern") and not re.match(meta["pattern"], value):
            raise MsamilError(f"{label} {value!r} may hold only letters, digits and {_pattern_extras(meta['pattern'])}")
    return value


def _pattern_extras(pattern: str) -> str:
    extras = pattern.replace("^[A-Za-z0-9", "").replace("]+$", "")
    return " ".join(f"'{c}'" for c in extras.replace("\\", "")) or "nothing else"


def check_value(value, tp, meta: dict, label: str):
    """A value as the setting of type ``tp`` holds it: coerced (numbers, YAML's ``1e-6``) and
    checked (bounds, choices, pattern, list length), or an error naming ``label``."""
    tp, optional = unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise MsamilError(f"{label} must be {describe(tp)}, got null")
    if meta.get("auto") and isinstance(value, str):
        if value == "auto":
            return value
        try:  # a number given on the command line or as a YAML string
            value = tp(value)
        except ValueError:
            raise MsamilError(f"{label} must be {describe(tp)} or auto, got {value!r}") from None
    origin = typing.get_origin(tp)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise MsamilError(f"{label} must be {describe(tp)}, got {value!r}")
        if meta.get("length") is not None and len(value) != meta["length"]:
            raise MsamilError(f"{label} must have {meta['length']} values, got {len(value)}: {value!r}")
        (item,) = typing.get_args(tp)
        return [check_value(v, item, meta, f"{label}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise MsamilError(f"{label} must be a mapping, got {value!r}")
        args = typing.get_args(tp)
        if not args:
            return dict(value)
        return {str(k): check_value(v, args[1], {}, f"{label}.{k}") for k, v in value.items()}
    if is_section(tp):
        return value if isinstance(value, tp) else tp.from_config(value, label.removeprefix("config: "))
    return _check_scalar(value, tp, meta, label)


def closest(value: str, choices, cutoff: float = 0.6) -> str | None:
    """The choice most similar to ``value`` (ignoring case), or None when none is close enough."""
    by_lower: dict[str, str] = {}
    for choice in choices:
        by_lower.setdefault(str(choice).lower(), str(choice))
    match = difflib.get_close_matches(str(value).lower(), list(by_lower), n=1, cutoff=cutoff)
    return by_lower[match[0]] if match else None


def did_you_mean(value: str, choices) -> str:
    """``; did you mean 'x'?`` for the closest of ``choices`` (empty when none is close)."""
    match = closest(value, choices)
    return f"; did you mean {match!r}?" if match else ""


def unknown_key(path: str, key: str, known) -> MsamilError:
    """One line naming an unknown key and the closest valid one."""
    where = f"{path}.{key}" if path else key
    hint = did_you_mean(key, known)
    return MsamilError(f"config: unknown key `{where}`{hint or '; valid keys: ' + ', '.join(sorted(known))}")


# ----------------------------------------------------------------------------- sections


class Section:
    """A section of settings: fields made with :func:`setting`, checked on construction.

    ``KEY`` is the section's config key. Subclasses add cross-field checks in :meth:`check`.
    Constructed directly (commands, tests), a bad value fails naming ``KEY.field (--flag)``;
    through :meth:`from_config`, naming the config path.
    """

    KEY: ClassVar[str] = ""

    def __post_init__(self):
        for f, tp in fields_of(type(self)):
            label = f"{self.KEY}.{f.name}" if self.KEY else f.name
            if f.metadata.get("cli", True) and not is_section(unwrap_optional(tp)[0]):
                label += f" ({flag_of(f)})"
            setattr(self, f.name, check_value(getattr(self, f.name), tp, f.metadata, label))
        self.check()

    def check(self) -> None:
        """Checks across fields (override); raise :class:`MsamilError` with one line."""

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f, _ in fields_of(cls)]

    @classmethod
    def from_config(cls, values, path: str = ""):
        """A section from a config mapping: unknown keys named with the closest valid one, each
        value checked under its config path, missing ones at their defaults."""
        path = path or cls.KEY
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise MsamilError(f"config: {path} must be a mapping of settings, got {values!r}")
        known = cls.names()
        for key in values:
            if key not in known:
                raise unknown_key(path, str(key), known)
        types_ = dict((f.name, (f, tp)) for f, tp in fields_of(cls))
        checked = {k: check_value(v, types_[k][1], types_[k][0].metadata, f"config: {path + '.' if path else ''}{k}")
                   for k, v in values.items()}
        missing = [n for n, (f, _) in types_.items() if n not in checked and default_of(f) is MISSING]
        if missing:
            raise MsamilError(f"config: {path} needs `{missing[0]}` ({types_[missing[0]][0].metadata['help']})")
        try:
            return cls(**checked)
        except MsamilError as exc:
            raise MsamilError(f"config: {path}: {exc}") from None

    @classmethod
    def from_dict(cls, values: dict, where: str = ""):
        """A section from a plain mapping (a command's ``--experiment`` JSON): unknown keys refused."""
        known = cls.names()
        unknown = [k for k in values if k not in known]
        if unknown:
            raise MsamilError(f"{where or cls.KEY or cls.__name__}: unknown option {unknown[0]!r}"
                              f"{did_you_mean(unknown[0], known) or '; valid: ' + ', '.join(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        """The settings as plain JSON-able values (sections as mappings)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def cli_args(obj: Section, only=None, exclude=()) -> list[str]:
    """The command-line tokens that give a command exactly these settings (the fields with
    ``cli=True``, or those named in ``only``): ``--flag value``, lists as several values, mappings
    as JSON, booleans as ``--flag``/``--no-flag``; a null value is left out (the command's default
    is the setting's, null for every setting that may be null)."""
    out = []
    for f, tp in fields_of(type(obj)):
        if (only is not None and f.name not in only) or f.name in exclude:
            continue
        if only is None and not f.metadata.get("cli", True):
            continue
        value = getattr(obj, f.name)
        flag = flag_of(f)
        if value is None:
            continue
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            out += [flag, *(_token(v) for v in value)]
        elif isinstance(value, dict):
            out += [flag, json.dumps(value, sort_keys=True)]
        else:
            out += [flag, _token(value)]
    return out


def _token(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def shell_args(obj: Section, only=None, exclude=()) -> str:
    """:func:`cli_args` as one shell-quoted string."""
    return shlex.join(cli_args(obj, only, exclude))


# ----------------------------------------------------------------------------- the sections


@dataclass(kw_only=True)
class DemoSettings(Section):
    """The built-in synthetic cohort (`msamil demo`): pyramidal TIFFs with lesions and
    annotations; when `slides` is this sheet, the workflow makes the cohort first."""

    KEY: ClassVar[str] = "demo"
    sheet: str = setting("demo_data/slides.csv", "where the demo writes its sheet; the slides go beside it",
                         cli=False)
    n_slides: int = setting(30, "slides in the demo cohort", min=3)
    seed: int = setting(0, "seed of the demo cohort (the same seed writes byte-identical files)", min=0)


@dataclass(kw_only=True)
class ScreeningSettings(Section):
    """Screening (`msamil screen`): before any per-slide step every slide is opened, its
    thumbnail-level image decoded and its tissue found, and its annotation parsed. An unusable
    slide is left out of the run (a malformed annotation: only the annotation), with its reason
    in results/cohort/left_out.csv and the report; fix the file and rerun to bring it back."""

    KEY: ClassVar[str] = "screening"
    leave_out: bool = setting(True, "leave unusable slides out of the run (false: any unusable slide stops it)")
    max_left_out: float = setting(0.1, "stop (naming the first reasons) when more than this share of the slides "
                                  "is unusable", min=0, max=1)


@dataclass(kw_only=True)
class ThumbnailSettings(Section):
    """Thumbnails: tissue and lesion masks are made at this size (MsaMIL-Net segments at 1024)."""

    KEY: ClassVar[str] = "thumbnail"
    long_side: int = setting(1024, "thumbnail long side in px, aspect kept", min=16)


@dataclass(kw_only=True)
class TissueSettings(Section):
    """Tissue masks on the thumbnail. Brightfield: saturation above Otsu's threshold, minus ink
    and dark artefacts; fluorescence (dark background): local signal density."""

    KEY: ClassVar[str] = "tissue"
    mode: str = setting("auto", "auto (a dark background means fluorescence), brightfield or fluorescence",
                        choices=TISSUE_MODES)
    min_saturation: float = setting(0.05, "floor of the Otsu saturation threshold (0..1)", min=0, max=1)
    remove_pen: bool = setting(True, "remove blue and green ink")
    dark_threshold: float = setting(0.25, "pixels whose brightest channel is below this (0..1) and that are grey, "
                                    "not stained, are artefacts (black ink, dust); dark nuclei and keratin stay "
                                    "tissue", min=0, max=1)
    close_radius: int = setting(2, "morphological closing radius, thumbnail px", min=0)
    # The areas are µm², read through the thumbnail's µm/px (meta.json); a thumbnail without one
    # falls back to the fractions below.
    min_object_area: float = setting(10000.0, "drop tissue pieces smaller than this, µm² (10,000 µm²: a disc 113 µm "
                                     "across, under 70 % of one 256-px 20x patch: dust and debris)", min=0)
    max_hole_area: float = setting(25000.0, "fill holes up to this, µm² (25,000 µm²: a disc 180 µm across; the "
                                   "gaps that are tissue: nuclei, fat cells (5,000-15,000 µm²), capillaries, "
                                   "tears, small gland lumina; larger lumina (ducts, vessels, cysts) and the glass "
                                   "between tissue pieces (mm²) stay out)", min=0)
    min_object_fraction: float = setting(0.0002, "without the thumbnail's µm/px: drop tissue pieces smaller than "
                                         "this fraction of the thumbnail", min=0, max=1)
    max_hole_fraction: float = setting(0.001, "without the thumbnail's µm/px: fill holes up to this fraction of the "
                                       "thumbnail", min=0, max=1)
    min_tissue_fraction: float = setting(0.001, "less tissue than this fraction of the thumbnail fails the slide "
                                         "(\"no tissue\")", min=0, max=1)


@dataclass(kw_only=True)
class PatchSettings(Section):
    """Patch grids at 20x, 10x and 5x (µm/px: base_mpp, 2x, 4x), kept where the selection mask
    covers min_fraction of a patch."""

    KEY: ClassVar[str] = "patches"
    patch_size: int = setting(256, "px at each magnification (paper: 512; 256 keeps the CPU demo fast)", min=8)
    min_fraction: float = setting(0.7, "keep patches with at least this fraction of the selection mask "
                                  "(MsaMIL-Net: 0.7)", above=0, max=1)
    base_mpp: float = setting(0.5, "µm/px that defines 20x", above=0)
    strategy: str = setting("auto", "patches experiments use unless they name one (MsaMIL-Net Table 1): lesion "
                            "(on the segmented lesion: needs annotations or segmentation.checkpoint), tissue (all "
                            "tissue), random (random_n random tissue patches), auto (lesion where the sheet has "
                            "annotations or segmentation.checkpoint is set, else tissue)",
                            choices=("auto", *STRATEGIES))
    random_n: int = setting(64, "random strategy: 20x patches per slide (a quarter at 10x, a sixteenth at 5x)",
                            min=1)
    random_seed: int = setting(0, "seed of the random strategy (drawn per slide)", min=0)

    def resolved_strategy(self, lesion_masks: bool) -> str:
        """``strategy``, with ``auto`` read as lesion when lesion masks can be had, else tissue."""
        return ("lesion" if lesion_masks else "tissue") if self.strategy == "auto" else self.strategy


@dataclass(kw_only=True)
class PostProcessSettings(Section):
    """From lesion probabilities to the lesion mask (thumbnail px)."""

    threshold: float = setting(0.5, "lesion where the probability is at least this", above=0, below=1)
    min_object_fraction: float = setting(0.0005, "drop lesion pieces smaller than this fraction of the thumbnail",
                                         min=0, max=1)
    max_hole_fraction: float = setting(0.001, "fill holes in lesions up to this fraction of the thumbnail",
                                       min=0, max=1)


@dataclass(kw_only=True)
class AnnotationSettings(Section):
    """Which annotation classes are lesion, and how annotations become masks."""

    lesion_classes: list[str] | None = setting(None, "annotation classes that are lesion (shell patterns, "
                                               "case-insensitive); null = every class not ignored or subtracted")
    ignore_classes: list[str] = setting(DEFAULT_IGNORE_CLASSES, "classes that are not lesion when lesion_classes is "
                                        "null ([] = none)")
    subtract_classes: list[str] = setting(DEFAULT_SUBTRACT_CLASSES, "classes cut out of the lesion (exclusion "
                                          "regions, CAMELYON16's _2)")
    mask_labels: list[int] | None = setting(None, "label values that are lesion in a label-image annotation; "
                                            "null = any nonzero pixel", min=0)
    tolerance: float = setting(0.01, "how far vertices may lie outside the slide, as a fraction of its width and "
                               "height", min=0)


@dataclass(kw_only=True)
class SegmentationTraining(Section):
    """The lesion model and its training (`msamil segment-train`)."""

    checkpoint: str | None = setting(None, "a trained `msamil segment-train` checkpoint to use instead of "
                                     "training one", cli=False)
    encoder: str = setting("resnet18", "segmentation_models_pytorch encoder (resnet34, efficientnet-b0, "
                           "tu-<timm name>, ...)")
    encoder_weights: str | None = setting(None, "local state dict of that encoder; null = random init")
    encoder_depth: int = setting(5, "encoder stages", min=1, max=5)
    decoder_channels: list[int] = setting([128, 64, 32, 16, 16], "UNet++ decoder widths, one per encoder stage "
                                          "(smp's default: 256 128 64 32 16)", min=1)
    input_size: int = setting(128, "long side (px) the network sees the thumbnail at (paper: 1024; the demo's "
                              "lesions are large, and 128 px reaches hold-out IoU ~0.86 in a minute)", min=32)
    crop_size: int = setting(0, "train on random square crops of this many px; 0 = whole thumbnails", min=0)
    epochs: int = setting(8, "epochs", min=1)
    batch_size: int = setting(4, "thumbnails per batch", min=1)
    lr: float = setting(0.002, "peak AdamW learning rate", above=0)
    min_lr: float = setting(1e-05, "learning rate at the end of the cosine decay", min=0)
    warmup_epochs: float = setting(1.0, "linear warm-up, epochs", min=0)
    weight_decay: float = setting(0.0001, "AdamW weight decay", min=0)
    grad_clip: float = setting(1.0, "max gradient norm; 0 = off", min=0)
    grad_accum: int = setting(1, "batches per optimizer step", min=1)
    patience: int = setting(0, "stop after this many epochs without a better validation IoU (0 = never)", min=0)
    bce_weight: float = setting(1.0, "weight of BCE in the loss", min=0)
    dice_weight: float = setting(1.0, "weight of soft Dice in the loss", min=0)
    holdout_fraction: float = setting(0.2, "annotated patients never trained on (the reported IoU)", min=0, below=1)
    val_fraction: float = setting(0.2, "annotated patients that pick the best epoch", min=0, below=1)
    augment: bool = setting(True, "flips, 90-degree rotations and colour jitter")
    hue: float = setting(0.04, "max hue shift, fraction of the colour circle", min=0)
    saturation: float = setting(0.25, "max relative saturation change", min=0)
    brightness: float = setting(0.2, "max relative brightness change", min=0)
    contrast: float = setting(0.2, "max relative contrast change", min=0)
    seed: int = setting(0, "seed of the patient split, the initialisation and the augmentation", min=0)

    def check(self) -> None:
        multiple = 2**self.encoder_depth
        if self.crop_size and self.crop_size < 32:
            raise MsamilError(f"crop_size must be 0 (off) or at least 32 px, got {self.crop_size}")
        if self.crop_size % multiple:
            raise MsamilError(f"crop_size must be a multiple of {multiple} (2^encoder_depth), "
                              f"got {self.crop_size}")
        if len(self.decoder_channels) != self.encoder_depth:
            raise MsamilError(f"decoder_channels needs one width per encoder stage ({self.encoder_depth}), "
                              f"got {self.decoder_channels}")
        if self.holdout_fraction + self.val_fraction >= 1:
            raise MsamilError("holdout_fraction + val_fraction must leave patients to train on")

    @property
    def multiple(self) -> int:
        """Input sides must be multiples of this (px)."""
        return 2**self.encoder_depth



@dataclass(kw_only=True)
class SegmentationSettings(AnnotationSettings, PostProcessSettings, SegmentationTraining):
    """Lesion segmentation: UNet++ (segmentation-models-pytorch) on the thumbnail, trained on the
    slides with an `annotation`; a share of the annotated patients is held out and their IoU
    reported (results/segmentation/metrics.json and the report)."""

    KEY: ClassVar[str] = "segmentation"

    def postprocess(self) -> PostProcessSettings:
        return PostProcessSettings(**{k: getattr(self, k) for k in PostProcessSettings.names()})

    def annotations(self) -> AnnotationSettings:
        return AnnotationSettings(**{k: getattr(self, k) for k in AnnotationSettings.names()})


@dataclass(kw_only=True)
class EncoderSettings(Section):
    """A patch encoder: a preset (`msamil list-models`: uni_v1, virchow2, resnet50_trunc, ...),
    msfem (MsaMIL-Net's EfficientNet-B3 + Transformer) or any timm model."""

    KEY: ClassVar[str] = "encoders.<key>"
    name: str = setting("msfem", "a preset, msfem or a timm model name", flag="--encoder")
    weights: str | None = setting(None, "local file (.safetensors/.bin/.pth) or folder, or hf-hub:<org>/<repo> "
                                  "(fetched once by fetch_weights; gated repos: HF_TOKEN); null = random init")
    input_size: int | None = setting(None, "px fed to the encoder (paper: 512); null = the preset's (224 for "
                                     "other names)", min=16)
    seed: int = setting(0, "seed of the random initialisation", min=0)
    mean: list[float] | None = setting(None, "normalisation mean (R, G, B); null = the preset's (ImageNet's)",
                                       length=3)
    std: list[float] | None = setting(None, "normalisation std (R, G, B); null = the preset's (ImageNet's)",
                                      length=3, above=0)
    options: dict = setting({}, "encoder options (an allowlist, no files or URLs), e.g. msfem: "
                            "{depth: 2, heads: 8}", flag="--encoder-options")


@dataclass(kw_only=True)
class FeatureSettings(Section):
    """Feature extraction: one job per slide and encoder writes the bags of every strategy the
    experiments use."""

    KEY: ClassVar[str] = "features"
    default_encoder: str = setting("resnet18_64", "the `encoders` key of experiments that name no encoder",
                                   cli=False)
    batch_size: int = setting(64, "patches per forward pass", min=1)
    workers: int = setting("auto", "reader processes decoding patches while the model runs; auto: on a GPU one "
                           "per thread of the job but the model's own, on the CPU none (patches are read between the "
                           "model's batches, which use every thread)", min=0, auto=True)
    fp16: bool = setting(False, "store features as float16 (computation unchanged)")
    server: bool = setting(True, "keep the encoder loaded between slides: each extraction job hands its slide to a "
                           "feature server on its machine that holds the model (one per user, encoder, settings, "
                           "device and concurrent job); false: every job loads the encoder itself")
    server_idle: float = setting(60.0, "seconds a feature server waits for the next slide before it exits", above=0)
    gpu_decode: bool = setting(False, "on a GPU, decode the slide's JPEG tiles there (nvJPEG) where the file allows; "
                               "patches differ from the CPU decoder's by about a grey level")

    def reader_processes(self, device_type: str, threads: int) -> int:
        """``workers`` as a number: ``auto`` is ``threads - 1`` (at least 1) on a GPU, 0 on the CPU."""
        if self.workers != "auto":
            return int(self.workers)
        return max(1, threads - 1) if device_type == "cuda" else 0


@dataclass(kw_only=True)
class SplitSettings(Section):
    """Folds: patient-level and label-stratified; patients keep their fold when slides are added."""

    KEY: ClassVar[str] = "splits"
    n_folds: int = setting(5, "folds", min=2)
    val_fraction: float = setting(0.2, "share of each fold's training patients used for validation", min=0, below=1)
    seed: int = setting(0, "seed of the fold placement and the validation parts", min=0, flag="--split-seed")


@dataclass(kw_only=True)
class TrainingKnobs(Section):
    """How one model is trained (the keys of `training` and of each experiment)."""

    epochs: int = setting(8, "epochs", min=1)
    lr: float = setting(0.0002, "peak learning rate (AdamW)", above=0)
    min_lr: float = setting(1e-06, "learning rate at the end of the cosine decay", min=0)
    warmup_epochs: float = setting(1.0, "linear warm-up, epochs", min=0)
    weight_decay: float = setting(0.01, "AdamW weight decay", min=0)
    grad_accum: int = setting(4, "bags per optimizer step (per process under torchrun)", min=1)
    grad_clip: float = setting(1.0, "max gradient norm; 0 = off", min=0)
    max_instances: int = setting(256, "random subsample of larger bags in training (0 = all); the demo's tissue "
                                 "bags hold ~500 patches, its lesion bags under 200 (paper.yaml: 8192)", min=0)
    balance: str = setting("loss", "class balance by loss weights, by sampling, or none", choices=BALANCE_CHOICES)
    patience: int = setting(3, "early stopping after this many epochs without a better validation metric "
                            "(0 = off)", min=0)
    monitor: str = setting("val_loss", "the validation metric that picks the best epoch", choices=MONITOR_CHOICES)
    seed: int = setting(0, "seed of the model, the bag order and the subsampling", min=0)
    bf16: bool = setting(True, "bf16 autocast on CUDA")
    workers: int = setting(0, "DataLoader workers loading bags", min=0)
    standardize: bool = setting(True, "z-score each feature dimension with the fold's training bags (stored in "
                                "the checkpoint)")
    temperature_scaling: bool = setting(False, "after training, fit one temperature T on the fold's validation "
                                        "slides (least NLL), stored in the checkpoint; evaluation and predict "
                                        "use softmax(logits / T) (same predicted classes, calibrated confidences)")
    ece_bins: int = setting(ECE_BINS, "equal-width confidence bins of the expected calibration error (ECE) and "
                            "the report's reliability diagrams", min=1)
    train_fraction: float | None = setting(None, "train on this share of each fold's training patients (per class, "
                                           "nested, the same for every experiment: learning curves); null = all",
                                           above=0, max=1)


@dataclass(kw_only=True)
class ModelSettings(Section):
    """Which MIL model, on which scales, from which start."""

    model: str = setting("abmil.base", "registered MIL model (`msamil list-models`)")
    model_args: dict = setting({}, "model options over the registered defaults, e.g. {embed_dim: 256}")
    scales: list[str] = setting(SCALES, "scales whose instances the model reads", choices=SCALES)
    init_from: str | None = setting(None, "start from another experiment's checkpoint of the same fold and "
                                    "repeat, or a weights file (MIL-Lab/FEATHER or ours)")
    freeze: str = setting("none", "train everything, or the classifier only", choices=FREEZE_CHOICES)

    def check(self) -> None:
        if not self.scales:
            raise MsamilError("an experiment needs at least one scale (20x, 10x, 5x)")
        if len(set(self.scales)) != len(self.scales):
            raise MsamilError(f"scales {self.scales} name a scale twice")


@dataclass(kw_only=True)
class TrainConfig(TrainingKnobs, ModelSettings):
    """One experiment's training, as `msamil train` takes it."""

    repeat: int = setting(0, "which repeat of the k-fold run this is (seeds the learning-curve draw)", min=0)


@dataclass(kw_only=True)
class TrainingSettings(TrainingKnobs):
    """Training defaults of every experiment (an experiment may override any of them)."""

    KEY: ClassVar[str] = "training"
    repeats: int = setting(1, "R: the k-fold run R times (seed + r), results/models/<experiment>/repeat<r>/fold<k>/ "
                           "for r > 0; the report's mean ± sd is over all R x k test folds", min=1, cli=False)
    repeat_splits: bool = setting(True, "each repeat on its own patient folds (splits.seed + r); false = every "
                                  "repeat on the first folds, only the seed differs", cli=False)


@dataclass(kw_only=True)
class ExperimentKeys(Section):
    """What names an experiment and where its inputs come from (the workflow's keys)."""

    name: str = setting(help="unique name: results/models/<name>/", pattern=NAME_PATTERN, cli=False)
    encoder: str | None = setting(None, "the `encoders` key of its features; null = features.default_encoder",
                                  cli=False)
    strategy: str | None = setting(None, "patch selection; null = patches.strategy", choices=("auto", *STRATEGIES),
                                   cli=False)
    task: str | None = setting(None, "a key of `tasks`: its classes and the slides it uses; null = the sheet's "
                               "labels", cli=False)
    ablation_of: str | None = setting(None, "the full model's experiment: the report's ablation section pairs "
                                      "them", cli=False)



@dataclass(kw_only=True)
class ExperimentSettings(TrainingSettings, ModelSettings, ExperimentKeys):
    """An experiment: a model trained and evaluated on every fold."""

    KEY: ClassVar[str] = "experiments[]"

    def train_config(self, **changes) -> TrainConfig:
        """What `msamil train` runs for this experiment."""
        values = {k: getattr(self, k) for k in TrainConfig.names() if hasattr(self, k)}
        return TrainConfig(**{**values, **changes})


@dataclass(kw_only=True)
class E2EConfig(Section):
    """End-to-end training of an encoder and a MIL model on K patches per slide, as `msamil e2e`
    takes it."""

    model: str = setting("msamil.base", "the MIL model trained jointly (`msamil list-models`)")
    model_args: dict = setting({}, "its options over the registered defaults")
    scales: list[str] = setting(SCALES, "scales patches are sampled from", choices=SCALES)
    k: int = setting(200, "patches sampled per slide and step (paper: 200)", min=1)
    epochs: int = setting(10, "epochs", min=1)
    lr: float = setting(0.0001, "the MIL model's peak learning rate", above=0)
    encoder_lr: float = setting(1e-05, "the encoder's peak learning rate", min=0)
    min_lr: float = setting(1e-06, "the MIL model's floor learning rate (the encoder's is scaled by encoder_lr / "
                            "lr)", min=0)
    warmup_epochs: float = setting(1.0, "linear warm-up, epochs", min=0)
    weight_decay: float = setting(0.01, "AdamW weight decay", min=0)
    grad_accum: int = setting(1, "slides per optimizer step", min=1)
    grad_clip: float = setting(1.0, "max gradient norm; 0 = off", min=0)
    balance: str = setting("loss", "class balance by loss weights, by sampling, or none", choices=BALANCE_CHOICES)
    seed: int = setting(0, "seed of the MIL model, the patch sampling and the slide order (the encoder's "
                        "initialisation has its own seed)", min=0, flag="--train-seed")
    bf16: bool = setting(True, "bf16 autocast on CUDA")
    checkpointing: bool = setting(True, "activation checkpointing of the encoder, chunk by chunk (less memory, "
                                  "more time)")
    chunk_size: int = setting(16, "patches per encoder forward", min=1)
    workers: int = setting(0, "reader processes reading the next slides' patches", min=0)
    standardize: bool = setting(True, "z-score features before the MIL model with the initial encoder's "
                                "statistics on training patches, as training does")
    patience: int = setting(0, "epochs without a lower validation loss before stopping (0 = never)", min=0)
    open_slides: int = setting(8, "slides kept open at once per reading process (the least recently read is "
                               "closed first)", min=1)
    k_study: list[int] | None = setting(None, "a list of K: train the same model k_study_steps steps with each and "
                                        "plot the training loss (Campanella et al.); null = no study", min=1)
    k_study_steps: int = setting(60, "optimizer steps per K of the K study", min=1)

    def check(self) -> None:
        if not self.scales:
            raise MsamilError("e2e needs at least one scale (20x, 10x, 5x)")


@dataclass(kw_only=True)
class E2EKeys(Section):
    """What names an end-to-end run and what it feeds (the workflow's keys)."""

    name: str = setting(help="results/e2e/<name>/ and features/e2e-<name>-fold<k>/", pattern=r"^[A-Za-z0-9_]+$",
                        cli=False)
    encoder: str = setting(help="the `encoders` key of the starting encoder", cli=False)
    experiments: list[str] = setting([], "experiments retrained on the tuned features as <experiment>_e2e_<name>",
                                     cli=False)
    folds: list[int] | None = setting(None, "the folds to run; null = all (the report compares on these)", min=0,
                                      cli=False)
    task: str | None = setting(None, "a key of `tasks`; null = the sheet's labels", cli=False)



@dataclass(kw_only=True)
class E2ESettings(E2EConfig, E2EKeys):
    """An end-to-end run (MsaMIL-Net sec. 3.4): one per fold on that fold's training slides; each
    fold's tuned encoder re-extracts that fold's features into results/features/e2e-<name>-fold<k>/,
    and each listed experiment is retrained on them as <experiment>_e2e_<name>."""

    KEY: ClassVar[str] = "e2e[]"

    def e2e_config(self) -> E2EConfig:
        return E2EConfig(**{k: getattr(self, k) for k in E2EConfig.names()})


@dataclass(kw_only=True)
class HeatmapSettings(Section):
    """Attention heatmaps (`msamil heatmap`): each listed experiment's fold-0 model drawn on the
    fold's test slides: results/heatmaps/<experiment>/fold0/<slide>/ and summary.csv."""

    KEY: ClassVar[str] = "heatmaps"
    experiments: list[str] | None = setting(None, "experiments to draw ([] = none); null = the first experiment",
                                            cli=False)
    top_k: int = setting(8, "patches per row of the top/bottom montage", min=1)


@dataclass(kw_only=True)
class PredictSettings(Section):
    """Classify new slides with a trained experiment (`msamil predict`): the chain from thumbnail
    to the fold models' ensemble, with the settings of the experiment's manifest."""

    KEY: ClassVar[str] = "predict"
    slides: str | None = setting(None, "sheet of new slides (slide_id, path [, label, mpp, annotation]); "
                                 "null = nothing to predict", cli=False)
    experiment: str | None = setting(None, "whose fold models classify them; null = the first experiment",
                                     cli=False)
    heatmaps: bool = setting(True, "also write attention heatmaps of each new slide", cli=False)
    min_patches: int = setting(16, "a bag with fewer patches is classified but flagged (the row's `note` and the "
                               "log): a few patches are weak evidence for a slide's class", min=1)


#: The demo's encoder: a randomly initialised ResNet-18 on 64-px patches (fast on a CPU).
DEMO_ENCODERS = {"resnet18_64": {"name": "resnet18", "input_size": 64}}


@dataclass(kw_only=True)
class Config(Section):
    """The whole configuration (config/config.yaml and the files and values given on top)."""

    slides: str = setting("demo_data/slides.csv", "slide sheet (CSV or TSV): slide_id, path, label, patient_id "
                          "[, mpp, annotation]; relative paths are taken from the sheet's folder. When this is "
                          "demo.sheet, the workflow first makes the demo cohort", cli=False)
    demo: DemoSettings = section(DemoSettings, DemoSettings.__doc__)
    screening: ScreeningSettings = section(ScreeningSettings, ScreeningSettings.__doc__)
    thumbnail: ThumbnailSettings = section(ThumbnailSettings, ThumbnailSettings.__doc__)
    tissue: TissueSettings = section(TissueSettings, TissueSettings.__doc__)
    patches: PatchSettings = section(PatchSettings, PatchSettings.__doc__)
    segmentation: SegmentationSettings = section(SegmentationSettings, SegmentationSettings.__doc__)
    export_geojson: bool = setting(True, "write results/slides/<slide>/patches.geojson (lesion and tissue outlines "
                                   "and the kept patch grids, level-0 px) for QuPath; the coordinates job writes it, "
                                   "so turning it on for a finished run remakes every slide's coordinates and bags",
                                   cli=False)
    encoders: dict[str, EncoderSettings] = setting(
        DEMO_ENCODERS, "patch encoders by key; features go to results/features/<key>-<hash of the entry>-<strategy>/, "
        "so editing an entry re-extracts into a new folder and leaves the coordinates alone. The default: a randomly "
        "initialised ResNet-18 on 64-px patches, the CPU demo's", cli=False)
    features: FeatureSettings = section(FeatureSettings, FeatureSettings.__doc__)
    splits: SplitSettings = section(SplitSettings, SplitSettings.__doc__)
    classes: list[str] | None = setting(None, "class order of experiments without a task; null = the sheet's "
                                        "labels, sorted")
    tasks: dict[str, dict[str, list[str]]] | None = setting(
        None, "tasks by name: class name -> the sheet labels it holds; an experiment with a task uses only those "
        "slides; every label a task names must be in the sheet", cli=False)
    training: TrainingSettings = section(TrainingSettings, TrainingSettings.__doc__)
    experiments: list[ExperimentSettings] | None = setting(
        None, "what to train and compare; null = the demo's experiments (config/demo.yaml) on the demo sheet, "
        "else msamil.base and abmil.base on all scales with the sheet's own labels", cli=False)
    heatmaps: HeatmapSettings = section(HeatmapSettings, HeatmapSettings.__doc__)
    predict: PredictSettings = section(PredictSettings, PredictSettings.__doc__)
    e2e: list[E2ESettings] = setting([], "end-to-end runs (MsaMIL-Net sec. 3.4); the CPU demo runs none "
                                     "(heavy): `--configfile config/e2e-demo.yaml` adds a small one", cli=False)

    @classmethod
    def from_config(cls, values, path: str = ""):
        """The config, each experiment merged over the `training` section (its defaults)."""
        if not isinstance(values, dict):
            raise MsamilError(f"config: must be a mapping of settings, got {values!r}")
        values = dict(values)
        experiments = values.pop("experiments", None)
        config = super().from_config(values, path)
        if experiments is not None:
            if not isinstance(experiments, list):
                raise MsamilError(f"config: experiments must be a list of experiments, got {experiments!r}")
            base = config.training.to_dict()
            known = ExperimentSettings.names()
            parsed = []
            for i, entry in enumerate(experiments):
                name = entry.get("name", i) if isinstance(entry, dict) else i
                where = f"experiments[{name}]" if isinstance(name, str) else f"experiments[{i}]"
                if not isinstance(entry, dict):
                    raise MsamilError(f"config: {where} must be a mapping of settings, got {entry!r}")
                for key in entry:
                    if key not in known:
                        raise unknown_key(where, str(key), known)
                parsed.append(ExperimentSettings.from_config({**base, **entry}, where))
            config.experiments = parsed
        return config


def load_config(values: dict) -> Config:
    """The config (a mapping, e.g. Snakemake's ``config``) as checked settings, defaults filled in."""
    return Config.from_config(values)


def merge(base: dict, overlay: dict) -> dict:
    """``overlay`` merged onto ``base`` as Snakemake merges config files: mappings key by key,
    anything else replaced."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def fill_nulls(config: dict, overlay: dict) -> dict:
    """``config`` with what it leaves unset (absent or null) taken from ``overlay``, mappings key
    by key: how config/demo.yaml fills in the demo's experiments under a user's config."""
    out = dict(config)
    for key, value in overlay.items():
        if out.get(key) is None:
            out[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = fill_nulls(out[key], value)
    return out


def with_demo(config: dict, demo: dict) -> dict:
    """``config`` on the demo's own sheet, with config/demo.yaml (``demo``) filling in what it
    leaves unset (:func:`fill_nulls`): the demo's tasks beside the config's, and, when the config
    names no experiments, the demo's experiments with their heatmap and predict experiments
    (these name the demo's experiments, so they come with them or not at all)."""
    if config.get("experiments") is not None:
        demo = {k: v for k, v in demo.items() if k not in ("experiments", "heatmaps", "predict")}
    return fill_nulls(config, demo)


# ----------------------------------------------------------------------------- JSON schema


def _schema_of(tp, meta: dict) -> dict:
    tp, optional = unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if is_section(tp):
        out = section_schema(tp)
    elif origin is list:
        out = {"type": "array", "items": _schema_of(typing.get_args(tp)[0], meta)}
        if meta.get("length") is not None:
            out.update(minItems=meta["length"], maxItems=meta["length"])
    elif origin is dict or tp is dict:
        args = typing.get_args(tp)
        out = {"type": "object", **({"additionalProperties": _schema_of(args[1], {})} if args else {})}
    else:
        out = {"type": {bool: "boolean", int: "integer", float: "number", str: "string"}[tp]}
        for key, word in (("min", "minimum"), ("max", "maximum"), ("above", "exclusiveMinimum"),
                          ("below", "exclusiveMaximum")):
            if meta.get(key) is not None and tp is not str:
                out[word] = meta[key]
        if meta.get("choices"):
            out["enum"] = list(meta["choices"])
        if meta.get("pattern"):
            out["pattern"] = meta["pattern"]
        if meta.get("auto"):
            out = {"anyOf": [out, {"const": "auto"}]}
    if optional:
        out = {"anyOf": [out, {"type": "null"}]}
    return out


def section_schema(cls) -> dict:
    """The JSON schema (draft 2020-12) of a section: its keys, types, bounds, defaults and help."""
    properties, required = {}, []
    for f, tp in fields_of(cls):
        prop = {**_schema_of(tp, f.metadata), "description": " ".join(f.metadata.get("help", "").split())}
        default = default_of(f)
        if default is MISSING:
            required.append(f.name)
        elif not is_section(unwrap_optional(tp)[0]):
            prop["default"] = json.loads(json.dumps(default))
        properties[f.name] = prop
    out = {"type": "object", "additionalProperties": False, "properties": properties}
    if cls.__doc__:
        out["description"] = " ".join(cls.__doc__.split())
    return {**out, **({"required": required} if required else {})}


def json_schema() -> dict:
    """The config's JSON schema, for editors and other tools (``msamil config --schema``); the
    workflow checks the config with :func:`load_config`, which says more in its messages."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "msamil configuration",
            **section_schema(Config)}


# ----------------------------------------------------------------------------- config.yaml


def _yaml_scalar(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:  # PyYAML reads 1e-06 as a string, 1.0e-06 as a float
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, str):
        plain = re.match(r"^[A-Za-z_][A-Za-z0-9_./<>-]*$", value) and value.lower() not in _YAML_WORDS
        return value if plain else json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False).replace('"', "") if _plain_flow(value) else json.dumps(value)
    return str(value)


def _plain_flow(value) -> bool:
    """Whether a list or mapping reads the same in YAML flow style without quotes."""
    items = value if isinstance(value, list) else [*value, *value.values()]
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) or
               isinstance(v, str) and re.match(r"^[A-Za-z0-9_][A-Za-z0-9_ .*-]*$", v) and v.lower() not in _YAML_WORDS
               and not re.fullmatch(r"[-+]?[0-9._]+([eE][-+]?[0-9]+)?", v) for v in items)


# words YAML 1.1 reads as booleans or null
_YAML_WORDS = {"true", "false", "null", "yes", "no", "on", "off", "y", "n", "~"}


def _comment(text: str, indent: str, width: int = 100) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(" ".join(text.split()), width - len(indent) - 2)]


def _render_fields(cls, values: dict, indent: str) -> list[str]:
    lines = []
    for f, tp in fields_of(cls):
        value = values.get(f.name)
        help_ = f.metadata.get("help", "")
        kind = unwrap_optional(tp)[0]
        if is_section(kind):
            lines += ["", *_comment(help_, indent), f"{indent}{f.name}:", *_render_fields(kind, value, indent + "  ")]
            continue
        item = typing.get_args(kind)[0] if typing.get_origin(kind) is list else None
        if is_section(item):  # a list of sections (experiments, e2e): their keys documented above
            lines += ["", *_comment(help_, indent), *_comment(f"Keys of each entry of `{f.name}`:", indent)]
            for g, _ in fields_of(item):
                if item is ExperimentSettings and g.name in TrainingKnobs.names():
                    continue
                text = f"{g.name}: {g.metadata.get('help', '')}"
                lines += [f"{indent}#   {line}" for line in textwrap.wrap(text, 94 - len(indent), subsequent_indent="  ")]
            if item is ExperimentSettings:
                lines += [f"{indent}#   and any key of `training`."]
            lines.append(f"{indent}{f.name}: {_yaml_scalar(value)}")
            continue
        args = typing.get_args(kind)
        if typing.get_origin(kind) is dict and args and is_section(args[1]):  # encoders: a mapping of sections
            lines += ["", *_comment(help_, indent), f"{indent}{f.name}:"]
            for key, entry in (value or {}).items():
                lines += [f"{indent}  {key}:", *_render_fields(args[1], entry, indent + "    ")]
            continue
        line = f"{indent}{f.name}: {_yaml_scalar(value)}"
        if len(line) + len(help_) + 4 <= 110:
            lines.append(f"{line}  # {help_}" if help_ else line)
        else:
            lines += ([""] if not indent else []) + [*_comment(help_, indent), line]
    return lines


def render_config() -> str:
    """config/config.yaml: every setting at its default, each with its help as a comment,
    sections with their description."""
    values = Config().to_dict()
    head = [
        "# msamil configuration: every setting, at its default, with what it does.",
        "# Generated from msamil_core/settings.py (`msamil config > config/config.yaml`); change a setting's",
        "# default or help there. Give your own values in a file of your own (snakemake --configfile my.yaml)",
        "# or on the command line (snakemake --config slides=my_cohort.csv): they are merged on top of these.",
        "# Every key and value is checked before any job runs; a misspelt one stops the run naming the closest",
        "# valid one. Paper settings for GPU users: config/paper.yaml. The demo's experiments: config/demo.yaml.",
    ]
    return "\n".join(head + [""] + _render_fields(Config, values, "")) + "\n"
