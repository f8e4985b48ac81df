"""Inference on new slides with a trained experiment (MsaMIL-Net's Algorithm 1, end to end).

For each slide: thumbnail -> tissue mask -> [lesion mask, when a segmentation checkpoint is
given] -> 20x/10x/5x patch coordinates -> feature bag with the experiment's encoder -> every
fold's model -> the ensemble's class probabilities (mean over folds) and each fold's vote.

Per-slide outputs use the workflow's layout under a results folder, and outputs that exist
already are reused: ``slides/<slide>/thumbnail.png``, ``meta.json``, ``tissue_mask.png``,
``lesion_mask.png``, ``coords/<scale>/<slide>.h5`` and the bag in the feature folder. What a
slide still needs is computed in memory and in a staging folder, and moved into place only
when the slide's bag is complete, so a slide that fails leaves no file behind.

The checkpoint's ``encoder`` (name plus weight hash) must be the encoder given here and the one
that made any reused bag; a mismatch fails naming both.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import MsamilError
from .slide import SCALES

log = logging.getLogger(__name__)


@dataclass
class Preprocess:
    """Settings of the steps before the MIL model (the config's thumbnail, tissue, patches and
    encoder settings, which must be those the experiment was trained with)."""

    encoder: "EncoderSpec"  # noqa: F821
    long_side: int = 1024
    tissue: "TissueParams | None" = None  # noqa: F821
    min_tissue_fraction: float = 1e-3
    patch_size: int = 512
    min_fraction: float = 0.7
    base_mpp: float = 0.5
    segmentation_checkpoint: str | None = None
    batch_size: int = 32
    workers: int = 0
    device: str = "auto"
    fp16: bool = False
    progress: bool = True


@dataclass
class SlideFiles:
    """Where one slide's per-slide outputs live (the workflow's layout)."""

    slide_id: str
    thumbnail: Path
    meta: Path
    tissue: Path
    lesion: Path
    coords: dict[str, Path]
    bag: Path

    @classmethod
    def under(cls, results: str | os.PathLike, feature_dir: str | os.PathLike, slide_id: str) -> "SlideFiles":
        results = Path(results)
        slide_dir = results / "slides" / slide_id
        return cls(slide_id, slide_dir / "thumbnail.png", slide_dir / "meta.json", slide_dir / "tissue_mask.png",
                   slide_dir / "lesion_mask.png", {s: results / "coords" / s / f"{slide_id}.h5" for s in SCALES},
                   Path(feature_dir) / f"{slide_id}.pt")


class _Staging:
    """Files for their final paths, written under a temporary folder and moved in by commit()."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=".predict-staging.", dir=root))
        self.files: dict[Path, Path] = {}

    def path(self, target: Path) -> Path:
        tmp = self.dir / str(len(self.files)) / target.name
        tmp.parent.mkdir()
        self.files[target] = tmp
        return tmp

    def commit(self) -> None:
        for target, tmp in self.files.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def check_encoder(expected: str, found: str, model_where: str, found_where: str) -> None:
    """Fail unless the encoder of the model (``expected``) is the one of the features (``found``)."""
    if expected and found and expected != found:
        raise MsamilError(
            f"encoder mismatch: {model_where} was trained on features of encoder {expected!r}, but {found_where} "
            f"{'is' if found_where.startswith('the encoder') else 'comes from'} {found!r}; use the encoder settings "
            "(config `encoders` entry) the experiment was trained with, or another checkpoint"
        )


