"""The experiment manifest: everything an experiment's models' inputs depend on, beside the models.

``results/models/<experiment>/manifest.json`` states, once, what the fold models were trained
on: the thumbnail, tissue and patch settings (with the strategy the experiment used), the lesion
model (its file and SHA-256) for lesion patches, the encoder (its settings, resolved input size,
normalisation and output rule, and its id, whose hash covers the weights), the stored precision,
the scales, classes and task, the training settings and the splits, each fold's temperature
(1.0 without temperature scaling); and the relations the
report draws (ablation of, transfer source, e2e run, repeats, learning-curve share). Paths in it
are relative to the manifest's folder (files under the results folder) or to the project.

Who reads it: ``msamil predict --models DIR`` takes every per-slide setting from it (a flag that
contradicts it stops the run naming both values), and the report its settings and relations.
:func:`write_manifest` checks it against the fold checkpoints before writing it: a checkpoint of
another model, encoder, classes or scales stops with one line naming both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import __version__, layout
from .errors import MsamilError
from .settings import EncoderSettings, PatchSettings, ThumbnailSettings, TissueSettings

FORMAT = 1


def run_of(path: str | os.PathLike, root: str | os.PathLike) -> tuple[int, int]:
    """(repeat, fold) of a checkpoint ``root/[repeat<r>/]fold<k>/checkpoint.pt`` (the layout of
    :func:`msamil_core.layout.fold_checkpoint`)."""
    parts = Path(os.path.relpath(path, root)).parts
    try:
        if len(parts) == 2 and parts[0].startswith("fold"):
            return 0, int(parts[0][4:])
        if len(parts) == 3 and parts[0].startswith("repeat") and parts[1].startswith("fold"):
            return int(parts[0][6:]), int(parts[1][4:])
    except ValueError:
        pass
    raise MsamilError(f"{path}: not an experiment's [repeat<r>/]fold<k>/checkpoint.pt under {root}")


def _relative(path: str | os.PathLike, root: Path) -> str:
    """A path as the manifest holds it: relative to the manifest's folder."""
    return Path(os.path.relpath(path, root)).as_posix()


def _differs(what: str, found, stated, where: str, out) -> MsamilError:
    return MsamilError(f"{where}: its {what} {found!r} differs from the experiment's settings ({stated!r}) that "
                       f"{out} would state; rerun the experiment's training with the current config")


def encoder_record(settings: dict) -> dict:
    """The manifest's encoder: its settings (with its config key), and what they resolve to:
    input size, normalisation and output rule of the preset or network, and the id that names its
    bags (name plus a hash covering the weights)."""
    from .features.encoders import EncoderSpec, encoder_id, output_rule

    key = settings.get("key")
    spec = EncoderSpec.from_settings(EncoderSettings(**{k: v for k, v in settings.items() if k != "key"}))
    return {"key": key, "settings": {k: v for k, v in settings.items() if k != "key"}, "id": encoder_id(spec),
            "input_size": spec.input_size, "mean": list(spec.mean), "std": list(spec.std), "output": output_rule(spec)}


def settings_record(experiment: str, *, thumbnail: ThumbnailSettings, tissue: TissueSettings, patches: PatchSettings,
                    encoder_key: str, encoder: EncoderSettings, fp16: bool, feature_folder: str, splits,
                    training, segmentation_checkpoint: str | None = None, task: str | None = None,
                    task_classes: dict | None = None, relations: dict | None = None) -> dict:
    """The settings :func:`write_manifest` takes (``msamil manifest --settings``): ``patches``
    with the strategy the experiment used (lesion needs ``segmentation_checkpoint``), the
    encoder's settings under its config key, ``training`` (a
    :class:`~msamil_core.settings.TrainConfig`), and the report's ``relations`` (ablation_of,
    init_from, e2e, repeats, repeat_splits, train_fraction)."""
    if patches.strategy == "lesion" and not segmentation_checkpoint:
        raise ValueError("an experiment on lesion patches needs its segmentation checkpoint")
    lesion = patches.strategy == "lesion"
    return {
        "experiment": experiment, "thumbnail": thumbnail.to_dict(), "tissue": tissue.to_dict(),
        "patches": patches.to_dict(),
        "segmentation": {"checkpoint": segmentation_checkpoint} if lesion else None,
        "encoder": {"key": encoder_key, **encoder.to_dict()},
        "features": {"fp16": fp16, "folder": feature_folder},
        "splits": splits.to_dict(),
        "task": {"name": task, "classes": task_classes} if task else None,
        "training": training.to_dict(),
        "relations": {"ablation_of": None, "init_from": None, "e2e": None, "repeats": 1, "repeat_splits": True,
                      "train_fraction": training.train_fraction, **(relations or {})},
    }


