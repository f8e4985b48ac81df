"""Attention heatmaps: where on a slide a MIL model looked, as images, a montage and GeoJSON.

Every model of :mod:`msamil_core.mil` can return ``attention`` (per-instance weights that sum
to 1 over the bag; see :mod:`msamil_core.mil.base`). For one slide, :func:`write_slide_heatmaps`
writes into one folder, all files or none (:func:`~msamil_core.fileio.atomic_dir`):

* ``attention_<scale>.png`` for each scale the model reads (20x, 10x, 5x) and
  ``attention_combined.png``: the thumbnail with each patch painted by its attention (the
  combined map sums, at each point, the attention of the patches of every scale that cover
  it), with a colour bar in attention units (matplotlib's viridis);
* ``top_bottom.png``: the ``k`` patches with the highest and the lowest attention, read from
  the slide, each captioned with its scale and score;
* ``attention.geojson``: one square per patch in level-0 px, for QuPath (*File > Import objects
  from file*), with the scores as measurements (``attention``, ``attention x N``, and
  ``lesion fraction`` when the slide is annotated), so *Measure > Show measurement maps* draws
  the heatmap on the full-resolution slide;
* ``attention.csv``: the same numbers as a table;
* ``slide.json``: the prediction and the attention inside against outside the annotated lesion;
* ``index.html``: a page showing all of the above (jinja2 template ``heatmap.html.j2``); it opens
  offline from the folder.

``attention x N`` is the weight times the bag size: 1 is what every patch gets under uniform
attention, so values compare across slides of different sizes.

The inside/outside figures answer whether the model attends to the lesion: a patch is inside
when at least half of it lies in the annotation, else outside.
"""


from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import MsamilError
from ..fileio import atomic_dir, atomic_path
from ..wsi.geojson import grid_features, write_geojson
from ..wsi.geometry import SCALES, area_fractions
from .pages import render
from .plots import pyplot, save_figure

log = logging.getLogger(__name__)

OPACITY = 0.65  # share of the colour over the thumbnail on patches
TITLE_H, MARGIN_RIGHT = 30, 110  # px above the thumbnail (title) and right of it (colour bar and its labels)
INSIDE_FRACTION = 0.5  # a patch is inside the lesion when at least this share of it is annotated
SCOPES = ("all", *SCALES)


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
    import matplotlib

    rgba = matplotlib.colormaps["viridis"](np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0))
    return np.rint(rgba[..., :3] * 255).astype(np.uint8)


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


def heatmap_figure(path: str | os.PathLike, thumb: np.ndarray, values: np.ndarray, covered: np.ndarray, title: str,
                   bar_label: str) -> None:
    """Write the thumbnail with ``values`` (float [h, w]) in colour where ``covered``, a title above
    and a colour bar from 0 to the map's maximum on the right: a PNG of (w + :data:`MARGIN_RIGHT`)
    x (h + :data:`TITLE_H`) px, the thumbnail drawn pixel for pixel."""
    import matplotlib

    plt = pyplot()
    h, w = thumb.shape[:2]
    vmax = float(values[covered].max()) if covered.any() else 0.0
    blended = thumb.copy()
    colours = colormap(values[covered] / (vmax if vmax > 0 else 1.0)).astype(np.float64)
    blended[covered] = np.rint((1 - OPACITY) * thumb[covered] + OPACITY * colours).astype(np.uint8)
    width, height = w + MARGIN_RIGHT, h + TITLE_H
    fig = plt.figure(figsize=(width / 100, height / 100), dpi=100)
    image = fig.add_axes((0, 0, w / width, h / height))
    image.imshow(blended, interpolation="nearest", aspect="auto")
    image.set_axis_off()
    bar = fig.add_axes(((w + 10) / width, 0.02, 16 / width, h / height - 0.04))
    fig.colorbar(matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, vmax or 1.0), "viridis"), cax=bar)
    bar.set_ylabel(bar_label, fontsize=8)
    bar.tick_params(labelsize=7)
    fit_title(fig, fig.text(4 / width, 1 - (TITLE_H / 2) / height, title, fontsize=9, va="center"), width - 8)
    save_figure(fig, path, dpi=100, compress_level=1)


def fit_title(fig, text, available: float, smallest: float = 6.0) -> None:
    """Make a figure's title ``text`` fit ``available`` px of width, so that a narrow thumbnail
    does not cut the class names at its edge: a smaller font, down to ``smallest`` pt, then
    wrapped onto as many lines (at most 3, which the :data:`TITLE_H` band holds at that size)."""
    import textwrap

    renderer = fig.canvas.get_renderer()
    wide = text.get_window_extent(renderer).width
    if wide <= available:
        return
    text.set_fontsize(max(smallest, text.get_fontsize() * available / wide))
    wide = text.get_window_extent(renderer).width
    if wide > available:
        chars = max(8, int(len(text.get_text()) * available / wide))
        text.set_text("\n".join(textwrap.wrap(text.get_text(), chars)[:3]))