def prepare_slide(slide_path: str | os.PathLike, slide_id: str, mpp: float | None, settings: Preprocess,
                  files: SlideFiles, encoder: str) -> Path:
    """Make (or reuse) one slide's per-slide outputs up to its feature bag; returns the bag path.

    ``encoder`` is the encoder id the models expect; a reused bag of another encoder fails.
    """
    from .bags import load_bag, save_bag
    from .commands.thumbnail import thumbnail_and_meta
    from .coords import make_grids, write_coords
    from .extract import extract_bag
    from .fileio import write_json
    from .slide import open_slide
    from .tissue import TissueParams, load_mask, save_mask, save_rgb_png, slide_tissue_mask

    if files.bag.exists():
        bag = load_bag(files.bag)
        check_encoder(encoder, bag.encoder, "the model", f"the existing bag {files.bag}")
        log.info("%s: reusing %s", slide_id, files.bag)
        return files.bag
    stage = _Staging(files.bag.parent)
    try:
        coords = files.coords
        if all(p.exists() for p in coords.values()):
            log.info("%s: reusing the coordinates in %s", slide_id, coords["20x"].parent.parent)
        else:
            if files.meta.exists() and files.thumbnail.exists():
                from .annotations import load_meta
                from .segmentation import read_rgb

                meta, thumb = load_meta(files.meta), read_rgb(files.thumbnail, slide_id)
            else:
                with open_slide(slide_path, slide_id, mpp) as slide:
                    thumb, meta = thumbnail_and_meta(slide, settings.long_side)
                save_rgb_png(stage.path(files.thumbnail), thumb)
                write_json(stage.path(files.meta), meta)
            if files.tissue.exists():
                mask = load_mask(files.tissue)
            else:
                mask = slide_tissue_mask(thumb, settings.tissue or TissueParams(), settings.min_tissue_fraction, slide_id)
                save_mask(stage.path(files.tissue), mask)
            selection = "tissue"
            if settings.segmentation_checkpoint:
                mask = mask & _lesion_mask(settings, files, stage, thumb, mask, slide_id)
                selection = "lesion"
            grids = make_grids(mask, (meta["width"], meta["height"]), meta["mpp"], patch_size=settings.patch_size,
                               min_fraction=settings.min_fraction, base_mpp=settings.base_mpp, name=slide_id)
            coords = {}
            for scale, grid in grids.items():
                coords[scale] = stage.path(files.coords[scale])
                write_coords(coords[scale], grid.coords, dict(grid.attrs, selection=selection))
        bag = extract_bag(slide_path, list(coords.values()), settings.encoder, slide_id=slide_id, mpp=mpp,
                          batch_size=settings.batch_size, workers=settings.workers, device=settings.device,
                          fp16=settings.fp16, progress=settings.progress)
        check_encoder(encoder, bag.encoder, "the model", "the encoder given")
        if len(bag) == 0:
            raise MsamilError(f"slide {slide_id!r}: no patch passes the selection mask, so there is nothing to classify")
        save_bag(stage.path(files.bag), bag)
        stage.commit()
    finally:
        stage.close()
    return files.bag


def _lesion_mask(settings: Preprocess, files: SlideFiles, stage: _Staging, thumb, tissue, slide_id: str) -> np.ndarray:
    from .segmentation import PostProcess, load_segmentation_checkpoint, segment_thumbnail
    from .tissue import load_mask, save_mask

    if files.lesion.exists():
        return load_mask(files.lesion)
    model, ckpt = load_segmentation_checkpoint(settings.segmentation_checkpoint, "cpu")
    post = PostProcess(**{k: v for k, v in (ckpt.get("postprocess") or {}).items() if k in PostProcess.__dataclass_fields__})
    lesion, _ = segment_thumbnail(model, ckpt, thumb, tissue, post, "cpu")
    save_mask(stage.path(files.lesion), lesion)
    return lesion


# ----------------------------------------------------------------------------- fold models


@dataclass
class FoldModel:
    fold: int
    path: Path
    model: torch.nn.Module
    checkpoint: dict
    scales: list[str] = field(default_factory=list)


def checkpoint_scales(ckpt: dict) -> list[str]:
    """The scales an experiment's model reads (its training config; all three by default)."""
    from .train import TrainConfig

    config = ckpt.get("config") or {}
    return TrainConfig.from_dict({k: v for k, v in config.items() if k in TrainConfig.__dataclass_fields__}).scales


def load_fold_models(models: str | os.PathLike, device, folds: list[int] | None = None) -> list[FoldModel]:
    """Every ``fold<k>/checkpoint.pt`` of an experiment folder (or the listed folds), checked to
    share classes, encoder and feature width."""
    from .train import load_checkpoint

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
        out.append(FoldModel(k, path, model, ckpt, checkpoint_scales(ckpt)))
    first = out[0]
    for other in out[1:]:
        for key in ("classes", "encoder", "model_name"):
            mine, theirs = other.checkpoint.get(key), first.checkpoint.get(key)
            if (list(mine) if key == "classes" else mine) != (list(theirs) if key == "classes" else theirs):
                raise MsamilError(f"{other.path}: its {key} {mine!r} differs from {theirs!r} in {first.path}; "
                                  "the fold models of one experiment must agree")
    return out


def check_bag(fold: FoldModel, bag_path: Path) -> None:
    """The bag was made by the model's encoder and has its feature width, else a clear error."""
    from .bags import load_bag

    bag = load_bag(bag_path)
    check_encoder(fold.checkpoint.get("encoder", ""), bag.encoder, str(fold.path), f"the bag {bag_path}")
    in_dim = int(fold.checkpoint["model_args"]["in_dim"])
    if bag.dim != in_dim:
        raise MsamilError(f"{fold.path}: the model takes {in_dim} features per patch but the bag {bag_path} has "
                          f"{bag.dim}; use bags of the encoder the experiment was trained with")


