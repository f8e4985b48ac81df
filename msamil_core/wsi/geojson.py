"""Masks and patch grids as QuPath-readable GeoJSON, in level-0 pixel coordinates.

*File > Import objects from file* in QuPath (0.4 and later) reads what this module writes: a
FeatureCollection of Features whose ``properties`` carry ``objectType`` (``annotation``,
``detection`` or ``tile``), ``classification`` (``{"name", "color"}``) and, for patches,
``measurements`` (a name -> number object).

Mask outlines follow the pixel edges of the mask (no smoothing): one Polygon per 4-connected
component, with one ring per hole, ring corners at the mask's pixel corners. Filling the exported
polygons at pixel centres (:func:`msamil_core.wsi.annotations.fill_polygons`) therefore gives back
exactly the mask. Exteriors wind counter-clockwise and holes clockwise in the (x, y) numbers, as
RFC 7946 asks; collinear corners are dropped, so a straight run of pixels costs two vertices.
Diagonally touching pixels belong to separate components (4-connectivity), the same
convention as :func:`scipy.ndimage.label`'s default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import MsamilError
from ..fileio import write_json

#: Colour of each scale's patch tiles in QuPath (RGB).
SCALE_COLOURS = {"20x": (31, 119, 180), "10x": (44, 160, 44), "5x": (255, 127, 14)}
LESION_COLOUR = (200, 0, 0)
TISSUE_COLOUR = (80, 80, 80)

# Unit steps east, south, west, north in image coordinates (x right, y down).
_STEPS = np.array([(1, 0), (0, 1), (-1, 0), (0, -1)], dtype=np.int64)


# ----------------------------------------------------------------------------- contour tracing


def mask_polygons(mask: np.ndarray) -> list[list[np.ndarray]]:
    """Outlines of a bool mask [h, w]: one ``[exterior, *holes]`` per 4-connected component.

    Rings are int64 [V, 2] (x, y) open rings (first vertex not repeated) in mask pixel-corner
    coordinates: pixel (r, c) spans [c, c + 1) x [r, r + 1). Components come in the order of
    :func:`scipy.ndimage.label` (by first pixel in raster order).
    """
    from scipy import ndimage as ndi

    mask = np.asarray(mask, dtype=bool)
    labels, n = ndi.label(mask)
    rings, owners = _trace(mask)
    by_component: list[list[np.ndarray]] = [[] for _ in range(n)]
    for ring, (r, c) in zip(rings, owners):
        by_component[labels[r, c] - 1].append(ring)
    polygons = []
    for rings_of in by_component:
        # The exterior of a 4-connected component is its one counter-clockwise ring, and the
        # largest by area; the others are holes.
        outer = int(np.argmax([ring_area(r) for r in rings_of]))
        polygons.append([rings_of[outer], *[r for i, r in enumerate(rings_of) if i != outer]])
    return polygons


def _trace(mask: np.ndarray) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Every boundary ring of a bool mask along pixel edges, int64 [V, 2] (x, y) each, and for
    each the (row, col) of a foreground pixel it bounds.

    Boundary edges are directed with the foreground on their left in the (x, y) numbers, which
    makes exteriors counter-clockwise (positive :func:`ring_area`) and holes clockwise; on a
    y-down screen both look mirrored. Where two foreground pixels touch only at a corner, the
    walk turns towards the pixel it came along, keeping them apart (4-connectivity).
    """
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    inner = m[1:-1, 1:-1]
    r, c = np.nonzero(inner)
    if r.size == 0:
        return [], []
    # Edges of each foreground pixel (top-left corner (c, r)) that face background, directed
    # so that the pixel is on their left in (x, y) numbers: east along the top, south along the
    # right, west along the bottom, north along the left.
    starts, dirs, owners = [], [], []
    up = ~m[r, c + 1]  # m is padded: pixel (r, c) of the mask is m[r + 1, c + 1]
    right = ~m[r + 1, c + 2]
    down = ~m[r + 2, c + 1]
    left = ~m[r + 1, c]
    for side, corner, d in ((up, (0, 0), 0), (right, (1, 0), 1), (down, (1, 1), 2), (left, (0, 1), 3)):
        starts.append(np.stack([c[side] + corner[0], r[side] + corner[1]], 1))
        dirs.append(np.full(int(side.sum()), d))
        owners.append(np.stack([r[side], c[side]], 1))
    start = np.concatenate(starts).astype(np.int64)
    direction = np.concatenate(dirs).astype(np.int64)
    owner = np.concatenate(owners)
    width = m.shape[1]  # > the largest corner x (w), so y * width + x is unique per corner
    key = start[:, 1] * width + start[:, 0]
    # Outgoing edges by start corner; a corner has one, or two where pixels touch diagonally.
    order = np.argsort(key, kind="stable")
    key_sorted = key[order]
    unique_keys, first = np.unique(key_sorted, return_index=True)
    counts = np.diff(np.append(first, len(key_sorted)))
    out_edges = {int(k): order[f : f + n].tolist() for k, f, n in zip(unique_keys, first, counts)}
    # The next edge of each edge: the one leaving its end corner, or at a corner where pixels
    # touch diagonally the left turn (the foreground is on the left, so turning left keeps
    # hugging the same pixel). Every edge has exactly one successor and one predecessor, so
    # the rings are the cycles of this permutation.
    end = start + _STEPS[direction]
    successor = np.empty(len(start), dtype=np.int64)
    for e, (x, y) in enumerate(end.tolist()):
        options = out_edges[y * width + x]
        if len(options) == 1:
            successor[e] = options[0]
        else:
            left_turn = (direction[e] + 1) % 4
            successor[e] = next(o for o in options if direction[o] == left_turn)
    used = np.zeros(len(start), dtype=bool)
    rings, ring_owners = [], []
    for seed in range(len(start)):
        if used[seed]:
            continue
        cycle = []
        edge = seed
        while not used[edge]:
            used[edge] = True
            cycle.append(edge)
            edge = successor[edge]
        rings.append(_drop_collinear(start[cycle]))
        ring_owners.append(tuple(owner[seed].tolist()))
    return rings, ring_owners


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    prev = np.roll(ring, 1, axis=0)
    nxt = np.roll(ring, -1, axis=0)
    cross = (ring[:, 0] - prev[:, 0]) * (nxt[:, 1] - ring[:, 1]) - (ring[:, 1] - prev[:, 1]) * (nxt[:, 0] - ring[:, 0])
    return ring[cross != 0]