def montage(path: str | os.PathLike, slide, att: SlideAttention, k: int = 8, tile: int = 128) -> None:
    """Write the ``k`` patches with the highest attention (top row) and the lowest (bottom row),
    read from ``slide`` (an open :class:`~msamil_core.wsi.slide.Slide`), each captioned with its
    scale, weight and weight x N."""
    plt = pyplot()
    n = len(att.attention)
    k = max(1, min(k, n))
    order = np.argsort(-att.attention, kind="stable")
    rows = [("highest attention", order[:k]), ("lowest attention", order[::-1][:k])]
    side = tile / 100 + 0.15
    fig, axes = plt.subplots(2, k, figsize=(side * k, 2 * (side + 0.55)), dpi=100, squeeze=False)
    for r, (name, picks) in enumerate(rows):
        axes[r][0].set_title(f"{att.slide_id}: {name}", fontsize=8, loc="left")
        for c, i in enumerate(picks.tolist()):
            x0, y0 = (int(v) for v in att.coords[i])
            ax = axes[r][c]
            ax.imshow(slide.read_patch(x0, y0, int(att.sizes[i]), tile))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"{SCALES[att.scales[i]]}  a={att.attention[i]:.3g}\nx N = {att.attention[i] * n:.2f}",
                          fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, compress_level=1)


# ----------------------------------------------------------------------------- numbers


def lesion_fractions(mask: np.ndarray, meta: dict, coords: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Share of each patch inside a thumbnail-size lesion mask, float [N] in [0, 1]."""
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
    table = pd.DataFrame({"x": att.coords[:, 0], "y": att.coords[:, 1], "scale": [SCALES[s] for s in att.scales],
                          "patch_size_level0": att.sizes, "attention": att.attention, "attention_x_n": att.attention * n})
    if fractions is not None:
        table["lesion_fraction"] = np.round(fractions, 4)
    table.to_csv(path, index=False, float_format="%.6g")


# ----------------------------------------------------------------------------- one slide


def write_slide_heatmaps(out_dir: str | os.PathLike, att: SlideAttention, thumb: np.ndarray, meta: dict,
                         slide_path: str | os.PathLike, mpp: float | None = None, lesion_mask: np.ndarray | None = None,
                         top_k: int = 8, title: str = "") -> dict:
    """Write the heatmaps, montage, GeoJSON, CSV, slide.json and index.html of one slide into
    ``out_dir`` (all or nothing); returns slide.json's content.

    Args:
        att: the slide's instances and attention.
        thumb: the thumbnail, RGB uint8 [h, w, 3]; ``meta`` its meta.json (downsamples).
        slide_path, mpp: the slide, for the montage's patches.
        lesion_mask: bool [h, w] thumbnail-size annotation, for the inside/outside figures.
        top_k: patches per montage row.
        title: prefix of the figure titles (e.g. the experiment).
    """
    from ..wsi.slide import open_slide

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
    info = {
        "slide_id": att.slide_id,
        "classes": list(att.classes),
        "probabilities": [float(p) for p in att.probabilities],
        "predicted": att.predicted,
        "n_patches": {SCALES[s]: int((att.scales == s).sum()) for s in present},
        "lesion": lesion_attention(att, fractions) if fractions is not None else None,
    }
    with atomic_dir(out_dir) as tmp:
        for s in present:
            sel = att.scales == s
            values, covered = paint((h, w), boxes[sel], att.attention[sel])
            heatmap_figure(tmp / f"attention_{SCALES[s]}.png", thumb, values, covered,
                           f"{head}  {SCALES[s]} ({int(sel.sum())} patches)", "attention (sum 1 over the bag)")
        values, covered = paint((h, w), boxes, att.attention)
        heatmap_figure(tmp / "attention_combined.png", thumb, values, covered, f"{head}  all scales  ->  {probs}",
                       "attention, summed over scales")
        with open_slide(slide_path, att.slide_id, mpp) as slide:
            montage(tmp / "top_bottom.png", slide, att, top_k)
        write_geojson(tmp / "attention.geojson", attention_features(att, fractions))
        _write_csv(tmp / "attention.csv", att, fractions)
        (tmp / "slide.json").write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "index.html").write_text(render("heatmap.html.j2", title=head, info=info,
                                               scales=[SCALES[s] for s in present], INSIDE_FRACTION=INSIDE_FRACTION))
    return info


# ----------------------------------------------------------------------------- cohort summary

SUMMARY_COLUMNS = ("slide_id", "label", "predicted", "scope", "n_inside", "n_outside", "mean_inside", "mean_outside",
                   "attention_share_inside", "patch_share_inside")


def write_summary(path: str | os.PathLike, infos: list[dict], labels: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per slide and scope of the inside/outside figures (slides without annotation get
    one ``all`` row with empty figures), written atomically; returns the table."""
    rows = []
    for info in infos:
        base = {"slide_id": info["slide_id"], "label": (labels or {}).get(info["slide_id"], ""), "predicted": info["predicted"]}
        rows += [{**base, **row} for row in info["lesion"] or [{"scope": "all"}]]
    table = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return table


def read_summary(path: str | os.PathLike) -> pd.DataFrame:
    """A heatmap folder's summary.csv (slide ids and labels kept as text)."""
    return pd.read_csv(path, dtype={"slide_id": str, "label": str, "predicted": str}, keep_default_na=False,
                       na_values={c: [""] for c in SUMMARY_COLUMNS[4:]})


def pooled_lesion_attention(summary: pd.DataFrame) -> pd.DataFrame:
    """Per scope, over the slides of a summary table: patches inside and outside, the mean
    ``attention x N`` of each (pooled over patches) and their ratio."""
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
