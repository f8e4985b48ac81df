"""Attention heatmaps: where on a slide a MIL model looked, as images, a montage and GeoJSON.

Every model of :mod:`msamil_core.mil` can return ``attention`` (per-instance weights that sum
to 1 over the bag; see :mod:`msamil_core.mil.base`). For one slide, :func:`write_slide_heatmaps`
writes into one folder, all files or none (:func:`~msamil_core.fileio.atomic_dir`):

* ``attention_<scale>.png`` for each scale the model reads (20x, 10x, 5x) and
  ``attention_combined.png``: the thumbnail with each patch painted by its attention (the
  combined map sums, at each point, the attention of the patches of every scale that cover
  it), with a colour bar in attention units;
* ``top_bottom.png``: the ``k`` patches with the highest and the lowest attention, read from
  the slide, each captioned with its scale and score;
* ``attention.geojson``: one square per patch in level-0 px, for QuPath (*File > Import objects
  from file*), with the scores as measurements (``attention``, ``attention x N``, and
  ``lesion fraction`` when the slide is annotated), so *Measure > Show measurement maps* draws
  the heatmap on the full-resolution slide;
* ``attention.csv``: the same numbers as a table;
* ``slide.json``: the prediction and the attention inside against outside the annotated lesion.

``attention x N`` is the weight times the bag size: 1 is what every patch gets under uniform
attention, so values compare across slides of different sizes.

The inside/outside figures answer whether the model attends to the lesion: a patch is inside
when at least half of it lies in the annotation, else outside.
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import MsamilError
from .slide import SCALES

log = logging.getLogger(__name__)

# matplotlib's viridis at 0, 1/4, 1/2, 3/4 and 1: perceptually even, readable in grey.
_VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float64)
_OPACITY = 0.65  # share of the colour over the thumbnail on patches
_TITLE_H, _BAR_W, _BAR_GAP = 30, 16, 10  # figure layout, output px
_MARGIN_RIGHT = _BAR_GAP + _BAR_W + 70  # colour bar and its tick labels
INSIDE_FRACTION = 0.5  # a patch is inside the lesion when at least this share of it is annotated
SCOPES = ("all", *SCALES)
_PNG = {"format": "PNG", "compress_level": 1}  # noisy thumbnails: level 6 takes 5x longer for 20 % less


@dataclass
class SlideAttention:
    """One slide's instances (those of the model's scales) with their attention.

    Attributes:
        coords: int64 [N, 2] level-0 top-left (x, y).
        scales: int64 [N], 0 = 20x, 1 = 10x, 2 = 5x.
        sizes: int64 [N] patch side in level-0 px.
        attention: float64 [N], non-negative, summing to 1.
        probabilities: float64 [C], the class probabilities of the same forward pass(es).
        classes: class names in logit order.
    """

    slide_id: str
    coords: np.ndarray
    scales: np.ndarray
    sizes: np.ndarray
    attention: np.ndarray
    probabilities: np.ndarray
    classes: list[str]

    @property
    def predicted(self) -> str:
        return self.classes[int(np.argmax(self.probabilities))]


# ----------------------------------------------------------------------------- drawing


def colormap(values: np.ndarray) -> np.ndarray:
    """Viridis colours (uint8 [..., 3]) of values in [0, 1] (clipped)."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    i = np.minimum(v.astype(np.int64), len(_VIRIDIS) - 2)
    t = (v - i)[..., None]
    return np.rint(_VIRIDIS[i] * (1 - t) + _VIRIDIS[i + 1] * t).astype(np.uint8)


