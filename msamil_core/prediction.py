"""Classifying slides with a trained experiment: the fold ensemble (MsaMIL-Net's Algorithm 1).

For each slide: the per-slide chain up to its bag (:func:`msamil_core.pipeline.prepare_slide`),
then every fold's model; the ensemble's class probabilities are the mean over folds, and each
fold's vote is its most probable class. :func:`predict_slides` is ``msamil predict``;
:func:`draw_fold_heatmaps` is ``msamil heatmap`` (one fold's attention on its test slides).

Every per-slide setting comes from the experiment's manifest (:mod:`msamil_core.manifest`,
:func:`slide_settings`): a setting given on the command line that contradicts it stops the run,
naming both values. Predictions write only under their own folder: per-slide files that were
made from the same slide file with the same settings are reused from there or from the
workflow's results (read only), and whatever is missing is computed into ``<out>/slides/``,
``<out>/coords/`` and ``<out>/features/``, so a prediction never changes the cohort's files. The
checkpoint's ``encoder`` (name plus weight hash) must be the manifest's and the one that made any
reused bag; a mismatch fails naming both.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import layout
from .cohort.sheet import check_sheet, load_sheet, read_table, slide_mpp
from .errors import MsamilError
from .features.bags import find_bag, load_bag
from .fileio import atomic_path, write_json
from .manifest import Manifest, read_manifest
from .pipeline import ExtractOptions, SlideFiles, SlideSettings, check_encoder, prepare_slide, slide_folder
from .settings import EncoderSettings, PatchSettings, ThumbnailSettings, TissueSettings, flag_of, fields_of
from .reporting.heatmaps import SlideAttention
from .training.calibration import checkpoint_temperature, probabilities
from .training.mil import bag_item, checkpoint_scales, forward_bag, load_checkpoint, scale_indices

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- fold models


@dataclass
class FoldModel:
    """One fold's trained model of an experiment, and the scales it reads."""

    fold: int
    path: Path
    model: torch.nn.Module
    checkpoint: dict
    scales: list[str] = field(default_factory=list)
    temperature: float = 1.0  # softmax(logits / T): the checkpoint's temperature scaling


def load_fold_models(models: str | os.PathLike, device, folds: list[int] | None = None) -> list[FoldModel]:
    """Every ``fold<k>/checkpoint.pt`` of an experiment folder (or the listed folds), checked to
    share classes, encoder and feature width, each with its temperature
    (:func:`~msamil_core.training.calibration.checkpoint_temperature`)."""
    models = Path(models)
    if folds is None:
        found = sorted(int(p.parent.name[4:]) for p in models.glob("fold*/checkpoint.pt") if p.parent.name[4:].isdigit())
        if not found:
            raise MsamilError(f"{models}: no fold<k>/checkpoint.pt; train the experiment first (or give its folder)")
        folds = found
    out = []
    for k in folds:
        path = models / f"fold{k}" / "checkpoint.pt"
        model, ckpt = load_checkpoint(path, device)
        out.append(FoldModel(k, path, model, ckpt, checkpoint_scales(ckpt), checkpoint_temperature(ckpt, str(path))))
    first = out[0]
    for other in out[1:]:
        for key in ("classes", "encoder", "model_name"):
            mine, theirs = other.checkpoint.get(key), first.checkpoint.get(key)
            if (list(mine) if key == "classes" else mine) != (list(theirs) if key == "classes" else theirs):
                raise MsamilError(f"{other.path}: its {key} {mine!r} differs from {theirs!r} in {first.path}; "
                                  "the fold models of one experiment must agree")
    return out