def ring_area(ring: np.ndarray) -> float:
    """Signed shoelace area of an open ring in its (x, y) numbers (positive = counter-clockwise)."""
    x = np.asarray(ring[:, 0], dtype=np.float64)
    y = np.asarray(ring[:, 1], dtype=np.float64)
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


# ----------------------------------------------------------------------------- features


def _closed(ring: np.ndarray, scale: tuple[float, float], level0_size: tuple[int, int]) -> list[list[float]]:
    """A thumbnail-corner ring as a closed GeoJSON ring in level-0 px (clipped to the slide)."""
    pts = np.asarray(ring, dtype=np.float64) * np.asarray(scale)
    pts = np.clip(pts, 0, np.asarray(level0_size, dtype=np.float64))
    coords = np.round(pts, 2).tolist()
    return coords + [coords[0]]


def mask_features(
    mask: np.ndarray,
    level0_size: tuple[int, int],
    class_name: str = "Tumor",
    color: Sequence[int] = LESION_COLOUR,
    object_type: str = "annotation",
    name: str | None = "lesion",
    single_feature: bool = False,
) -> list[dict]:
    """GeoJSON Features outlining a thumbnail-size bool mask, in level-0 px.

    Args:
        mask: bool [h, w] spanning the whole slide (thumbnail px).
        level0_size: slide (W, H) in level-0 px; a thumbnail pixel is W / w x H / h of them.
        class_name, color: the QuPath classification given to every feature.
        object_type: ``annotation`` (editable in QuPath) or ``detection``.
        name: feature names are ``"<name> <k>"`` (k from 1); None leaves them unnamed.
        single_feature: one MultiPolygon feature instead of one Polygon feature per component.
    """
    h, w = mask.shape
    scale = (level0_size[0] / w, level0_size[1] / h)
    polygons = [[_closed(ring, scale, level0_size) for ring in rings] for rings in mask_polygons(mask)]
    if not polygons:
        return []
    props = {"objectType": object_type, "classification": {"name": class_name, "color": [int(v) for v in color]}}
    if single_feature:
        geometry = {"type": "MultiPolygon", "coordinates": polygons}
        return [_feature(geometry, dict(props, **({"name": name} if name else {})))]
    features = []
    for k, rings in enumerate(polygons, start=1):
        extra = {"name": f"{name} {k}"} if name else {}
        features.append(_feature({"type": "Polygon", "coordinates": rings}, dict(props, **extra)))
    return features