def thumbnail_boxes(meta: dict, coords: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Patch boxes (x0, y0, x1, y1) in thumbnail px, float [N, 4]."""
    dsx, dsy = float(meta["thumbnail"]["downsample_x"]), float(meta["thumbnail"]["downsample_y"])
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    s = np.asarray(sizes, dtype=np.float64).reshape(-1, 1)
    return np.concatenate([xy / (dsx, dsy), (xy + s) / (dsx, dsy)], axis=1)


def paint(shape: tuple[int, int], boxes: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum each patch's value over its box: (float [h, w] map, bool [h, w] covered)."""
    h, w = shape
    canvas = np.zeros((h, w), dtype=np.float64)
    covered = np.zeros((h, w), dtype=bool)
    edges = np.rint(boxes).astype(np.int64)
    edges[:, [0, 2]] = np.clip(edges[:, [0, 2]], 0, w)
    edges[:, [1, 3]] = np.clip(edges[:, [1, 3]], 0, h)
    for (x0, y0, x1, y1), v in zip(edges.tolist(), np.asarray(values, dtype=np.float64).tolist()):
        canvas[y0:y1, x0:x1] += v
        covered[y0:y1, x0:x1] = True
    return canvas, covered


def _tick(value: float) -> str:
    return "0" if value == 0 else f"{value:.3g}"


def heatmap_figure(thumb: np.ndarray, values: np.ndarray, covered: np.ndarray, title: str, bar_label: str):
    """The thumbnail with ``values`` (float [h, w]) in colour where ``covered``, a title above and
    a colour bar from 0 to the map's maximum on the right; a PIL image of
    (w + :data:`_MARGIN_RIGHT`) x (h + :data:`_TITLE_H`) px."""
    from PIL import Image

    from .plots import _SS, _Canvas

    h, w = thumb.shape[:2]
    vmax = float(values[covered].max()) if covered.any() else 0.0
    scale = vmax if vmax > 0 else 1.0
    blended = thumb.copy()
    colours = colormap(values[covered] / scale).astype(np.float64)
    blended[covered] = np.rint((1 - _OPACITY) * thumb[covered] + _OPACITY * colours).astype(np.uint8)
    image = Image.new("RGB", (w + _MARGIN_RIGHT, h + _TITLE_H), "white")
    # text is drawn on two small strips only: supersampling the whole figure costs a second
    head = _Canvas(w + _MARGIN_RIGHT, _TITLE_H)
    head.text((4, _TITLE_H / 2), title, size=12, valign="middle")
    side = _Canvas(_MARGIN_RIGHT - _BAR_GAP - _BAR_W, h)
    for frac in (0.0, 0.5, 1.0):
        y = min(max((1 - frac) * (h - 1), 6), h - 6)
        side.line([(0, y), (4, y)])
        side.text((6, y), _tick(frac * vmax), size=10, valign="middle")
    side.text((side.width - 12, h / 2), bar_label, size=10, align="center", valign="middle", vertical=True)
    for strip, xy in ((head, (0, 0)), (side, (w + _BAR_GAP + _BAR_W, _TITLE_H))):
        image.paste(strip.image.resize((strip.width, strip.height), Image.Resampling.LANCZOS) if _SS != 1 else strip.image, xy)
    image.paste(Image.fromarray(blended), (0, _TITLE_H))
    ramp = colormap(np.linspace(1.0, 0.0, h))[:, None, :].repeat(_BAR_W, axis=1)
    image.paste(Image.fromarray(ramp), (w + _BAR_GAP, _TITLE_H))
    return image


def montage(slide, att: SlideAttention, k: int = 8, tile: int = 128):
    """The ``k`` patches with the highest attention (top row) and the lowest (bottom row), read
    from ``slide`` (an open :class:`~msamil_core.slide.Slide`) and captioned; a PIL image."""
    from PIL import Image

    from .plots import _SS, _Canvas

    n = len(att.attention)
    k = max(1, min(k, n))
    order = np.argsort(-att.attention, kind="stable")
    rows = [("highest attention", order[:k]), ("lowest attention", order[::-1][:k])]
    gap, head, caption = 8, 22, 30
    width = gap + k * (tile + gap)
    row_h = head + tile + caption
    frame = _Canvas(width, len(rows) * row_h + gap)
    for r, (name, picks) in enumerate(rows):
        top = r * row_h + gap
        frame.text((gap, top + head / 2), f"{att.slide_id}: {name}", size=12, valign="middle")
        for c, i in enumerate(picks.tolist()):
            x = gap + c * (tile + gap)
            frame.text((x + tile / 2, top + head + tile + 2), f"{SCALES[att.scales[i]]}  a={att.attention[i]:.3g}",
                       size=10, align="center")
            frame.text((x + tile / 2, top + head + tile + 15), f"x N = {att.attention[i] * n:.2f}", size=10, align="center")
    image = frame.image.resize((frame.width, frame.height), Image.Resampling.LANCZOS) if _SS != 1 else frame.image
    for r, (_, picks) in enumerate(rows):
        for c, i in enumerate(picks.tolist()):
            x0, y0 = (int(v) for v in att.coords[i])
            patch = slide.read_patch(x0, y0, int(att.sizes[i]), tile)
            image.paste(Image.fromarray(patch), (gap + c * (tile + gap), r * row_h + gap + head))
    return image


# ----------------------------------------------------------------------------- numbers


def lesion_fractions(mask: np.ndarray, meta: dict, coords: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Share of each patch inside a thumbnail-size lesion mask, float [N] in [0, 1]."""
    from .coords import area_fractions

    return area_fractions(mask, thumbnail_boxes(meta, coords, sizes))


def lesion_attention(att: SlideAttention, fractions: np.ndarray) -> list[dict]:
    """Attention inside against outside the lesion, over all patches and per scale.

    One row per scope (``all``, ``20x``, ``10x``, ``5x`` present): patch counts inside and
    outside, the mean ``attention x N`` of each group (1 = uniform attention), and the share
    of the scope's attention and of its patches that lie inside.
    """
    n = len(att.attention)
    rel = att.attention * n
    inside = np.asarray(fractions) >= INSIDE_FRACTION
    rows = []
    for scope in SCOPES:
        sel = np.ones(n, bool) if scope == "all" else att.scales == SCALES.index(scope)
        if not sel.any():
            continue
        a_in, a_out = rel[sel & inside], rel[sel & ~inside]
        total = float(att.attention[sel].sum())
        rows.append({
            "scope": scope,
            "n_inside": int(len(a_in)),
            "n_outside": int(len(a_out)),
            "mean_inside": float(a_in.mean()) if len(a_in) else math.nan,
            "mean_outside": float(a_out.mean()) if len(a_out) else math.nan,
            "attention_share_inside": float(att.attention[sel & inside].sum() / total) if total > 0 else math.nan,
            "patch_share_inside": float(len(a_in) / sel.sum()),
        })
    return rows


def attention_features(att: SlideAttention, fractions: np.ndarray | None = None) -> list[dict]:
    """QuPath GeoJSON detections, one square per patch (level-0 px), scores as measurements."""
    from .geojson import grid_features

    n = len(att.attention)
    features = []
    for s, size in sorted({(int(a), int(b)) for a, b in zip(att.scales, att.sizes)}):
        idx = np.flatnonzero((att.scales == s) & (att.sizes == size))
        group = grid_features(att.coords[idx], size, SCALES[s], object_type="detection")
        for feature, i in zip(group, idx.tolist()):
            m = feature["properties"]["measurements"]
            m["attention"] = float(att.attention[i])
            m["attention x N"] = float(att.attention[i] * n)
            if fractions is not None:
                m["lesion fraction"] = float(fractions[i])
        features += group
    return features


def _write_csv(path: Path, att: SlideAttention, fractions: np.ndarray | None) -> None:
    n = len(att.attention)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["x", "y", "scale", "patch_size_level0", "attention", "attention_x_n"]
                        + (["lesion_fraction"] if fractions is not None else []))
        for i in range(n):
            row = [int(att.coords[i, 0]), int(att.coords[i, 1]), SCALES[att.scales[i]], int(att.sizes[i]),
                   f"{att.attention[i]:.6g}", f"{att.attention[i] * n:.6g}"]
            writer.writerow(row + ([f"{fractions[i]:.4f}"] if fractions is not None else []))


# ----------------------------------------------------------------------------- one slide


def write_slide_heatmaps(
    out_dir: str | os.PathLike,
    att: SlideAttention,
    thumb: np.ndarray,
    meta: dict,
    slide_path: str | os.PathLike,
    mpp: float | None = None,
    lesion_mask: np.ndarray | None = None,
    top_k: int = 8,
    title: str = "",
) -> dict:
    """Write the heatmaps, montage, GeoJSON, CSV and slide.json of one slide into ``out_dir``
    (all or nothing); returns slide.json's content.

    Args:
        att: the slide's instances and attention.
        thumb: the thumbnail, RGB uint8 [h, w, 3]; ``meta`` its meta.json (downsamples).
        slide_path, mpp: the slide, for the montage's patches.
        lesion_mask: bool [h, w] thumbnail-size annotation, for the inside/outside figures.
        top_k: patches per montage row.
        title: prefix of the figure titles (e.g. the experiment).
    """
    from .fileio import atomic_dir
    from .geojson import write_geojson
    from .slide import open_slide

    if len(att.attention) == 0:
        raise MsamilError(f"slide {att.slide_id!r}: the bag has no patches of the model's scales; nothing to draw")
    h, w = thumb.shape[:2]
    boxes = thumbnail_boxes(meta, att.coords, att.sizes)
    fractions = None
    if lesion_mask is not None:
        if lesion_mask.shape != (h, w):
            raise MsamilError(f"slide {att.slide_id!r}: lesion mask is {lesion_mask.shape[1]} x {lesion_mask.shape[0]} px, "
                              f"the thumbnail {w} x {h}")
        fractions = lesion_fractions(lesion_mask, meta, att.coords, att.sizes)
    probs = ", ".join(f"{c} {p:.2f}" for c, p in zip(att.classes, att.probabilities))
    head = f"{title}  {att.slide_id}" if title else att.slide_id
    present = [s for s in range(len(SCALES)) if (att.scales == s).any()]
    with atomic_dir(out_dir) as tmp:
        for s in present:
            sel = att.scales == s
            values, covered = paint((h, w), boxes[sel], att.attention[sel])
            heatmap_figure(thumb, values, covered, f"{head}  {SCALES[s]} ({int(sel.sum())} patches)",
                           "attention (sum 1 over the bag)").save(tmp / f"attention_{SCALES[s]}.png", **_PNG)
        values, covered = paint((h, w), boxes, att.attention)
        heatmap_figure(thumb, values, covered, f"{head}  all scales  ->  {probs}",
                       "attention, summed over scales").save(tmp / "attention_combined.png", **_PNG)
        with open_slide(slide_path, att.slide_id, mpp) as slide:
            montage(slide, att, top_k).save(tmp / "top_bottom.png", **_PNG)
        write_geojson(tmp / "attention.geojson", attention_features(att, fractions))
        _write_csv(tmp / "attention.csv", att, fractions)
        info = {
            "slide_id": att.slide_id,
            "classes": list(att.classes),
            "probabilities": [float(p) for p in att.probabilities],
            "predicted": att.predicted,
            "n_patches": {SCALES[s]: int((att.scales == s).sum()) for s in present},
            "lesion": lesion_attention(att, fractions) if fractions is not None else None,
        }
        (tmp / "slide.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


# ----------------------------------------------------------------------------- cohort summary

SUMMARY_COLUMNS = ("slide_id", "label", "predicted", "scope", "n_inside", "n_outside", "mean_inside", "mean_outside",
                   "attention_share_inside", "patch_share_inside")


def write_summary(path: str | os.PathLike, infos: list[dict], labels: dict[str, str] | None = None) -> None:
    """One row per slide and scope of the inside/outside figures (slides without annotation get
    one ``all`` row with empty figures), atomically."""
    from .fileio import atomic_path

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    for info in infos:
        base = {"slide_id": info["slide_id"], "label": (labels or {}).get(info["slide_id"], ""), "predicted": info["predicted"]}
        for row in info["lesion"] or [{"scope": "all"}]:
            writer.writerow({**base, **row})
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def pooled_lesion_attention(summary) -> "pd.DataFrame":
    """Per scope, over the slides of a summary table: patches inside and outside, the mean
    ``attention x N`` of each (pooled over patches) and their ratio."""
    import pandas as pd

    df = summary.dropna(subset=["mean_inside", "mean_outside"], how="all").copy()
    rows = []
    for scope in SCOPES:
        part = df[df["scope"] == scope]
        if part.empty:
            continue
        n_in, n_out = part["n_inside"].sum(), part["n_outside"].sum()
        mean_in = float((part["mean_inside"].fillna(0) * part["n_inside"]).sum() / n_in) if n_in else math.nan
        mean_out = float((part["mean_outside"].fillna(0) * part["n_outside"]).sum() / n_out) if n_out else math.nan
        rows.append({"scope": scope, "slides": int(part["slide_id"].nunique()), "patches inside": int(n_in),
                     "patches outside": int(n_out), "mean attention x N inside": round(mean_in, 3),
                     "mean attention x N outside": round(mean_out, 3),
                     "inside / outside": round(mean_in / mean_out, 2) if mean_out else math.nan})
    return pd.DataFrame(rows)


def report_section(heatmaps: dict[str, str | os.PathLike], report_dir: str | os.PathLike) -> str:
    """HTML for the report: per experiment, the attention inside against outside the lesions
    and a link to each slide's heatmaps. ``heatmaps`` maps an experiment to the folder holding
    ``summary.csv`` and one sub-folder per slide (``msamil heatmap``'s output)."""
    import pandas as pd

    parts = ["<p>Attention of the fold's model on its test slides (<code>msamil heatmap</code>). "
             "<i>attention x N</i> is a patch's weight times the number of patches (1 = uniform); a patch is inside "
             f"when at least {INSIDE_FRACTION:.0%} of it lies in the annotated lesion.</p>"]
    for name, directory in heatmaps.items():
        directory = Path(directory)
        summary_path = directory / "summary.csv"
        if not summary_path.exists():
            raise MsamilError(f"{summary_path}: no heatmap summary for experiment {name!r}; run `msamil heatmap` first")
        summary = pd.read_csv(summary_path, dtype={"slide_id": str, "label": str})
        parts.append(f"<h3>{html.escape(name)} ({html.escape(directory.name)})</h3>")
        pooled = pooled_lesion_attention(summary)
        if len(pooled):
            parts.append(pooled.to_html(index=False, escape=True, border=0, classes="t", na_rep="n/a"))
        else:
            parts.append("<p>No slide has a lesion annotation.</p>")
        links = []
        for slide_id in dict.fromkeys(summary["slide_id"]):
            rel = os.path.relpath(directory / slide_id, report_dir)
            img = html.escape(f"{rel}/attention_combined.png")
            links.append(f'<a href="{html.escape(rel)}/"><img src="{img}" alt="{html.escape(slide_id)}" '
                         f'title="{html.escape(slide_id)}" style="width:200px;margin:2px"></a>')
        parts.append("<div>" + "".join(links) + "</div>")
    return "".join(parts)