def fold_items(folds: list[FoldModel], bag_path: Path, slide_id: str) -> list:
    """The bag (read once) as each fold's model takes it: its scales, standardised with the
    checkpoint's training statistics (:class:`~msamil_core.training.mil.BagItem` with patch
    sizes). Fails clearly unless the models' encoder made the bag and their width is its width."""
    bag = load_bag(bag_path)
    first = folds[0]
    check_encoder(first.checkpoint.get("encoder", ""), bag.encoder, str(first.path), f"the bag {bag_path}")
    in_dim = int(first.checkpoint["model_args"]["in_dim"])
    if bag.dim != in_dim:
        raise MsamilError(f"{first.path}: the model takes {in_dim} features per patch but the bag {bag_path} has "
                          f"{bag.dim}; use bags of the encoder the experiment was trained with")
    items = [bag_item(bag, slide_id, 0, scale_indices(f.scales), f.checkpoint.get("feature_norm")) for f in folds]
    if not len(items[0].features):
        raise MsamilError(f"slide {slide_id!r}: the bag {bag_path} has no patch at {'+'.join(first.scales)}, "
                          f"the scales of {first.path}")
    return items


def slide_attention(folds: list[FoldModel], bag_path: Path, slide_id: str, device) -> tuple["SlideAttention", np.ndarray]:
    """The fold models on one bag: (:class:`~msamil_core.reporting.heatmaps.SlideAttention` with the mean
    probabilities and mean attention over folds, per-fold probabilities [K, C]).

    Attention is averaged only when the folds read the same scales (they do within an
    experiment); each fold's attention sums to 1, so the mean does too.
    """
    items = fold_items(folds, bag_path, slide_id)
    probs, attention = zip(*(model_attention(fold.model, item, device, fold.temperature)
                             for fold, item in zip(folds, items)))
    per_fold, item = np.stack(probs), items[-1]
    att = SlideAttention(slide_id, item.coords.numpy(), item.scales.numpy(), item.sizes.numpy(),
                         np.mean(attention, axis=0), per_fold.mean(0), list(folds[0].checkpoint["classes"]))
    return att, per_fold


@torch.no_grad()
def fold_probabilities(folds: list[FoldModel], bag_path: Path, slide_id: str, device) -> np.ndarray:
    """Class probabilities of each fold model on one bag, [K, C], each at its fold's temperature
    (no attention needed)."""
    out = []
    for fold, item in zip(folds, fold_items(folds, bag_path, slide_id)):
        results, _ = forward_bag(fold.model, item, device)
        out.append(probabilities(results["logits"], fold.temperature)[0].cpu().numpy())
    return np.stack(out).astype(np.float64)


# ----------------------------------------------------------------------------- attention


def no_attention_error(model_name: str) -> MsamilError:
    return MsamilError(
        f"model {model_name!r} returns no per-instance attention, so it has no heatmap; "
        "use an experiment whose model returns attention (every model `msamil list-models` lists does), "
        "or skip heatmaps for this experiment"
    )