def grid_features(
    coords: np.ndarray,
    patch_size_level0: int,
    scale: str,
    object_type: str = "tile",
    color: Sequence[int] | None = None,
    measurements: dict[str, float] | None = None,
) -> list[dict]:
    """One square Polygon per patch, level-0 px.

    Args:
        coords: int [N, 2] level-0 top-left (x, y), as in the coordinates HDF5 files.
        patch_size_level0: patch side in level-0 px.
        scale: ``"20x"``, ``"10x"`` or ``"5x"``: the classification name.
        object_type: ``tile`` (QuPath's tile objects) or ``detection``.
        measurements: extra numbers for every patch (shown in QuPath's measurement table).
    """
    from .geometry import MAGNIFICATIONS, scale_index

    index = scale_index(scale)
    color = color if color is not None else SCALE_COLOURS.get(scale, (128, 128, 128))
    base = {
        "magnification": float(MAGNIFICATIONS[index]),
        "scale index": float(index),
        "patch size level0 px": float(patch_size_level0),
    }
    base.update(measurements or {})
    classification = {"name": scale, "color": [int(v) for v in color]}
    s = int(patch_size_level0)
    features = []
    for x, y in np.asarray(coords, dtype=np.int64).reshape(-1, 2).tolist():
        ring = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        props = {"objectType": object_type, "classification": classification, "measurements": dict(base)}
        features.append(_feature({"type": "Polygon", "coordinates": [ring]}, props))
    return features


def _feature(geometry: dict, properties: dict) -> dict:
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def feature_collection(features: Sequence[dict]) -> dict:
    """A GeoJSON FeatureCollection of ``features``."""
    return {"type": "FeatureCollection", "features": list(features)}


def coords_features(path: str | os.PathLike, object_type: str = "tile") -> list[dict]:
    """Patch squares of one coordinates HDF5 file (ours, TRIDENT's), scale from its attributes.

    The scale is the file's ``target_magnification`` attribute, else its folder name
    (``coords/20x/<slide>.h5``); the patch extent is ``patch_size_level0``.
    """
    from .coords import read_coords
    from .geometry import SCALES, scale_index

    coords, attrs = read_coords(path)
    scale = None
    for candidate in (attrs.get("target_magnification"), Path(path).parent.name):
        try:
            scale = SCALES[scale_index(candidate)] if candidate is not None else None
        except MsamilError:
            scale = None
        if scale:
            break
    if scale is None:
        raise MsamilError(
            f"{path}: no `target_magnification` attribute and no 20x/10x/5x folder name, so its scale is unknown; "
            "write it with `msamil coords` or keep it in a coords/<scale>/ folder"
        )
    size = attrs.get("patch_size_level0")
    if size is None:
        raise MsamilError(
            f"{path}: no `patch_size_level0` attribute (a CLAM file?); write the grid with `msamil coords` "
            "or add the attribute (patch size in level-0 px)"
        )
    return grid_features(coords, int(size), scale, object_type=object_type)


def write_geojson(path: str | os.PathLike, features: Sequence[dict]) -> None:
    """Write ``features`` as a FeatureCollection, atomically."""
    write_json(path, feature_collection(features))


def export_slide(meta: str | os.PathLike, out: str | os.PathLike, lesion_mask: str | os.PathLike | None = None,
                 tissue_mask: str | os.PathLike | None = None, coords: Sequence[str | os.PathLike] = (),
                 lesion_class: str = "Tumor", patch_object_type: str = "tile", single_feature: bool = False) -> None:
    """``msamil export-geojson``: a slide's masks (as annotations) and patch grids (one square per
    patch) as one QuPath GeoJSON file in level-0 px; ``meta`` gives the thumbnail-to-level-0 scale."""
    import logging

    from .masks import load_mask
    from .thumbnail import load_meta, meta_sizes

    log = logging.getLogger(__name__)
    if not (lesion_mask or tissue_mask or coords):
        raise MsamilError("nothing to export: give --lesion-mask, --tissue-mask and/or --coords")
    info = load_meta(meta)
    level0_size, thumb_size = meta_sizes(info)
    slide_id = info.get("slide_id", "")
    features = []
    for path, class_name, what in ((tissue_mask, "Tissue", "tissue"), (lesion_mask, lesion_class, "lesion")):
        if not path:
            continue
        mask = load_mask(path)
        if mask.shape != (thumb_size[1], thumb_size[0]):
            raise MsamilError(
                f"slide {slide_id!r}: {what} mask {path} is {mask.shape[1]} x {mask.shape[0]} px but the thumbnail in "
                f"{meta} is {thumb_size[0]} x {thumb_size[1]}; rerun the {what} step of this slide"
            )
        colour = {"color": TISSUE_COLOUR} if what == "tissue" else {}
        found = mask_features(mask, level0_size, class_name, name=what, single_feature=single_feature, **colour)
        log.info("%s: %d %s region(s)", slide_id, len(found), what)
        features += found
    for path in coords:
        found = coords_features(path, object_type=patch_object_type)
        log.info("%s: %d patches from %s", slide_id, len(found), path)
        features += found
    write_geojson(out, features)