def write_manifest(settings: dict, checkpoints: list[str], out: str | os.PathLike) -> dict:
    """Write ``out`` (an experiment's manifest.json) from the workflow's ``settings``
    (:meth:`WorkflowConfig.manifest_settings <rules.workflow_config>`) and the experiment's fold
    checkpoints, after checking that each checkpoint was trained as the settings say (model,
    scales, encoder) and that all share their classes."""
    from .fileio import file_sha256, torch_load, write_json
    from .training.calibration import checkpoint_temperature

    out = Path(out)
    root = out.parent
    missing = [k for k in ("experiment", "thumbnail", "tissue", "patches", "encoder", "features", "splits", "task",
                           "training", "relations") if k not in settings]
    if missing:
        raise MsamilError(f"{out}: the experiment's settings lack {', '.join(missing)}; give what "
                          "msamil_core.manifest.settings_record makes (the workflow's write_manifest passes it)")
    training = settings["training"]
    e2e = (settings.get("relations") or {}).get("e2e")
    encoder = encoder_record(settings["encoder"])
    if e2e:  # each fold's features come from its own tuned encoder
        encoder = {"e2e": e2e, "initial": encoder}
    runs, classes, model_args = [], None, None
    for (repeat, fold), path in sorted((run_of(p, root), p) for p in checkpoints):
        ckpt = torch_load(path, "checkpoint", allow_numpy=True)
        if not isinstance(ckpt, dict) or "classes" not in ckpt:
            raise MsamilError(f"{path}: not an msamil checkpoint; rerun the experiment's training")
        if ckpt.get("model_name") != training["model"]:
            raise _differs("model", ckpt.get("model_name"), training["model"], path, out)
        scales = (ckpt.get("config") or {}).get("scales")
        if scales is not None and list(scales) != list(training["scales"]):
            raise _differs("scales", scales, training["scales"], path, out)
        if not e2e and ckpt.get("encoder") != encoder["id"]:
            raise _differs("encoder", ckpt.get("encoder"), encoder["id"], path, out)
        if classes is None:
            classes, model_args = list(ckpt["classes"]), dict(ckpt["model_args"])
        elif list(ckpt["classes"]) != classes:
            raise MsamilError(f"{path}: its classes {list(ckpt['classes'])} differ from {classes} of the "
                              f"experiment's other folds; rerun the experiment's training")
        scaling = (ckpt.get("config") or {}).get("temperature_scaling", False)
        if scaling != training.get("temperature_scaling", False):
            raise _differs("temperature_scaling", scaling, training.get("temperature_scaling", False), path, out)
        runs.append({"repeat": repeat, "fold": fold, "checkpoint": _relative(path, root),
                     "encoder": ckpt.get("encoder", ""), "epoch": ckpt.get("epoch"),
                     "temperature": checkpoint_temperature(ckpt, str(path))})
    if not runs:
        raise MsamilError(f"{out}: no checkpoint given; the manifest describes a trained experiment")
    segmentation = settings.get("segmentation")
    if segmentation:  # the lesion model: its file, digest and the post-processing its masks were made with
        path = segmentation["checkpoint"]
        lesion_model = torch_load(path, "segmentation checkpoint", allow_numpy=True)
        segmentation = {"checkpoint": _relative(path, root), "checkpoint_sha256": file_sha256(path),
                        "postprocess": dict(lesion_model.get("postprocess") or {})}
    manifest = {
        "format": FORMAT, "msamil_version": __version__, "experiment": settings["experiment"],
        "project": _relative(".", root),
        **{k: settings[k] for k in ("thumbnail", "tissue", "patches", "features", "splits", "task")},
        "segmentation": segmentation, "encoder": encoder, "scales": list(training["scales"]), "classes": classes,
        "model": training["model"], "model_args": model_args, "training": training,
        "relations": settings["relations"], "runs": runs,
    }
    write_json(out, manifest)
    return manifest