@torch.no_grad()
def model_attention(model, item, device, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities [C] at ``temperature``, attention [M]) of one prepared bag
    (:class:`~msamil_core.training.mil.BagItem`).

    Raises:
        MsamilError: the model returns no ``attention`` (:func:`no_attention_error`).
    """
    try:
        results, _ = forward_bag(model, item, device, return_attention=True)
    except KeyError as exc:  # MILModel.forward reads intermeds["attention"]
        if exc.args != ("attention",):
            raise
        raise no_attention_error(getattr(model, "model_name", type(model).__name__)) from None
    attention = results.get("attention")
    if attention is None:
        raise no_attention_error(getattr(model, "model_name", type(model).__name__))
    probs = probabilities(results["logits"], temperature)[0].cpu().numpy().astype(np.float64)
    return probs, attention[0].float().cpu().numpy().astype(np.float64)


# ----------------------------------------------------------------------------- the manifest's settings


def _contradiction(flag: str, given, stated, manifest: Manifest, key: str) -> MsamilError:
    option = (flag if given else f"--no-{flag[2:]}") if isinstance(given, bool) else f"{flag} {_show(given)}"
    return MsamilError(f"{option} contradicts the experiment's manifest {manifest.path}: its models were trained "
                       f"with {key} {_show(stated)}; leave the option out (the manifest's value is used)")


def _show(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _checked(manifest: Manifest, stated, flags: dict):
    """``stated`` (a section of the manifest's settings), after checking that no flag contradicts it."""
    for f, _ in fields_of(type(stated)):
        if f.name in flags and flags[f.name] != getattr(stated, f.name):
            if isinstance(stated, PatchSettings) and f.name == "strategy" and stated.resolved_strategy(
                    manifest.get("segmentation") is not None) == flags[f.name]:
                continue
            raise _contradiction(flag_of(f), flags[f.name], getattr(stated, f.name), manifest,
                                 f"{stated.KEY}.{f.name}")
    return stated


def _checked_encoder(manifest: Manifest, flags: dict):
    """The manifest's encoder spec, after checking the encoder flags: a name, options or weights
    that give another encoder id, or another input size or normalisation, contradict it."""
    from .features.encoders import EncoderSpec, encoder_id

    stated = manifest.encoder
    spec = EncoderSpec.from_settings(stated)
    if not flags:
        return spec
    mine = EncoderSpec.from_settings(stated.replace(**flags))
    record = manifest["encoder"]
    fields = {f.name: f for f, _ in fields_of(EncoderSettings)}
    for key, ours, theirs in (("input_size", mine.input_size, record["input_size"]),
                              ("mean", list(mine.mean), record["mean"]), ("std", list(mine.std), record["std"])):
        if ours != theirs:
            raise _contradiction(flag_of(fields[key]), flags.get(key, ours), theirs, manifest, f"encoder {key}")
    if encoder_id(mine) != record["id"]:
        changed = next(iter(k for k in ("name", "weights", "options", "seed") if k in flags), next(iter(flags)))
        raise _contradiction(flag_of(fields[changed]), flags[changed], getattr(stated, changed), manifest,
                             f"encoder {changed} (encoder id {record['id']}, which a different encoder or weights "
                             f"would not give)")
    return spec


def slide_settings(models: str | os.PathLike, flags: dict[type, dict], segmentation_checkpoint: str | None = None,
                   fp16: bool | None = None, extract: ExtractOptions | None = None) -> SlideSettings:
    """The per-slide settings an experiment's models were trained with, from its manifest, for
    ``msamil predict``: ``flags`` ({settings class: {field: value}}, the options given) must agree
    with it, or one line names both values. Without a manifest (an experiment trained by hand
    with ``msamil train``) the flags over the defaults are used, unchecked, and a warning says so."""
    extract = extract or ExtractOptions()
    manifest = read_manifest(models)
    if manifest is None:
        log.warning("%s has no manifest.json (trained outside the workflow): the preprocessing and encoder settings "
                    "given are used unchecked, over the defaults; the workflow's experiments carry their own", models)
        from .features.encoders import EncoderSpec

        make = {cls: cls(**flags.get(cls, {})) for cls in (ThumbnailSettings, TissueSettings, PatchSettings,
                                                              EncoderSettings)}
        if fp16 is not None:
            extract = ExtractOptions(extract.features.replace(fp16=fp16), extract.device, extract.progress)
        return SlideSettings(EncoderSpec.from_settings(make[EncoderSettings]), make[ThumbnailSettings],
                             make[TissueSettings], make[PatchSettings], segmentation_checkpoint, extract)
    stated_fp16 = manifest["features"]["fp16"]
    if fp16 is not None and fp16 != stated_fp16:
        raise _contradiction("--fp16", fp16, stated_fp16, manifest, "features.fp16")
    extract = ExtractOptions(extract.features.replace(fp16=stated_fp16), extract.device, extract.progress)
    return SlideSettings(
        encoder=_checked_encoder(manifest, flags.get(EncoderSettings, {})),
        thumbnail=_checked(manifest, manifest.thumbnail, flags.get(ThumbnailSettings, {})),
        tissue=_checked(manifest, manifest.tissue, flags.get(TissueSettings, {})),
        patches=_checked(manifest, manifest.patches, flags.get(PatchSettings, {})),
        segmentation_checkpoint=manifest.checked_segmentation(segmentation_checkpoint), extract=extract)


def check_manifest_models(manifest: Manifest | None, fold_models: list[FoldModel]) -> None:
    """The fold models are the manifest's: its classes, (but for e2e twins) its encoder, and the
    temperature its run records for the fold (manifests from before temperature scaling record none)."""
    if manifest is None:
        return
    temperatures = {r["fold"]: r.get("temperature") for r in manifest.get("runs", []) if r.get("repeat", 0) == 0}
    for fold in fold_models:
        stated = temperatures.get(fold.fold)
        if stated is not None and float(stated) != fold.temperature:
            raise MsamilError(f"{fold.path}: its temperature {fold.temperature!r} differs from {stated!r} in "
                              f"{manifest.path}; the experiment was retrained since: rerun the workflow (write_manifest)")
        if list(fold.checkpoint["classes"]) != list(manifest["classes"]):
            raise MsamilError(f"{fold.path}: its classes {list(fold.checkpoint['classes'])} differ from "
                              f"{manifest['classes']} in {manifest.path}; the experiment was retrained since: rerun "
                              "the workflow (write_manifest)")
        if not manifest.is_e2e and fold.checkpoint.get("encoder") != manifest.encoder_id:
            raise MsamilError(f"{fold.path}: its encoder {fold.checkpoint.get('encoder')!r} differs from "
                              f"{manifest.encoder_id!r} in {manifest.path}; rerun the workflow (write_manifest)")


# ----------------------------------------------------------------------------- inputs and outputs


def read_new_slides(path: str | os.PathLike):
    """A sheet of slides to predict: ``slide_id`` and ``path`` needed; ``label`` (kept for the
    output), ``patient_id``, ``mpp`` and ``annotation`` optional. Checked as a slide sheet
    (:func:`~msamil_core.cohort.sheet.check_sheet`); returns it indexed by slide_id, label "" where
    none was given."""
    df = read_table(path)
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in ("slide_id", "path") if c not in df.columns]
    if missing:
        raise MsamilError(f"slide sheet {path}: missing column(s) {', '.join(missing)}; a sheet of slides to "
                          "predict needs slide_id and path (optional: label, patient_id, mpp, annotation)")
    for col in ("label", "patient_id"):  # optional here
        if col not in df.columns:
            df[col] = ""
    labels, patients = df["label"].astype(str), df["patient_id"].astype(str)
    # placeholders for the checks of a training sheet where none is given: a slide is its own
    # patient, unlabelled; a given one goes to the checks as written (whitespace around it is refused)
    unlabelled = labels.str.strip() == ""
    df["label"] = labels.where(~unlabelled, "unlabelled")
    df["patient_id"] = patients.where(patients.str.strip() != "", df["slide_id"])
    sheet = check_sheet(df, path)
    sheet["label"] = labels.where(~unlabelled, "").tolist()
    return sheet


