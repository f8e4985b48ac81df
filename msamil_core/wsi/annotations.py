"""Lesion annotations -> lesion masks at thumbnail resolution.

The sheet's ``annotation`` column names one file per slide, in one of three formats:

* **QuPath GeoJSON** (``.geojson``/``.json``): a FeatureCollection, a single Feature or a bare list
  of Features (what *File > Export objects as GeoJSON* writes with or without "Export as
  FeatureCollection"). Polygon and MultiPolygon geometries count, with their holes;
  GeometryCollections are searched; points and lines have no area and are skipped. The class is
  ``properties.classification.name`` (or ``.names`` for QuPath's derived classes, e.g.
  ``["Tumor", "Positive"]``), ``properties.classification`` when it is a plain string, else
  ``properties.name``; a feature with none of these is ``Unclassified``. Tiles
  (``objectType: "tile"``, e.g. a patch grid exported by ``msamil export-geojson``) are no
  annotations and are skipped.
* **ASAP XML** (``.xml``): ``<ASAP_Annotations><Annotations><Annotation Type="Polygon"
  PartOfGroup="..."><Coordinates><Coordinate Order X Y/>``. Polygon, Spline (its control points)
  and Rectangle annotations count; Dot and PointSet do not. The class is the group
  (``PartOfGroup``) and, for nested groups, every ancestor group of
  ``<AnnotationGroups><Group Name PartOfGroup>``; ``None`` means no group (``Unclassified``).
  ASAP has no holes: a group configured as *subtract* (CAMELYON16's ``_2``, or any group named
  like ``Exclusion``) is cut out of the lesion instead.
* **Mask image** (``.png``, ``.tif``/``.tiff``, ``.bmp``): any size with the slide's aspect ratio
  (a pyramidal TIFF is read at the smallest level that is still at least thumbnail size). Nonzero
  is lesion, or, with ``mask_labels``, the listed label values of a single-channel (or palette)
  image. It is resized to the thumbnail by area (a thumbnail pixel is lesion when more than half
  of it is) or, when the mask is coarser than the thumbnail, by nearest neighbour.

All vector coordinates are level-0 pixels, origin at the top-left corner of the full-resolution
image, x to the right, y down (QuPath's and ASAP's convention). A level-0 point (X, Y) lies at
thumbnail (X * w / W, Y * h / H); thumbnail pixel (row r, column c) covers [c, c + 1) x [r, r + 1)
there and is inside a polygon when its centre (c + 0.5, r + 0.5) is (even-odd rule over the
polygon's rings, so holes are holes).

Which classes are lesion (:class:`ClassRules`): by default every class except the ones that
name non-lesion tissue or QuPath's housekeeping classes (:data:`DEFAULT_IGNORE_CLASSES`), and
minus the *subtract* classes (:data:`DEFAULT_SUBTRACT_CLASSES`); or exactly the classes listed in
``lesion_classes``. Patterns are shell-style (``Ignore*``) and case-insensitive.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from ..errors import MsamilError
from ..settings import DEFAULT_IGNORE_CLASSES, DEFAULT_SUBTRACT_CLASSES, AnnotationSettings

log = logging.getLogger(__name__)

#: Class name of an annotation without any class (QuPath shows it as "Unclassified").
UNCLASSIFIED = "Unclassified"
#: How far outside the slide (fraction of its width/height) vertices may lie before the file is
#: refused (annotation tools let outlines overshoot the image edge a little): the setting's default.
DEFAULT_TOLERANCE = AnnotationSettings().tolerance

GEOJSON_SUFFIXES = (".geojson", ".json")
XML_SUFFIXES = (".xml",)
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
# ASAP annotation types that enclose an area; a Spline is stored as its control points.
_ASAP_AREA_TYPES = ("polygon", "spline", "rectangle")
# QuPath objects that are no annotations of the tissue.
_SKIPPED_OBJECT_TYPES = ("tile",)
# Mask images above this many pixels would need gigabytes to decode whole.
_MAX_MASK_PIXELS = 1_500_000_000


@dataclass(frozen=True)
class ClassRules:
    """Which annotation classes make the lesion mask.

    Attributes:
        lesion: patterns of the lesion classes; ``None`` means every class not ignored or
            subtracted (including ``Unclassified``).
        ignore: patterns of classes that are neither lesion nor subtracted (used only when
            ``lesion`` is ``None``).
        subtract: patterns of classes cut out of the lesion (exclusion regions).

    A shape whose class (or one of its names: a QuPath derived class, an ASAP group's ancestors)
    matches ``lesion`` is lesion, even when it also matches ``subtract``.
    """

    lesion: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = DEFAULT_IGNORE_CLASSES
    subtract: tuple[str, ...] = DEFAULT_SUBTRACT_CLASSES

    @classmethod
    def of(cls, settings: AnnotationSettings) -> "ClassRules":
        """The rules of the annotation settings (the config's `segmentation` section)."""
        return cls(settings.lesion_classes, settings.ignore_classes, settings.subtract_classes)

    def __post_init__(self):
        # Accept lists from configs and the command line; keep the dataclass hashable.
        object.__setattr__(self, "lesion", None if self.lesion is None else tuple(self.lesion))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        object.__setattr__(self, "subtract", tuple(self.subtract))

    def role(self, names: Sequence[str]) -> str:
        """``"lesion"``, ``"subtract"`` or ``"ignore"`` for a shape with these class names."""
        if self.lesion is not None and _matches(names, self.lesion):
            return "lesion"
        if _matches(names, self.subtract):
            return "subtract"
        if self.lesion is not None or _matches(names, self.ignore):
            return "ignore"
        return "lesion"


def _matches(names: Sequence[str], patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(n.strip().lower(), p.strip().lower()) for n in names for p in patterns)


@dataclass
class Shape:
    """One polygon with holes, in level-0 px.

    ``exterior`` and each of ``holes`` are float64 [V, 2] (x, y) rings, open or closed;
    ``names`` are the class names it carries (most specific first).
    """

    exterior: np.ndarray
    holes: list[np.ndarray] = field(default_factory=list)
    names: tuple[str, ...] = (UNCLASSIFIED,)

    @property
    def rings(self) -> list[np.ndarray]:
        return [self.exterior, *self.holes]


# ----------------------------------------------------------------------------- reading


def annotation_format(path: str | os.PathLike) -> str:
    """``"geojson"``, ``"asap"`` or ``"mask"``, from the suffix or else from the first bytes."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in GEOJSON_SUFFIXES:
        return "geojson"
    if suffix in XML_SUFFIXES:
        return "asap"
    if suffix in MASK_SUFFIXES:
        return "mask"
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
    except OSError:
        return "mask"  # let the reader name the problem
    if head[:1] in (b"{", b"["):
        return "geojson"
    if head[:1] == b"<":
        return "asap"
    return "mask"


def read_shapes(path: str | os.PathLike, slide_id: str = "") -> list[Shape]:
    """The polygons of a GeoJSON or ASAP XML annotation file (level-0 px)."""
    fmt = annotation_format(path)
    if fmt == "geojson":
        return read_geojson(path, slide_id)
    if fmt == "asap":
        return read_asap_xml(path, slide_id)
    raise MsamilError(f"{_where(path, slide_id)}: is a mask image, not a polygon file")


def _where(path, slide_id: str) -> str:
    return f"annotation {path} of slide {slide_id!r}" if slide_id else f"annotation {path}"


def _parse_error(path, slide_id: str, reason: str) -> MsamilError:
    return MsamilError(
        f"{_where(path, slide_id)}: cannot parse it ({reason}); export it again as QuPath GeoJSON, "
        "ASAP XML or a mask image (PNG/TIFF), or clear the slide's `annotation` cell in the sheet"
    )


def _read_text(path, slide_id: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise MsamilError(
            f"{_where(path, slide_id)}: file not found; fix the slide's `annotation` column in the sheet"
        ) from None
    except OSError as exc:
        raise MsamilError(f"{_where(path, slide_id)}: cannot read it ({exc.strerror})") from None


def read_geojson(path: str | os.PathLike, slide_id: str = "") -> list[Shape]:
    """Polygons of a QuPath GeoJSON file (FeatureCollection, Feature or list of Features)."""
    try:
        data = json.loads(_read_text(path, slide_id))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _parse_error(path, slide_id, f"not JSON: {exc}") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and "coordinates" in data:
        features = [{"type": "Feature", "geometry": data, "properties": {}}]  # a bare geometry
    else:
        features = data
    if not isinstance(features, list):
        raise _parse_error(path, slide_id, "neither a FeatureCollection, a Feature nor a list of Features")
    shapes: list[Shape] = []
    for i, feature in enumerate(features):
        if not isinstance(feature, dict):
            raise _parse_error(path, slide_id, f"feature {i} is a {type(feature).__name__}, not an object")
        props = feature.get("properties") or {}
        if not isinstance(props, dict):
            props = {}
        object_type = str(props.get("objectType", props.get("object_type", ""))).lower()
        if object_type in _SKIPPED_OBJECT_TYPES:
            continue
        names = _geojson_class(props)
        try:
            polygons = list(_geometry_polygons(feature.get("geometry")))
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise _parse_error(path, slide_id, f"feature {i}: malformed geometry ({exc})") from None
        for rings in polygons:
            shapes.append(Shape(rings[0], rings[1:], names))
    return shapes


def _geojson_class(props: dict) -> tuple[str, ...]:
    cls = props.get("classification")
    names: list[str] = []
    if isinstance(cls, str):
        names = [cls]
    elif isinstance(cls, dict):
        if isinstance(cls.get("names"), list):
            parts = [str(n) for n in cls["names"]]
            names = [": ".join(parts), *parts]  # the full derived class, then its parts
        elif cls.get("name") is not None:
            full = str(cls["name"])
            # QuPath writes derived classes as "Tumor: Positive" in older versions.
            names = [full, *[p.strip() for p in full.split(":")]] if ":" in full else [full]
    if not names and isinstance(props.get("name"), str) and props["name"].strip():
        names = [props["name"]]
    return tuple(names) or (UNCLASSIFIED,)


def _geometry_polygons(geometry) -> Iterable[list[np.ndarray]]:
    """Rings ([exterior, *holes], float64 [V, 2] each) of every polygon in a GeoJSON geometry."""
    if not geometry:
        return
    kind = geometry.get("type")
    if kind == "Polygon":
        polygons = [geometry["coordinates"]]
    elif kind == "MultiPolygon":
        polygons = geometry["coordinates"]
    elif kind == "GeometryCollection":
        for g in geometry.get("geometries") or []:
            yield from _geometry_polygons(g)
        return
    elif kind in ("Point", "MultiPoint", "LineString", "MultiLineString"):
        return  # no area
    else:
        raise ValueError(f"unknown geometry type {kind!r}")
    for polygon in polygons:
        rings = []
        for ring in polygon:
            arr = np.asarray(ring, dtype=np.float64)
            if arr.size == 0:
                continue
            if arr.ndim != 2 or arr.shape[1] < 2:
                raise ValueError("a ring is not a list of [x, y] positions")
            rings.append(arr[:, :2])  # drop z if present
        if any(not np.isfinite(r).all() for r in rings):
            raise ValueError("non-finite coordinates")
        if rings and len(rings[0]) >= 3:
            yield [r for r in rings if len(r) >= 3]


def read_asap_xml(path: str | os.PathLike, slide_id: str = "") -> list[Shape]:
    """Polygons of an ASAP XML file; classes are the group and its ancestor groups."""
    try:
        root = ET.fromstring(_read_text(path, slide_id))
    except ET.ParseError as exc:
        raise _parse_error(path, slide_id, f"not XML: {exc}") from None
    if root.tag != "ASAP_Annotations":
        raise _parse_error(path, slide_id, f"root element <{root.tag}>, expected <ASAP_Annotations>")
    parents = {}
    for group in root.iter("Group"):
        parents[group.get("Name", "")] = group.get("PartOfGroup", "None")
    shapes: list[Shape] = []
    for i, ann in enumerate(root.iter("Annotation")):
        kind = (ann.get("Type") or "Polygon").lower()
        if kind not in _ASAP_AREA_TYPES:
            continue
        try:
            coords = sorted(
                (
                    (float(c.get("Order", k)), _asap_float(c.get("X")), _asap_float(c.get("Y")))
                    for k, c in enumerate(ann.iter("Coordinate"))
                ),
                key=lambda t: t[0],
            )
        except (TypeError, ValueError) as exc:
            raise _parse_error(
                path, slide_id, f"annotation {i} ({ann.get('Name')!r}): bad coordinate ({exc})"
            ) from None
        ring = np.array([(x, y) for _, x, y in coords], dtype=np.float64).reshape(-1, 2)
        if not np.isfinite(ring).all():
            raise _parse_error(path, slide_id, f"annotation {i} ({ann.get('Name')!r}): non-finite coordinates")
        if kind == "rectangle" and len(ring) == 2:  # two opposite corners
            (x0, y0), (x1, y1) = ring
            ring = np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], dtype=np.float64)
        if len(ring) < 3:
            continue
        shapes.append(Shape(ring, [], _asap_groups(ann.get("PartOfGroup", "None"), parents)))
    return shapes


def _asap_float(text: str | None) -> float:
    # ASAP on some European locales writes decimal commas ("1234,5").
    return float(text.replace(",", "."))  # type: ignore[union-attr]


def _asap_groups(group: str, parents: dict[str, str]) -> tuple[str, ...]:
    names: list[str] = []
    while group and group != "None" and group not in names:  # `not in`: guard against cycles
        names.append(group)
        group = parents.get(group, "None")
    return tuple(names) or (UNCLASSIFIED,)


# ----------------------------------------------------------------------------- rasterising


def fill_polygons(polygons: Sequence[Sequence[np.ndarray]], size: tuple[int, int]) -> np.ndarray:
    """Union of polygons with holes as a bool mask [h, w] (``size`` = (w, h)).

    Each polygon is a list of rings (exterior first, then holes), float [V, 2] (x, y) in the
    mask's pixel units, where pixel (r, c) covers [c, c + 1) x [r, r + 1). A pixel is inside a
    polygon when its centre is, by the even-odd rule over that polygon's rings; polygons are
    combined by union, so overlapping polygons never cancel. Scanline fill, vectorised over
    edges: exact, and cheap at thumbnail size.
    """
    w, h = int(size[0]), int(size[1])
    rows, starts, stops = [], [], []
    for rings in polygons:
        span = _polygon_spans(rings, w, h)
        if span is not None:
            rows.append(span[0])
            starts.append(span[1])
            stops.append(span[2])
    mask = np.zeros((h, w), dtype=bool)
    if not rows:
        return mask
    r, a, b = np.concatenate(rows), np.concatenate(starts), np.concatenate(stops)
    # A difference image: +1 where a span starts, -1 after it ends; covered where the sum > 0.
    diff = np.zeros((h, w + 1), dtype=np.int32)
    np.add.at(diff, (r, a), 1)
    np.add.at(diff, (r, b), -1)
    return np.cumsum(diff, axis=1)[:, :w] > 0


def _polygon_spans(rings: Sequence[np.ndarray], w: int, h: int):
    """(row, first column, end column) of the pixel runs inside one polygon (even-odd)."""
    x0s, y0s, x1s, y1s = [], [], [], []
    for ring in rings:
        ring = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
        if len(ring) < 3:
            continue
        nxt = np.roll(ring, -1, axis=0)  # closes the ring whether or not it repeats its first vertex
        x0s.append(ring[:, 0])
        y0s.append(ring[:, 1])
        x1s.append(nxt[:, 0])
        y1s.append(nxt[:, 1])
    if not x0s:
        return None
    x0, y0, x1, y1 = (np.concatenate(v) for v in (x0s, y0s, x1s, y1s))
    keep = y0 != y1  # horizontal edges cross no scanline
    x0, y0, x1, y1 = x0[keep], y0[keep], x1[keep], y1[keep]
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    # Half-open rule: an edge crosses the scanline of row r when lo <= r + 0.5 < hi, so a vertex
    # on a scanline is counted once and every row sees an even number of crossings.
    first = np.clip(np.ceil(lo - 0.5), 0, h).astype(np.int64)
    end = np.clip(np.ceil(hi - 0.5), 0, h).astype(np.int64)
    count = np.maximum(end - first, 0)
    if count.sum() == 0:
        return None
    edge = np.repeat(np.arange(len(x0)), count)
    offset = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    row = first[edge] + offset
    yc = row + 0.5
    t = (yc - y0[edge]) / (y1[edge] - y0[edge])
    x = x0[edge] + t * (x1[edge] - x0[edge])
    order = np.lexsort((x, row))
    row, x = row[order], x[order]
    # Crossings pair up within each row (even counts), so consecutive pairs are spans.
    ra, xa, xb = row[0::2], x[0::2], x[1::2]
    a = np.clip(np.ceil(xa - 0.5), 0, w).astype(np.int64)
    b = np.clip(np.ceil(xb - 0.5), 0, w).astype(np.int64)
    ok = b > a
    return ra[ok], a[ok], b[ok]


def shapes_to_thumbnail(
    shapes: Sequence[Shape], level0_size: tuple[int, int], thumb_size: tuple[int, int]
) -> np.ndarray:
    """Union of level-0 shapes as a bool mask [h, w] at thumbnail size ``thumb_size`` = (w, h)."""
    sx = thumb_size[0] / level0_size[0]
    sy = thumb_size[1] / level0_size[1]
    scale = np.array([sx, sy])
    return fill_polygons([[ring * scale for ring in s.rings] for s in shapes], thumb_size)


def check_bounds(
    shapes: Sequence[Shape], level0_size: tuple[int, int], path, slide_id: str, tolerance: float = DEFAULT_TOLERANCE
) -> None:
    """Refuse shapes reaching more than ``tolerance`` (fraction of width/height) outside the slide."""
    if not shapes:
        return
    pts = np.concatenate([r for s in shapes for r in s.rings])
    w0, h0 = level0_size
    lo = np.array([-tolerance * w0, -tolerance * h0])
    hi = np.array([(1 + tolerance) * w0, (1 + tolerance) * h0])
    bad = ((pts < lo) | (pts > hi)).any(axis=1)
    if bad.any():
        x, y = pts[np.argmax(bad)]
        xmin, ymin = pts.min(axis=0)
        xmax, ymax = pts.max(axis=0)
        raise MsamilError(
            f"{_where(path, slide_id)}: coordinates reach ({x:.0f}, {y:.0f}), outside the slide's {w0} x {h0} "
            f"level-0 px (the annotation spans x {xmin:.0f}..{xmax:.0f}, y {ymin:.0f}..{ymax:.0f}); it belongs to "
            "another slide or uses other units (µm, a downsampled image): export it in level-0 pixel coordinates "
            "of this slide, or fix the `annotation` column in the sheet"
        )


# ----------------------------------------------------------------------------- masks


def read_mask_image(
    path: str | os.PathLike,
    slide_id: str,
    level0_size: tuple[int, int],
    thumb_size: tuple[int, int],
    mask_labels: Sequence[int] | None = None,
) -> np.ndarray:
    """A lesion mask image resized to the thumbnail, bool [h, w] (``thumb_size`` = (w, h)).

    Nonzero pixels (in any channel) are lesion, or with ``mask_labels`` the pixels of those
    values in a single-channel or palette image. The image must have the slide's aspect ratio.
    """
    path = Path(path)
    if not path.is_file():
        raise MsamilError(f"{_where(path, slide_id)}: file not found; fix the slide's `annotation` column in the sheet")
    arr = _read_mask_array(path, slide_id, thumb_size)
    mh, mw = arr.shape[:2]
    w0, h0 = level0_size
    # Rounding of a level's size moves the aspect ratio by at most about a pixel.
    allowed = 0.02 + 2.0 / min(mw, mh)
    if abs((mw / mh) / (w0 / h0) - 1.0) > allowed:
        raise MsamilError(
            f"{_where(path, slide_id)}: the mask is {mw} x {mh} px, not the shape of the {w0} x {h0} px slide; "
            "give a mask of the whole slide (any resolution, same aspect ratio), or fix the `annotation` column"
        )
    if mask_labels is not None and len(mask_labels):
        if arr.ndim != 2:
            raise MsamilError(
                f"{_where(path, slide_id)}: label values {list(mask_labels)} need a single-channel label image, "
                f"this one has {arr.shape[2]} channels; save the labels as a grey or palette PNG/TIFF"
            )
        lesion = np.isin(arr, np.asarray(list(mask_labels)))
    else:
        lesion = arr != 0 if arr.ndim == 2 else (arr != 0).any(axis=2)
    return resize_mask(lesion, thumb_size)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bool mask to ``size`` = (w, h): by area (more than half covered) when shrinking, nearest otherwise."""
    h, w = mask.shape
    tw, th = int(size[0]), int(size[1])
    if (w, h) == (tw, th):
        return mask.astype(bool, copy=True)
    if w >= tw and h >= th:
        frac = Image.fromarray(mask.astype(np.float32), mode="F").resize((tw, th), Image.Resampling.BOX)
        return np.asarray(frac) > 0.5
    return (
        np.asarray(Image.fromarray(mask.astype(np.uint8) * 255, mode="L").resize((tw, th), Image.Resampling.NEAREST))
        > 127
    )


def _read_mask_array(path: Path, slide_id: str, thumb_size: tuple[int, int]) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        arr = _read_tiff_level(path, thumb_size)
        if arr is not None:
            return arr
    previous = Image.MAX_IMAGE_PIXELS
    try:
        # A level-0 mask is legitimately larger than PIL's decompression-bomb guard.
        Image.MAX_IMAGE_PIXELS = _MAX_MASK_PIXELS
        with Image.open(path) as img:
            if img.mode in ("P", "L", "I", "I;16", "1", "F"):
                arr = np.asarray(img)  # palette indices / grey values are the labels
            else:
                arr = np.asarray(img.convert("RGB"))
    except Image.DecompressionBombError:
        raise MsamilError(
            f"{_where(path, slide_id)}: the mask image is too large to decode whole (over {_MAX_MASK_PIXELS:,} px); "
            "save it downsampled (e.g. 1/16 of level 0) or as a pyramidal TIFF"
        ) from None
    except (OSError, ValueError) as exc:
        raise _parse_error(path, slide_id, f"not a readable image: {exc}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    return arr.astype(bool) if arr.dtype == bool else arr


def _read_tiff_level(path: Path, thumb_size: tuple[int, int]) -> np.ndarray | None:
    """The smallest pyramid level at least thumbnail size of a TIFF mask, or None if unreadable."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            levels = list(tif.series[0].levels)
            sizes = []
            for lvl in levels:
                axes = lvl.axes
                sizes.append((lvl.shape[axes.index("X")], lvl.shape[axes.index("Y")]))
            fits = [i for i, (w, h) in enumerate(sizes) if w >= thumb_size[0] and h >= thumb_size[1]]
            index = min(fits, key=lambda i: sizes[i][0] * sizes[i][1]) if fits else 0
            arr = levels[index].asarray()
    except Exception:  # not a TIFF tifffile decodes (e.g. a codec it lacks): let PIL try
        log.debug("tifffile cannot read %s", path, exc_info=True)
        return None
    arr = np.squeeze(arr)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar (samples first) to interleaved
    return arr


# ----------------------------------------------------------------------------- entry point


def annotation_mask(
    path: str | os.PathLike,
    slide_id: str,
    level0_size: tuple[int, int],
    thumb_size: tuple[int, int],
    rules: ClassRules | None = None,
    mask_labels: Sequence[int] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> np.ndarray:
    """The lesion mask of one slide's annotation file at thumbnail size, bool [h, w].

    Args:
        path: QuPath GeoJSON, ASAP XML or mask image (see the module docstring).
        slide_id: named in error messages.
        level0_size: slide (W, H) in level-0 px (``width``, ``height`` of meta.json).
        thumb_size: thumbnail (w, h) in px (``thumbnail.width``, ``thumbnail.height``).
        rules: which classes are lesion and which are cut out (default :class:`ClassRules`).
        mask_labels: label values that are lesion in a mask image (default: any nonzero).
        tolerance: how far outside the slide (fraction of W and H) vertices may lie.

    Raises:
        MsamilError: missing or unparsable file, coordinates outside the slide, mask of another
            shape; the message names the file and the slide.
    """
    rules = rules or ClassRules()
    if annotation_format(path) == "mask":
        return read_mask_image(path, slide_id, level0_size, thumb_size, mask_labels)
    shapes = read_shapes(path, slide_id)
    check_bounds(shapes, level0_size, path, slide_id, tolerance)
    by_role: dict[str, list[Shape]] = {"lesion": [], "subtract": [], "ignore": []}
    for shape in shapes:
        by_role[rules.role(shape.names)].append(shape)
    if shapes and not by_role["lesion"]:
        found = sorted({s.names[0] for s in shapes})
        log.warning(
            "%s: no shape of a lesion class (classes found: %s); the slide counts as lesion-free. "
            "Set segmentation lesion_classes / ignore_classes if that is wrong.",
            _where(path, slide_id),
            ", ".join(found),
        )
    mask = shapes_to_thumbnail(by_role["lesion"], level0_size, thumb_size)
    if by_role["subtract"]:
        mask &= ~shapes_to_thumbnail(by_role["subtract"], level0_size, thumb_size)
    return mask