def fold_item(fold: FoldModel, bag_path: Path, slide_id: str):
    """The bag as ``fold``'s model takes it: its scales, standardised with the checkpoint's
    training statistics; (BagItem, patch sizes int64 [M])."""
    from .bags import load_bag
    from .slide import scale_index
    from .train import BagDataset

    item = BagDataset([bag_path], [slide_id], [0], fold.scales, norm=fold.checkpoint.get("feature_norm"))[0]
    bag = load_bag(bag_path)
    keep = torch.isin(bag.scales, torch.tensor([scale_index(s) for s in fold.scales]))
    if len(item.features) == 0:
        raise MsamilError(f"slide {slide_id!r}: the bag {bag_path} has no patch at {'+'.join(fold.scales)}, "
                          f"the scales of {fold.path}")
    return item, bag.patch_size_level0[keep]


def slide_attention(folds: list[FoldModel], bag_path: Path, slide_id: str, device) -> tuple["SlideAttention", np.ndarray]:
    """The fold models on one bag: (:class:`~msamil_core.heatmap.SlideAttention` with the mean
    probabilities and mean attention over folds, per-fold probabilities [K, C]).

    Attention is averaged only when the folds read the same scales (they do within an
    experiment); each fold's attention sums to 1, so the mean does too.
    """
    from .heatmap import SlideAttention, model_attention

    check_bag(folds[0], bag_path)
    probs, attention, item, sizes = [], [], None, None
    for fold in folds:
        item, sizes = fold_item(fold, bag_path, slide_id)
        p, a = model_attention(fold.model, item, device)
        probs.append(p)
        attention.append(a)
    per_fold = np.stack(probs)
    att = SlideAttention(slide_id, item.coords.numpy(), item.scales.numpy(), sizes.numpy(), np.mean(attention, axis=0),
                         per_fold.mean(0), list(folds[0].checkpoint["classes"]))
    return att, per_fold


@torch.no_grad()
def fold_probabilities(folds: list[FoldModel], bag_path: Path, slide_id: str, device) -> np.ndarray:
    """Class probabilities of each fold model on one bag, [K, C] (no attention needed)."""
    from .train import forward_bag

    check_bag(folds[0], bag_path)
    out = []
    for fold in folds:
        item, _ = fold_item(fold, bag_path, slide_id)
        results, _ = forward_bag(fold.model, item, device)
        out.append(results["logits"].float().softmax(-1)[0].cpu().numpy())
    return np.stack(out).astype(np.float64)


# ----------------------------------------------------------------------------- inputs and outputs


def read_new_slides(path: str | os.PathLike):
    """A sheet of slides to predict: ``slide_id`` and ``path`` needed; ``label`` (kept for the
    output), ``patient_id``, ``mpp`` and ``annotation`` optional. Checked as a slide sheet
    (:func:`~msamil_core.sheet.check_sheet`); returns it indexed by slide_id, label "" where
    none was given."""
    from .sheet import check_sheet, read_table

    df = read_table(path)
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in ("slide_id", "path") if c not in df.columns]
    if missing:
        raise MsamilError(f"slide sheet {path}: missing column(s) {', '.join(missing)}; a sheet of slides to "
                          "predict needs slide_id and path (optional: label, patient_id, mpp, annotation)")
    labels = df["label"].astype(str).str.strip() if "label" in df.columns else None
    # placeholders for the checks of a training sheet: a slide is its own patient, unlabelled
    df["label"] = labels.where(labels != "", "unlabelled") if labels is not None else "unlabelled"
    patients = df["patient_id"].astype(str).str.strip() if "patient_id" in df.columns else df["slide_id"]
    df["patient_id"] = patients.where(patients != "", df["slide_id"])
    sheet = check_sheet(df, path)
    sheet["label"] = labels.tolist() if labels is not None else ""
    return sheet


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


def write_predictions(out_dir: str | os.PathLike, records: list[dict], folds: list[FoldModel], models: str) -> None:
    """predictions.json and predictions.csv (slide_id, label, predicted, prob_<class>,
    votes_<class>, fold<k>), each atomically."""
    import csv
    import io

    from .fileio import atomic_path, write_json

    out_dir = Path(out_dir)
    classes = list(folds[0].checkpoint["classes"])
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["slide_id", "label", "predicted", *(f"prob_{c}" for c in classes), *(f"votes_{c}" for c in classes),
                     *(f"fold{f.fold}" for f in folds)])
    for r in records:
        writer.writerow([r["slide_id"], r["label"] or "", r["predicted"], *(f"{r['probabilities'][c]:.6f}" for c in classes),
                         *(r["votes"][c] for c in classes), *(f["vote"] for f in r["folds"])])
    with atomic_path(out_dir / "predictions.csv") as tmp:
        tmp.write_text(buffer.getvalue())
    write_json(out_dir / "predictions.json", {
        "models": str(models),
        "checkpoints": [str(f.path) for f in folds],
        "encoder": folds[0].checkpoint.get("encoder", ""),
        "classes": classes,
        "scales": folds[0].scales,
        "slides": records,
    })