def single_slide(path: str | os.PathLike, slide_id: str | None = None, mpp: float | None = None):
    """A one-row sheet of slides to predict (``msamil predict --slide``)."""
    import pandas as pd

    sid = slide_id or Path(path).stem
    if not Path(path).exists():
        raise MsamilError(f"slide {sid!r}: file not found: {path}")
    return pd.DataFrame([{"slide_id": sid, "path": str(Path(path).resolve()), "label": "",
                          "mpp": float("nan") if mpp is None else mpp}]).set_index("slide_id", drop=False)


def prediction_record(slide_id: str, per_fold: np.ndarray, folds: list[FoldModel], label: str = "") -> dict:
    """One slide's entry of predictions.json: ensemble probabilities (mean over folds), the
    predicted class, and each fold's probabilities and vote."""
    classes = list(folds[0].checkpoint["classes"])
    mean = per_fold.mean(0)
    votes = [classes[int(i)] for i in per_fold.argmax(1)]
    return {
        "slide_id": slide_id,
        "label": label or None,
        "predicted": classes[int(np.argmax(mean))],
        "probabilities": {c: float(p) for c, p in zip(classes, mean)},
        "votes": {c: votes.count(c) for c in classes},
        "folds": [{"fold": f.fold, "vote": v, "probabilities": {c: float(p) for c, p in zip(classes, row)}}
                  for f, v, row in zip(folds, votes, per_fold)],
    }