class Manifest:
    """A manifest read back (:func:`read_manifest`): the settings it states as settings objects,
    and its paths resolved against its folder."""

    def __init__(self, path: str | os.PathLike, data: dict):
        self.path, self.data = Path(path), data
        self.root = self.path.parent

    def __getitem__(self, key):
        return self.data[key]

    def get(self, key, default=None):
        return self.data.get(key, default)

    def _section(self, cls, values: dict):
        """A section of the manifest as its settings class (a setting this version does not know
        is an error naming the file: the manifest comes from a newer msamil)."""
        return cls.from_dict(values, f"{self.path} ({cls.KEY or cls.__name__})")

    @property
    def thumbnail(self) -> ThumbnailSettings:
        return self._section(ThumbnailSettings, self.data["thumbnail"])

    @property
    def tissue(self) -> TissueSettings:
        return self._section(TissueSettings, self.data["tissue"])

    @property
    def patches(self) -> PatchSettings:
        return self._section(PatchSettings, self.data["patches"])

    @property
    def is_e2e(self) -> bool:
        return "e2e" in self.data["encoder"]

    @property
    def encoder(self) -> EncoderSettings:
        """The encoder's settings, a relative weights path taken from the project the manifest was
        written in (the folder its ``project`` names)."""
        if self.is_e2e:
            raise MsamilError(f"{self.path}: experiment {self.data['experiment']!r} is an e2e twin: each fold reads "
                              "features of its own tuned encoder, which predict does not run; use another experiment")
        values = dict(self.data["encoder"]["settings"])
        weights = values.get("weights")
        if weights and not os.path.isabs(weights) and not weights.startswith("hf-hub:"):
            values["weights"] = os.path.normpath(self.root / self.data.get("project", ".") / weights)
        return self._section(EncoderSettings, values)

    @property
    def encoder_id(self) -> str:
        return self.data["encoder"]["id"]

    @property
    def segmentation_checkpoint(self) -> Path | None:
        seg = self.data.get("segmentation")
        return (self.root / seg["checkpoint"]) if seg else None

    def checked_segmentation(self, given: str | None = None) -> str | None:
        """The lesion model's file: the manifest's, checked against its SHA-256 (``given``, a file
        named on the command line, must be that very model)."""
        from .fileio import file_sha256

        seg = self.data.get("segmentation")
        if not seg:
            return None
        path = Path(given) if given else self.segmentation_checkpoint
        if not path.is_file():
            raise MsamilError(f"{self.path}: the experiment's lesion model {path} is missing; it selected patches on "
                              "its lesion masks (give the model with --segmentation-checkpoint, or restore the file)")
        if file_sha256(path) != seg["checkpoint_sha256"]:
            raise MsamilError(f"lesion model {path} is not the one the experiment was trained with (SHA-256 "
                              f"{seg['checkpoint_sha256'][:12]}... in {self.path}); give that model")
        return str(path)

    def report_config(self) -> dict:
        """The experiment as the report's tables read it: its training settings, model, scales,
        strategy, task classes, classes and encoder, and the relations (``init_from`` the source
        experiment or file, ``e2e`` {name, frozen, dir}, ``ablation_of``, ``repeat_splits``,
        ``train_fraction`` when set)."""
        d, rel = self.data, self.data["relations"]
        config = {k: v for k, v in d["training"].items() if k not in ("repeat", "train_fraction", "init_from")}
        init = rel.get("init_from") or {}
        e2e = rel.get("e2e")
        config.update(name=d["experiment"], model=d["model"], scales=d["scales"], strategy=d["patches"]["strategy"],
                      task=(d["task"] or {}).get("classes"), classes=d["classes"],
                      encoder=d["encoder"].get("id") or d["encoder"]["initial"]["id"],
                      init_from=init.get("experiment") or init.get("file"), ablation_of=rel.get("ablation_of"),
                      repeat_splits=rel.get("repeat_splits", True),
                      e2e={"name": e2e["run"], "frozen": e2e["frozen"], "dir": e2e["dir"]} if e2e else None)
        if rel.get("train_fraction") is not None:
            config["train_fraction"] = rel["train_fraction"]
        return config


def read_manifest(models: str | os.PathLike) -> Manifest | None:
    """The manifest of an experiment folder (None when it has none: trained outside the workflow)."""
    path = Path(models) / layout.MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MsamilError(f"{path}: unreadable manifest ({exc}); rerun the workflow's write_manifest for it") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise MsamilError(f"{path}: not a manifest of format {FORMAT}; rerun the workflow's write_manifest for it")
    return Manifest(path, data)