def failed_record(slide_id: str, reason: str, label: str = "") -> dict:
    """The entry of a slide that has no prediction, with the reason."""
    return {"slide_id": slide_id, "label": label or None, "predicted": None, "probabilities": {}, "votes": {},
            "folds": [], "patches": None, "note": reason}


def write_predictions(out_dir: str | os.PathLike, records: list[dict], folds: list[FoldModel], models: str) -> None:
    """predictions.json and predictions.csv (slide_id, label, predicted, prob_<class>,
    votes_<class>, fold<k>, patches, note; a slide without a prediction has empty values and the
    reason in ``note``), each atomically."""
    import pandas as pd

    out_dir = Path(out_dir)
    classes = list(folds[0].checkpoint["classes"])
    fold_ids = [f.fold for f in folds]

    def row(r: dict) -> dict:
        votes = {f["fold"]: f["vote"] for f in r["folds"]}
        return {"slide_id": r["slide_id"], "label": r["label"] or "", "predicted": r["predicted"] or "",
                **{f"prob_{c}": f"{r['probabilities'][c]:.6f}" if r["predicted"] else "" for c in classes},
                **{f"votes_{c}": r["votes"][c] if r["predicted"] else "" for c in classes},
                **{f"fold{k}": votes.get(k, "") for k in fold_ids},
                "patches": "" if r.get("patches") is None else r["patches"], "note": r.get("note", "")}

    table = pd.DataFrame([row(r) for r in records])
    with atomic_path(out_dir / "predictions.csv") as tmp:
        table.to_csv(tmp, index=False)
    write_json(out_dir / "predictions.json", {"models": str(models), "checkpoints": [str(f.path) for f in folds],
                                              "encoder": folds[0].checkpoint.get("encoder", ""), "classes": classes,
                                              "scales": folds[0].scales, "slides": records})


# ----------------------------------------------------------------------------- the commands


def predict_slides(models: str | os.PathLike, sheet, out: str | os.PathLike, settings: SlideSettings, device,
                   results: str | os.PathLike | None = None, features: str | os.PathLike | None = None,
                   folds: list[int] | None = None, heatmaps: bool = False, top_k: int = 8,
                   min_patches: int | None = None) -> list[dict]:
    """``msamil predict``: classify every slide of ``sheet`` (slide_id, path, [label, mpp,
    annotation]) with the fold models of the experiment folder ``models``; write
    ``out/predictions.{json,csv}`` and, with ``heatmaps``, ``out/heatmaps/<slide>/``.

    Per-slide files are reused from ``out`` and from the workflow's ``results`` folder (its
    ``slides/``, ``coords/``, and the bags in ``features``) when they were made from the same
    slide file; the rest is computed into ``out``. A slide that fails gets a record with the
    reason (``note``) and leaves no file of its own; the others are classified. A bag of fewer than
    ``min_patches`` patches is classified and flagged. Fails only when no slide could be classified
    (after writing the tables).
    """
    from .features.bags import load_bag
    from .settings import PredictSettings

    min_patches = min_patches or PredictSettings().min_patches
    from .features.encoders import encoder_id

    fold_models = load_fold_models(models, device, folds)
    check_manifest_models(read_manifest(models), fold_models)
    expected = fold_models[0].checkpoint.get("encoder", "")
    given = encoder_id(settings.encoder)
    check_encoder(expected, given, str(fold_models[0].path), "the encoder given")
    out = Path(out)
    checkpoints = ", ".join(str(f.path) for f in fold_models)
    records, drawn = [], []
    # the workflow keeps patches.strategy's coordinates in coords/, another strategy's in coords/<strategy>/;
    # a file is reused only when its attributes are this strategy's and settings'
    coords_dirs = ([layout.coords_dir(settings.strategy, main, str(results)) for main in (settings.strategy, None)]
                   if results else [])
    for sid, row in sheet.iterrows():
        mpp = slide_mpp(row)
        own = SlideFiles.under(out, sid)
        reuse = [SlideFiles.under(results, sid, feature_dir=features, coords_dir=d) for d in coords_dirs]
        try:
            bag_path = prepare_slide(row["path"], sid, mpp, settings, own, reuse, expected or given)
            patches = len(bag := load_bag(bag_path))
            if bag.left_out:  # the workflow's bag of a slide whose tiles failed to decode
                raise MsamilError(bag.left_out)
            if heatmaps:
                att, per_fold = slide_attention(fold_models, bag_path, sid, device)
                # the thumbnail of this very file (none: draw_slide renders one from the slide)
                drawn.append((att, row, slide_folder(row["path"], [own, *reuse]) or own, mpp))
            else:
                per_fold = fold_probabilities(fold_models, bag_path, sid, device)
        except MsamilError as exc:
            log.warning("slide %r with %s: %s; no prediction for it", sid, checkpoints, exc)
            records.append(failed_record(sid, str(exc), row.get("label", "")))
            continue
        record = prediction_record(sid, per_fold, fold_models, row.get("label", ""))
        record.update(patches=patches, note="")
        if patches < min_patches:
            record["note"] = f"only {patches} patch(es) (fewer than {min_patches}): weak evidence"
            log.warning("slide %r: its bag has only %d patch(es), fewer than %d (predict.min_patches); the "
                        "prediction is flagged", sid, patches, min_patches)  # fmt: skip
        records.append(record)
        log.info("%s: %s (%s)", sid, record["predicted"], ", ".join(f"{c} {p:.3f}" for c, p in record["probabilities"].items()))
    by_id = {r["slide_id"]: r for r in records}
    for att, row, files, mpp in drawn:
        try:
            draw_slide(att, row, files.meta, files.thumbnail, out / "heatmaps" / att.slide_id, mpp, top_k,
                       Path(models).name, settings.thumbnail)
        except MsamilError as exc:  # the prediction stands; the row says why it has no heatmap
            log.warning("slide %r: no heatmap: %s", att.slide_id, exc)
            note = by_id[att.slide_id]["note"]
            by_id[att.slide_id]["note"] = f"{note}; " * bool(note) + f"no heatmap: {exc}"
    write_predictions(out, records, fold_models, models)
    failed = [r for r in records if r["predicted"] is None]
    if failed and len(failed) == len(records):
        raise MsamilError(f"no slide could be classified with {checkpoints} (the reasons are in "
                          f"{out / 'predictions.csv'}): first {failed[0]['slide_id']!r}: {failed[0]['note']}")
    if failed:
        log.warning("%d of %d slide(s) have no prediction (reasons in %s): %s", len(failed), len(records),
                    out / "predictions.csv", ", ".join(r["slide_id"] for r in failed))  # fmt: skip
    return records


def draw_slide(att: SlideAttention, row, meta_path, thumbnail_path, out_dir, mpp, top_k: int, title: str,
               thumbnail: ThumbnailSettings | None = None) -> dict:
    """Heatmaps of one slide (a sheet ``row``) into ``out_dir``; the thumbnail and meta.json are
    read from their files, or made from the slide (not written, with ``thumbnail``'s size) when missing."""
    from .reporting.heatmaps import write_slide_heatmaps
    from .wsi.annotations import annotation_mask
    from .wsi.masks import read_rgb
    from .wsi.slide import open_slide
    from .wsi.thumbnail import load_meta, meta_sizes, thumbnail_and_meta

    sid = att.slide_id
    if Path(meta_path).exists() and Path(thumbnail_path).exists():
        meta, thumb = load_meta(meta_path), read_rgb(thumbnail_path, sid)
    else:
        with open_slide(row["path"], sid, mpp) as slide:
            thumb, meta = thumbnail_and_meta(slide, (thumbnail or ThumbnailSettings()).long_side)
    lesion = None
    annotation = row.get("annotation", "")
    if isinstance(annotation, str) and annotation:
        level0, thumb_size = meta_sizes(meta)
        lesion = annotation_mask(annotation, sid, level0, thumb_size)
    return write_slide_heatmaps(out_dir, att, thumb, meta, row["path"], mpp, lesion, top_k, title)


def draw_fold_heatmaps(models: str | os.PathLike, fold: int, features: str | os.PathLike, sheet_path,
                       out_dir: str | os.PathLike, device, folds_path=None, slide_ids: list[str] | None = None,
                       slides_dir: str | os.PathLike = layout.slides_root(), top_k: int = 8) -> list[dict]:
    """``msamil heatmap``: fold ``fold``'s model on its test slides (from ``folds_path``) or on
    ``slide_ids``: ``out_dir/<slide>/`` per slide, then ``out_dir/summary.csv``."""
    from .cohort.tasks import select_slides, task_classes
    from .reporting.heatmaps import pooled_lesion_attention, write_summary
    from .training.splits import fold_parts, read_folds

    if not folds_path and not slide_ids:
        raise MsamilError("give --folds (to draw the fold's test slides) or --slide-ids")
    (model,) = load_fold_models(models, device, [fold])
    sheet = load_sheet(sheet_path)
    if slide_ids:
        unknown = [s for s in slide_ids if s not in sheet.index]
        if unknown:
            raise MsamilError(f"--slide-ids: {', '.join(map(repr, unknown))} not in the sheet {sheet_path}")
    else:
        task = (model.checkpoint.get("config") or {}).get("task")
        _, mapping = task_classes(sheet, task, None if task else list(model.checkpoint["classes"]))
        slide_ids, _ = select_slides(fold_parts(read_folds(folds_path), fold)["test"], sheet, mapping)
    name, out = Path(models).name, Path(out_dir)
    scales = scale_indices(checkpoint_scales(model.checkpoint))
    infos = []
    for sid in slide_ids:
        row = sheet.loc[sid]
        bag = load_bag(bag_path := find_bag(features, sid), require_coords=False)
        if not bool(torch.isin(bag.scales, scales).any()):  # left out of the evaluation too (msamil evaluate)
            log.warning("slide %r: no heatmap: %s", sid, bag.left_out or f"no patch of the model's scales in {bag_path}")
            continue
        try:
            att, _ = slide_attention([model], bag_path, sid, device)
            folder = Path(slides_dir) / sid  # a slide's folder of the results layout
            info = draw_slide(att, row, folder / layout.META, folder / layout.THUMBNAIL, out / sid, slide_mpp(row), top_k,
                              f"{name} fold {fold}")
        except MsamilError as exc:
            raise MsamilError(f"slide {sid!r} with {model.path}: {exc}") from None
        infos.append(info)
        lesion = {r["scope"]: r for r in info["lesion"] or []}
        if "all" in lesion:
            log.info("%s: %s; attention x N inside the lesion %.2f, outside %.2f", sid, info["predicted"],
                     lesion["all"]["mean_inside"], lesion["all"]["mean_outside"])
        else:
            log.info("%s: %s (no annotation)", sid, info["predicted"])
    summary = write_summary(out / "summary.csv", infos, {s: sheet.loc[s, "label"] for s in slide_ids})
    if any(i["lesion"] for i in infos):
        log.info("%s fold %d, attention inside vs outside the lesions:\n%s", name, fold,
                 pooled_lesion_attention(summary).to_string(index=False))
    return infos
