"""The built-in synthetic demo cohort: pyramidal TIFF slides whose label needs two scales.

``msamil demo`` (and the first jobs of the default workflow) write a small cohort
that exercises every pipeline step on a CPU in minutes and that a multi-scale
model can classify while a 20x-only model cannot, by construction.

What is written (``generate_cohort``)
-------------------------------------
``<out>/slides/<slide_id>.tiff``
    Pyramidal tiled TIFF, 256 x 256 JPEG tiles, three levels with downsamples
    1, 4 and 16 (like an Aperio scan), the reduced levels flagged "reduced
    resolution" (NewSubfileType 1) so that OpenSlide's ``generic-tiff`` backend
    lists them, and XResolution/YResolution = 20000 px/cm (ResolutionUnit
    CENTIMETER), which OpenSlide 4 reports as ``openslide.mpp-x = 0.5``.
    Level 0 is therefore 0.5 µm/px, i.e. 20x.
``<out>/annotations/<slide_id>.geojson``
    QuPath-style FeatureCollection: one Polygon feature per lesion,
    ``properties.objectType = "annotation"``, ``properties.classification.name
    = "Tumor"``, vertices in level-0 pixel coordinates (x right, y down). The
    lesion pixels are rasterised (PIL) from exactly these vertices, so the
    annotation is exact up to boundary pixels: the pixel-centre rule of
    :mod:`msamil_core.wsi.annotations` disagrees on about a third of the outline's
    pixels, one pixel deep.
``<out>/slides.csv``
    The slide sheet: ``slide_id, path, label, patient_id, annotation`` with paths
    relative to the sheet's folder (``slides/<slide_id>.tiff``), so that the cohort
    can move with its sheet. It always lists the whole cohort, also when only some
    slides are generated.

Geometry (``P`` = ``patch_size``, default 256, in level-0 px)
------------------------------------------------------------
A slide is 8 x 6 "5x fields" of ``4 P`` level-0 px: 32 P x 24 P, i.e. 8192 x
6144 px (4.1 x 3.1 mm) at the default. The pipeline tiles 20x, 10x and 5x
patches of ``P`` px *at their magnification*, i.e. ``P``, ``2 P`` and ``4 P``
level-0 px, on grids that start at level-0 (0, 0). The generator assumes
exactly that alignment: lesion **nests** are squares of ``N = P`` level-0 px
on the grid that starts at (0, 0), so that

* every 20x patch *is* one nest,
* every 10x patch holds exactly 2 x 2 nests,
* every 5x patch holds exactly 4 x 4 nests.

If the pipeline runs with another patch size or grid offset the cohort still
works as a data set, but the exactness statements below no longer hold.

Slide layout (independent of the label)
---------------------------------------
White glass (RGB about 243, 242, 246, with sensor-like noise) carries one large
irregular tissue section plus 0-2 small fragments (about half of the slide).
Tissue outside lesions is stroma: eosin-pink, wavy collagen bundles, sparse
spindle-shaped fibroblast and round lymphocyte nuclei, drawn from the same
distribution for every class. One or two irregular lesion polygons lie inside
the main section and cover 26-36 % of it (always a minority of the tissue); a
lesion is purple (cells with basophilic cytoplasm) and keeps 3-7 5x, 16-30
10x and 86-129 20x patches at the default size and a 0.7 minimum fraction.
Slides 3, 13, 23, ... carry a green or blue pen stroke and slides 7, 17, 27,
... dark dust specks, on the glass, for the tissue-mask step to remove. The
layout, the artefacts and the checkerboard phase come from random streams
seeded by ``(seed, slide index)`` only, so two slides with the same index but
different labels have the same outline.

The generative rule of the label
--------------------------------
The label is the pair (cytology C, architecture A)::

    label = f"{C}_{A}",  C in {bland, atypical},  A in {alternating, zonal}

giving four classes: ``bland_alternating``, ``bland_zonal``,
``atypical_alternating`` and ``atypical_zonal``.

*Nest type.* Each lesion nest is **dense** (95 % of its 16 px cell slots hold a
nucleus, darker cytoplasm) or **sparse** (20 %, clearer cytoplasm): dark and
light purple squares that stay distinct after any downsampling.

*Cytology C: how the nuclei look.* ``bland``: small, round, solid dark nuclei
(diameter about 10 px = 5 µm). ``atypical``: larger vesicular nuclei (about
13 px = 6.5 µm) with a pale centre, a dark rim and a nucleolus. Both sit on the
same 16 px lattice, and the atypical ink is calibrated
(``_atypical_ink_gain``) so that a dense (or sparse) nest has the same mean RGB
colour for both cytologies. At 20x (256 px shown as 64-128 px) the nuclei are
resolved; at 5x (1024 px shown as 64-128 px) only residual texture is left.

*Architecture A: how dense and sparse nests are arranged.* ``alternating``:
dense and sparse nests alternate like a checkerboard, ``dense = (row + col +
phase) % 2 == 0`` on the nest grid with a random phase per slide.
``zonal``: the same number of dense nests, counted separately among the nests
wholly inside the lesion, those >= 70 % inside and the rest, goes to the nests
where a smooth random field (Gaussian-filtered noise, sigma 2 nests) is
highest, so dense and sparse nests gather into zones several nests wide.

What follows:

1. *20x cannot see A.* A 20x patch is one nest, and a nest's pixels depend
   only on its own type and on random draws that do not depend on A: nuclei
   stay inside their 16 px cell, which never straddles a nest; the noise and
   stroma do not depend on the nest map; JPEG blocks (8-16 px, aligned to the
   256 px tiles) never straddle a nest. (With the same seed and index, the two
   architectures render every nest of the same type to identical pixels.) A
   slide has the same number of dense nests under both architectures in each
   coverage class, so the 20x patches a pipeline keeps (>= 70 % lesion) are
   the same multiset of nest types, with nest contents drawn from the same
   distribution. A 20x model that ignores patch coordinates therefore gets the
   same bag distribution for ``alternating`` and ``zonal`` slides, up to which
   border nests are cut where by the lesion outline: it can tell C apart but
   not A, and its balanced accuracy on the four classes is about 0.5. (A model
   that reads 20x coordinates could rebuild the nest map.)
2. *10x and 5x see A.* A 10x patch holds 2 x 2 nests and a 5x patch 4 x 4: when
   alternating, always a checkerboard (exactly half dense, every neighbour
   pair contrasting); when zonal, mostly uniform dense or uniform sparse
   fields with at most a zone border. That is a texture difference (edge
   density at the nest scale) that randomly initialised CNN features pick up
   per patch; mean pooling over a slide hides it (both architectures have the
   same dark/light proportion), std or max pooling or attention over patches
   shows it.
3. The label thus needs 20x (or 10x) for C and 10x or 5x for A. With random
   ResNet-18 features at 96 px and a linear probe (bench/demo_separability.py):
   20x-only patches give chance on A, the three scales together separate all
   four classes.

Labels, patients and determinism
--------------------------------
Patients are numbered in order; within every block of four patients the four
labels appear once each (random order), and within every block of five
patients exactly one has two slides (20 % of patients), which share the
patient's label. Slide ``i`` is ``demo_{i:03d}``, patient ``k`` is
``patient_{k:03d}``. The sheet is a pure function of ``(n_slides, seed)``
(``cohort_table``), and slide ``i`` depends only on ``(seed, i, patch_size)``,
so generating a subset (``slide_ids``) writes the same bytes as generating all;
the same seed gives byte-identical files.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..errors import MsamilError
from ..fileio import atomic_path, write_json

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

CYTOLOGIES = ("bland", "atypical")
ARCHITECTURES = ("alternating", "zonal")
#: The four class names, in logit order.
CLASSES = tuple(f"{c}_{a}" for c in CYTOLOGIES for a in ARCHITECTURES)
#: Column order of the sheet.
SHEET_COLUMNS = ("slide_id", "path", "label", "patient_id", "annotation")

MPP = 0.5  # µm per level-0 pixel (20x)
LEVEL_DOWNSAMPLES = (1, 4, 16)
TIFF_TILE = 256  # px; JPEG tiles, a multiple of the 16 px JPEG MCU
JPEG_QUALITY = 90
SLIDE_FIELDS = (8, 6)  # slide width, height in 5x fields of 4 * patch_size level-0 px
TWO_SLIDE_EVERY = 5  # one patient in every block of this many has two slides

# Seeds are ``(seed, stream, index)``; one stream per purpose so that, e.g., the
# layout of slide i does not change when its label (and so its texture) does.
_STREAM_LABELS, _STREAM_TWO_SLIDES, _STREAM_LAYOUT, _STREAM_NESTS, _STREAM_TEXTURE = range(5)

# Glass colour (RGB) and optical densities (per unit stain amount) of the
# Beer-Lambert colour model; the values give the usual H&E purple and pink.
_GLASS = np.array([243.0, 242.0, 246.0])
_OD_HEMATOXYLIN = np.array([1.30, 1.75, 0.62])
_OD_EOSIN = np.array([0.05, 0.95, 0.38])

# Lattice pitches (level-0 px). The nest lattice pitch must divide the nest size
# patch_size, hence patch_size % 16 == 0; then no cell (and no nucleus) straddles
# a nest. The stroma lattice is global and may straddle anything.
_BLAND_PITCH, _ATYPICAL_PITCH, _STROMA_PITCH = 16, 16, 32
# Atypical nuclei: semi-major axis (px), centre jitter (px), where the rim starts
# (fraction of the radius), nucleolus radius (px). 7.0 + 0.8 < 16 / 2 keeps them in their cell.
_ATYPICAL_RADIUS, _ATYPICAL_JITTER, _ATYPICAL_RIM, _NUCLEOLUS_RADIUS = (5.8, 7.0), 0.8, 0.62, (1.3, 1.9)
_SPRITES = 256  # nucleus variants per slide and kind
_ZONE_SIGMA = 2.0  # nests; smoothing of the random field that draws zonal architecture
_KEEP = {True: 0.95, False: 0.20}  # fraction of occupied cell slots in dense / sparse nests
_CYTOPLASM_H = {True: 0.16, False: 0.08}  # hematoxylin in the cytoplasm of dense / sparse nests
_CYTOPLASM_E = 0.34
_STROMA_KEEP = 0.14
_STROMA_H = 0.02


@dataclass
class DemoSlide:
    """One rendered demo slide (level 0) with its ground truth.

    ``rgb`` is [H, W, 3] uint8 at 0.5 µm/px; ``tissue_mask`` and ``lesion_mask``
    are [H, W] bool; ``lesion_polygons`` are [V, 2] float arrays of level-0
    (x, y) vertices, open (first vertex not repeated). ``dense_nests`` and
    ``lesion_nests`` are [H / N, W / N] bool maps of the nest grid, nest
    (row, col) covering level-0 px ``[row * N, (row + 1) * N) x [col * N, ...)``
    with ``N = nest_size = patch_size``; ``lesion_nests`` marks nests that
    contain lesion pixels.
    """

    rgb: np.ndarray
    tissue_mask: np.ndarray
    lesion_mask: np.ndarray
    lesion_polygons: list[np.ndarray]
    dense_nests: np.ndarray
    lesion_nests: np.ndarray
    nest_size: int


# ----------------------------------------------------------------------------- cohort table


def _check_args(n_slides: int, seed: int, patch_size: int) -> None:
    if n_slides < 1:
        raise MsamilError(f"demo cohort: n_slides must be at least 1, got {n_slides}")
    if seed < 0:
        raise MsamilError(f"demo cohort: seed must be a non-negative integer, got {seed}")
    if patch_size < 32 or patch_size % 16:
        raise MsamilError(
            f"demo cohort: patch_size must be a multiple of 16 and at least 32 (level-0 px), got {patch_size}; "
            "a nest of patch_size px must hold whole 16 px cells and whole JPEG blocks"
        )


def slide_id(index: int) -> str:
    """The id of demo slide ``index`` (0-based)."""
    return f"demo_{index:03d}"


def _patient_label(seed: int, patient: int) -> str:
    # Balanced in blocks of len(CLASSES) patients, whatever the cohort size.
    block, pos = divmod(patient, len(CLASSES))
    order = np.random.default_rng([seed, _STREAM_LABELS, block]).permutation(len(CLASSES))
    return CLASSES[int(order[pos])]


def _patient_has_two_slides(seed: int, patient: int) -> bool:
    block, pos = divmod(patient, TWO_SLIDE_EVERY)
    return pos == int(np.random.default_rng([seed, _STREAM_TWO_SLIDES, block]).integers(TWO_SLIDE_EVERY))


def _cohort_rows(n_slides: int, seed: int) -> list[tuple[int, str, str, str]]:
    """``(index, slide_id, patient_id, label)`` per slide; slide i's row does not depend on n_slides > i."""
    rows: list[tuple[int, str, str, str]] = []
    patient = 0
    while len(rows) < n_slides:
        label = _patient_label(seed, patient)
        for _ in range(2 if _patient_has_two_slides(seed, patient) else 1):
            if len(rows) < n_slides:
                rows.append((len(rows), slide_id(len(rows)), f"patient_{patient:03d}", label))
        patient += 1
    return rows


def cohort_table(
    n_slides: int = 30, seed: int = 0, out_dir: str | os.PathLike = "demo_data", patch_size: int = 256
) -> "pd.DataFrame":
    """The sheet ``generate_cohort`` writes, computed instantly without rendering anything.

    Returns a pandas DataFrame with columns ``slide_id, path, label, patient_id,
    annotation``; ``path`` (``<out_dir>/slides/<slide_id>.tiff``) and
    ``annotation`` (``<out_dir>/annotations/<slide_id>.geojson``) are absolute,
    resolved against the current working directory. ``patch_size`` (level-0 px)
    does not change the table; it is validated so that a bad value fails here,
    at workflow parse time, rather than in a job.
    """
    import pandas as pd

    _check_args(n_slides, seed, patch_size)
    out = Path(out_dir).resolve()
    records = [
        {
            "slide_id": sid,
            "path": str(out / "slides" / f"{sid}.tiff"),
            "label": label,
            "patient_id": patient,
            "annotation": str(out / "annotations" / f"{sid}.geojson"),
        }
        for _, sid, patient, label in _cohort_rows(n_slides, seed)
    ]
    return pd.DataFrame.from_records(records, columns=list(SHEET_COLUMNS))


# ----------------------------------------------------------------------------- colour model


@lru_cache(maxsize=1)
def _stain_lut() -> np.ndarray:
    """[65536, 3] uint8 RGB for index ``h * 256 + e`` (stain amounts h, e in 1/255 units)."""
    amount = np.arange(256, dtype=np.float64) / 255.0
    od = amount[:, None, None] * _OD_HEMATOXYLIN + amount[None, :, None] * _OD_EOSIN
    return np.clip(np.rint(_GLASS * np.exp(-od)), 0, 255).astype(np.uint8).reshape(65536, 3)


def _to_u8(amount: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(amount) * 255.0), 0, 255).astype(np.uint8)


def _colour(h: np.ndarray, e: np.ndarray) -> np.ndarray:
    """RGB uint8 [..., 3] from uint8 stain maps ``h`` (hematoxylin) and ``e`` (eosin)."""
    return np.take(_stain_lut(), (h.astype(np.uint16) << 8) | e, axis=0)


# ----------------------------------------------------------------------------- nucleus sprites


def _ellipse_distance(rng, n: int, pitch: int, radius: tuple[float, float], aspect: tuple[float, float], jitter: float):
    """Normalised elliptic distance [n, pitch, pitch] of each cell pixel from its nucleus centre.

    Each of the ``n`` cells of ``pitch`` x ``pitch`` level-0 px gets a nucleus with
    semi-axes ``a`` ~ U(radius) px and ``a * U(aspect)``, a random orientation and
    its centre jittered by up to ``jitter`` px; the caller keeps the nucleus
    inside the cell (``radius[1] + jitter < pitch / 2``). Returns the distance,
    ``a`` [n] and the geometry ``(centre [n, 2, 1, 1], a, b, theta)`` ([n, 1, 1] each).
    """
    centre = pitch / 2 + rng.uniform(-jitter, jitter, (n, 2, 1, 1))
    a = rng.uniform(*radius, (n, 1, 1))
    b = a * rng.uniform(*aspect, (n, 1, 1))
    theta = rng.uniform(0, np.pi, (n, 1, 1))
    grid = np.arange(pitch) + 0.5
    dx = grid[None, None, :] - centre[:, 0]
    dy = grid[None, :, None] - centre[:, 1]
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    return np.sqrt((u / a) ** 2 + (v / b) ** 2), a[:, 0, 0], (centre, a, b, theta)


def _edge(d: np.ndarray, a: np.ndarray) -> np.ndarray:
    # About one pixel of anti-aliasing across the outline (d = 1).
    return np.clip((1.0 - d) * a[:, None, None] + 0.5, 0.0, 1.0)


def _bland_sprites(rng, n: int) -> np.ndarray:
    """[n, 16, 16] hematoxylin ink: small (about 10 px = 5 µm) round, solid, dark nuclei."""
    d, a, _ = _ellipse_distance(rng, n, _BLAND_PITCH, radius=(4.4, 5.4), aspect=(0.82, 1.0), jitter=2.0)
    grain = 1.0 + 0.10 * rng.standard_normal(d.shape)
    return _edge(d, a) * rng.uniform(0.85, 1.0, (n, 1, 1)) * grain


def _atypical_sprites(rng, n: int) -> np.ndarray:
    """[n, p, p] hematoxylin ink (p = ``_ATYPICAL_PITCH``): large vesicular nuclei with a rim and a nucleolus."""
    pitch, (r0, r1), jitter = _ATYPICAL_PITCH, _ATYPICAL_RADIUS, _ATYPICAL_JITTER
    d, a, (centre, _, b, _) = _ellipse_distance(rng, n, pitch, radius=(r0, r1), aspect=(0.75, 0.95), jitter=jitter)
    rim = np.clip((d - _ATYPICAL_RIM) / 0.12, 0.0, 1.0)  # thick nuclear membrane
    ink = _edge(d, a) * (0.30 + 0.62 * rim) * (1.0 + 0.10 * rng.standard_normal(d.shape))
    # One nucleolus per nucleus, off centre but inside the pale interior.
    off_r = rng.uniform(0.0, 0.3, (n, 1, 1)) * b
    off_t = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    nc = centre + np.stack([off_r * np.cos(off_t), off_r * np.sin(off_t)], axis=1)
    grid = np.arange(pitch) + 0.5
    dn = np.hypot(grid[None, None, :] - nc[:, 0], grid[None, :, None] - nc[:, 1])
    rn = rng.uniform(*_NUCLEOLUS_RADIUS, (n, 1, 1))
    nucleolus = np.clip(rn - dn + 0.5, 0.0, 1.0)
    return np.maximum(ink, nucleolus)


def _stroma_sprites(rng, n: int) -> np.ndarray:
    """[n, 32, 32] hematoxylin ink: spindle fibroblast nuclei, one in five a small round lymphocyte."""
    d, a, _ = _ellipse_distance(rng, n, _STROMA_PITCH, radius=(7.0, 11.0), aspect=(0.20, 0.30), jitter=3.0)
    fibro = _edge(d, a) * rng.uniform(0.7, 0.9, (n, 1, 1))
    d2, a2, _ = _ellipse_distance(rng, n, _STROMA_PITCH, radius=(3.2, 3.8), aspect=(0.9, 1.0), jitter=8.0)
    lympho = _edge(d2, a2) * 0.95
    return np.where((rng.random(n) < 0.2)[:, None, None], lympho, fibro)


def _nest_bank(ink: np.ndarray, dense: bool, gain: float) -> np.ndarray:
    """uint8 hematoxylin cells [K + 1, p, p] for a dense or sparse nest; index 0 is an empty slot."""
    cyto = _CYTOPLASM_H[dense]
    empty = np.zeros((1,) + ink.shape[1:])
    return _to_u8(cyto + gain * np.concatenate([empty, ink]))


def _mean_nest_colour(ink: np.ndarray, dense: bool, gain: float) -> np.ndarray:
    """Expected mean RGB (float [3]) of a nest filled from ``ink`` sprites, before noise."""
    bank = _colour(_nest_bank(ink, dense, gain), np.uint8(_to_u8(_CYTOPLASM_E)))
    means = bank.reshape(len(bank), -1, 3).mean(axis=1)
    keep = _KEEP[dense]
    return (1.0 - keep) * means[0] + keep * means[1:].mean(axis=0)


@lru_cache(maxsize=1)
def _atypical_ink_gain() -> float:
    """Gain on atypical nuclear ink that equalises the mean colour of bland and atypical nests.

    Solved by bisection on large fixed sprite samples (seed-independent), on
    the summed RGB of dense and sparse nests; the colour model is monotone in
    the gain. It gives both cytologies the same colour once blurred (at 5x).
    """
    rng = np.random.default_rng(20240611)
    bland, atypical = _bland_sprites(rng, 1024), _atypical_sprites(rng, 256)

    def brightness(ink, gain):
        return sum(_mean_nest_colour(ink, dense, gain).sum() for dense in (True, False))

    target = brightness(bland, 1.0)
    lo, hi = 0.25, 4.0
    for _ in range(24):  # brackets the gain to 1e-7 relative
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if brightness(atypical, mid) > target else (lo, mid)
    return 0.5 * (lo + hi)


def _lattice(bank: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Assemble [R * p, C * p] pixels from ``bank`` [K, p, p] cells chosen by ``index`` [R, C]."""
    cells = bank[index]  # [R, C, p, p]
    r, c, p, _ = cells.shape
    return cells.transpose(0, 2, 1, 3).reshape(r * p, c * p)


# ----------------------------------------------------------------------------- layout


def _blob(rng, centre, radii, angle: float, roughness: float, n_vertices: int = 120) -> np.ndarray:
    """Irregular closed outline [n_vertices, 2] (x, y): an ellipse with smooth random lobes."""
    t = np.linspace(0.0, 2 * np.pi, n_vertices, endpoint=False)
    r = np.ones_like(t)
    for k in range(2, 8):  # low harmonics only: lobes, no spikes
        r += roughness / k**0.7 * rng.standard_normal() * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    r = np.clip(r, 0.55, 1.6)
    x, y = radii[0] * r * np.cos(t), radii[1] * r * np.sin(t)
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([centre[0] + c * x - s * y, centre[1] + s * x + c * y], axis=1)


def _polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def rasterise_polygons(polygons: Sequence[np.ndarray], size: tuple[int, int], scale: float = 1.0) -> np.ndarray:
    """Bool mask [H, W] of the union of ``polygons`` ([V, 2] level-0 (x, y) each).

    ``size`` is the mask's (W, H) in px and ``scale`` its px per level-0 px (1 for level 0,
    1/16 for a 16x downsampled mask). PIL fills the pixels whose integer position lies in
    (or on) the polygon.
    """
    from PIL import Image, ImageDraw

    img = Image.new("L", size, 0)
    draw = ImageDraw.Draw(img)
    for poly in polygons:
        draw.polygon([(float(x) * scale, float(y) * scale) for x, y in poly], fill=1)
    return np.asarray(img).view(bool)  # 0/1 bytes: a free view, unlike mode "1"


@dataclass
class _Layout:
    width: int
    height: int
    tissue: list[np.ndarray]
    lesions: list[np.ndarray]
    artefacts: list[tuple[str, np.ndarray, tuple[float, float, float], float, float]]


def _layout(seed: int, index: int, patch_size: int) -> _Layout:
    """Tissue and lesion outlines (level-0 px) and glass artefacts of slide ``index``; label-independent."""
    from scipy import ndimage

    rng = np.random.default_rng([seed, _STREAM_LAYOUT, index])
    field = 4 * patch_size
    width, height = SLIDE_FIELDS[0] * field, SLIDE_FIELDS[1] * field
    margin = 0.12 * field

    main = _blob(
        rng,
        centre=(width / 2 + rng.uniform(-0.3, 0.3) * field, height / 2 + rng.uniform(-0.25, 0.25) * field),
        radii=(rng.uniform(3.0, 3.35) * field, rng.uniform(2.2, 2.45) * field),
        angle=rng.uniform(-0.25, 0.25),
        roughness=0.10,
    )
    tissue = [main]
    for _ in range(int(rng.integers(0, 3))):  # small fragments, anywhere on the glass
        r = rng.uniform(0.45, 0.8) * field
        centre = (rng.uniform(r, width - r), rng.uniform(r, height - r))
        tissue.append(_blob(rng, centre, (r, r * rng.uniform(0.6, 1.0)), rng.uniform(0, np.pi), roughness=0.15))
    for poly in tissue:
        np.clip(poly[:, 0], margin, width - margin, out=poly[:, 0])
        np.clip(poly[:, 1], margin, height - margin, out=poly[:, 1])

    # Lesions: rejection-sample outlines that fit in the main section with a
    # margin, checked on a raster of 64 px per 5x field (1/16 at the default size;
    # the margin of 2 raster px is 1/32 of a field).
    lowres = 64 / field
    low_size = (SLIDE_FIELDS[0] * 64, SLIDE_FIELDS[1] * 64)
    room = ndimage.binary_erosion(rasterise_polygons([main], low_size, lowres), iterations=2)
    share = rng.uniform(0.26, 0.36) * _polygon_area(main)
    n_lesions = 1 if rng.random() < 0.6 else 2
    areas = [share] if n_lesions == 1 else list(share * np.array([0.55, 0.45]))
    lesions: list[np.ndarray] = []
    taken = np.zeros_like(room)
    for area in areas:
        for attempt in range(400):
            shrink = 0.97 ** (attempt // 40)  # give up a little area rather than fail
            aspect = rng.uniform(1.0, 1.35)
            r_eq = np.sqrt(area * shrink / np.pi)
            cand = _blob(
                rng,
                centre=(rng.uniform(0, width), rng.uniform(0, height)),
                radii=(r_eq * np.sqrt(aspect), r_eq / np.sqrt(aspect)),
                angle=rng.uniform(0, np.pi),
                roughness=0.08,
            )
            mask = rasterise_polygons([cand], low_size, lowres)
            if not (mask & ~room).any() and not (ndimage.binary_dilation(mask, iterations=4) & taken).any():
                lesions.append(np.round(cand, 2))
                taken |= mask
                break
        else:  # pragma: no cover - the shrink schedule makes this unreachable in practice
            raise MsamilError(f"demo slide {slide_id(index)}: could not place a lesion (seed {seed})")

    # Glass artefacts on some slides, placed on glass well away from tissue so
    # the lesion and its annotation are never touched.
    artefacts = []
    glass = ~ndimage.binary_dilation(rasterise_polygons(tissue, low_size, lowres), iterations=6)
    kind = {3: "pen", 7: "dust"}.get(index % 10)  # three of each in 30 slides
    for _ in range(200 if kind else 0):
        if kind == "pen":
            start = np.array([rng.uniform(0, width), rng.uniform(0, height)])
            heading = rng.uniform(0, 2 * np.pi)
            length = rng.uniform(0.6, 1.2) * field
            bend = rng.uniform(-0.4, 0.4)
            t = np.linspace(0, 1, 24)[:, None]
            ang = heading + bend * t
            path = start + np.cumsum(np.concatenate([np.cos(ang), np.sin(ang)], axis=1) * length / 24, axis=0)
            colour = ((40, 140, 90), (45, 70, 170))[int(rng.integers(2))]
            item = ("pen", path, colour, float(rng.uniform(0.04, 0.07) * field), 0.8)
        else:
            centre = np.array([rng.uniform(0, width), rng.uniform(0, height)])
            path = _blob(rng, centre, (rng.uniform(12, 30),) * 2, 0.0, roughness=0.3, n_vertices=24)
            item = ("dust", path, (30.0, 28.0, 30.0), 0.0, 0.95)
        pts = item[1] * lowres
        ok = (
            (pts[:, 0] >= 2).all() and (pts[:, 0] < low_size[0] - 2).all() and (pts[:, 1] >= 2).all()
            and (pts[:, 1] < low_size[1] - 2).all()
            and glass[pts[:, 1].astype(int), pts[:, 0].astype(int)].all()
        )
        if ok:
            artefacts.append(item)
            if kind == "pen" or len(artefacts) == 3:  # one stroke, or a few specks
                break
    return _Layout(width, height, tissue, lesions, artefacts)


def _nest_map(seed: int, index: int, coverage: np.ndarray, architecture: str) -> np.ndarray:
    """Bool [rows, cols] dense-nest map from the lesion coverage [rows, cols] (0..1) of each nest.

    ``alternating``: a checkerboard with a random phase. ``zonal``: the same number
    of dense nests, within each coverage class (whole, >= 0.7, < 0.7 of the nest in
    the lesion), given to the nests where a smooth random field is highest, so
    dense and sparse nests gather into zones about ``_ZONE_SIGMA`` nests wide.
    Keeping the counts per coverage class makes the nests a pipeline keeps at 20x
    (coverage >= 0.7) have the same number of dense ones under both architectures.
    """
    from scipy import ndimage

    rng = np.random.default_rng([seed, _STREAM_NESTS, index])
    rows, cols = np.indices(coverage.shape)
    dense = (rows + cols + int(rng.integers(2))) % 2 == 0
    field = ndimage.gaussian_filter(rng.standard_normal(coverage.shape), _ZONE_SIGMA, mode="wrap")
    if architecture == "zonal":
        for group in (coverage >= 1.0, (coverage >= 0.7) & (coverage < 1.0), (coverage > 0) & (coverage < 0.7)):
            n_dense = int(dense[group].sum())
            ranked = np.argsort(-field[group], kind="stable")
            zone = np.zeros(ranked.size, bool)
            zone[ranked[:n_dense]] = True
            dense[group] = zone
    return dense


# ----------------------------------------------------------------------------- rendering


def _stroma_eosin(rng, layout: _Layout) -> np.ndarray:
    """uint8 [H, W] eosin amount: collagen bundles in tissue, soft edges, zero on glass.

    Computed at 1/4 resolution (the structures are >= 8 px wide) and
    upsampled bilinearly, which is much cheaper than full resolution.
    """
    from PIL import Image

    q = 4
    wq, hq = layout.width // q, layout.height // q
    x = np.arange(wq, dtype=np.float32)[None, :] * q
    y = np.arange(hq, dtype=np.float32)[:, None] * q

    def smooth_field(n_terms: int, period: tuple[float, float]) -> np.ndarray:
        # Sum of separable cosines: smooth random variation at low cost.
        f = np.zeros((hq, wq), np.float32)
        for _ in range(n_terms):
            kx, ky = 2 * np.pi / rng.uniform(*period), 2 * np.pi / rng.uniform(*period)
            f += np.cos(kx * x + rng.uniform(0, 2 * np.pi)) * np.cos(ky * y + rng.uniform(0, 2 * np.pi))
        return f / np.sqrt(n_terms / 4)

    angle = rng.uniform(0, np.pi)
    wavelength = rng.uniform(26, 34)  # px between collagen bundles
    warp = smooth_field(5, (600, 2400)) * 40.0
    phase = (x * np.cos(angle) + y * np.sin(angle) + warp) * (2 * np.pi / wavelength)
    bundles = (0.5 + 0.5 * np.sin(phase)) ** 2
    eosin = 0.50 + 0.07 * smooth_field(6, (800, 3000)) + 0.30 * (bundles - 0.33)
    # Zero on glass; the bilinear upsampling below softens the tissue edge over ~4 px.
    eosin *= rasterise_polygons(layout.tissue, (wq, hq), 1 / q)
    small = Image.fromarray(_to_u8(eosin))
    return np.asarray(small.resize((layout.width, layout.height), Image.BILINEAR))


def _paint_artefacts(rgb: np.ndarray, layout: _Layout) -> None:
    from PIL import Image, ImageDraw

    for kind, path, colour, width, alpha in layout.artefacts:
        pad = int(width) + 4
        x0, y0 = np.floor(path.min(axis=0)).astype(int) - pad
        x1, y1 = np.ceil(path.max(axis=0)).astype(int) + pad
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, layout.width), min(y1, layout.height)
        mask = Image.new("L", (x1 - x0, y1 - y0), 0)
        pts = [(float(x) - x0, float(y) - y0) for x, y in path]
        if kind == "pen":
            ImageDraw.Draw(mask).line(pts, fill=255, width=int(width), joint="curve")
        else:
            ImageDraw.Draw(mask).polygon(pts, fill=255)
        m = np.asarray(mask, np.float32)[..., None] * (alpha / 255.0)
        region = rgb[y0:y1, x0:x1].astype(np.float32)
        rgb[y0:y1, x0:x1] = np.rint(region * (1 - m) + np.asarray(colour, np.float32) * m).astype(np.uint8)


def render_slide(index: int, label: str, seed: int = 0, patch_size: int = 256) -> DemoSlide:
    """Render demo slide ``index`` with class ``label`` at level 0 (0.5 µm/px).

    The result depends only on ``(seed, index, label, patch_size)``; the
    layout (tissue, lesions, artefacts) depends only on ``(seed, index,
    patch_size)``. Size: 32 x 24 ``patch_size`` level-0 px (8192 x 6144 at the
    default 256). Memory: about 16 bytes per pixel while rendering.
    """
    _check_args(1, seed, patch_size)
    if label not in CLASSES:
        raise MsamilError(
            f"demo slide {slide_id(index)}: unknown label {label!r}; expected one of {', '.join(CLASSES)}"
        )
    cytology, architecture = label.split("_")
    layout = _layout(seed, index, patch_size)
    width, height, nest = layout.width, layout.height, patch_size

    tissue = rasterise_polygons(layout.tissue, (width, height))
    lesion = rasterise_polygons(layout.lesions, (width, height))
    coverage = lesion.reshape(height // nest, nest, width // nest, nest).sum(axis=(1, 3), dtype=np.int64) / nest**2
    lesion_nests = coverage > 0
    dense = _nest_map(seed, index, coverage, architecture)

    rng = np.random.default_rng([seed, _STREAM_TEXTURE, index])
    eosin = _stroma_eosin(rng, layout)
    if cytology == "bland":
        pitch, ink, gain = _BLAND_PITCH, _bland_sprites(rng, _SPRITES), 1.0
    else:
        pitch, ink, gain = _ATYPICAL_PITCH, _atypical_sprites(rng, _SPRITES), _atypical_ink_gain()
    # One bank, sparse cells first then dense ones: a cell's index encodes its nest type.
    nest_bank = np.concatenate([_nest_bank(ink, False, gain), _nest_bank(ink, True, gain)])
    stroma_ink = _stroma_sprites(rng, _SPRITES)
    stroma_bank = _to_u8(_STROMA_H + np.concatenate([np.zeros_like(stroma_ink[:1]), stroma_ink]))
    # Sensor noise: a sum of two discrete uniforms (triangular, sd 2.8 levels) is
    # close enough to Gaussian and several times cheaper to draw.
    shape = (nest, 1024 + width, 3)
    noise = rng.integers(-3, 4, shape, dtype=np.int16) + rng.integers(-3, 4, shape, dtype=np.int16)
    cyto_e = _to_u8(_CYTOPLASM_E)

    rgb = np.empty((height, width, 3), np.uint8)
    cells_per_nest = nest // pitch
    for row in range(height // nest):  # one nest row at a time bounds memory
        ys = slice(row * nest, (row + 1) * nest)
        t_band, l_band, e_band = tissue[ys], lesion[ys], eosin[ys]
        n_stroma = (nest // _STROMA_PITCH, width // _STROMA_PITCH)
        slots = np.where(rng.random(n_stroma) < _STROMA_KEEP, rng.integers(1, _SPRITES + 1, n_stroma), 0)
        h_band = _lattice(stroma_bank, slots) * t_band
        cols = np.flatnonzero(lesion_nests[row])
        if cols.size:
            # Cell slots of the lesion nests' column range; each slot draws from its own nest's bank.
            c0, c1 = cols[0], cols[-1] + 1
            xs = slice(c0 * nest, c1 * nest)
            n_cells = (cells_per_nest, (c1 - c0) * cells_per_nest)
            nest_dense = np.repeat(dense[row, c0:c1], cells_per_nest)[None, :]
            keep = np.where(nest_dense, _KEEP[True], _KEEP[False])
            slots = np.where(rng.random(n_cells) < keep, rng.integers(1, _SPRITES + 1, n_cells), 0)
            slots += nest_dense * (_SPRITES + 1)
            l_band = l_band[:, xs]
            h_band[:, xs] = np.where(l_band, _lattice(nest_bank, slots), h_band[:, xs])
            e_band = e_band.copy()
            e_band[:, xs][l_band] = cyto_e
        shift = int(rng.integers(1024))  # decorrelate the noise of successive bands
        band = _colour(h_band, e_band).astype(np.int16)
        band += noise[:, shift : shift + width]
        rgb[ys] = np.clip(band, 0, 255, out=band)
    _paint_artefacts(rgb, layout)
    return DemoSlide(
        rgb=rgb,
        tissue_mask=tissue,
        lesion_mask=lesion,
        lesion_polygons=layout.lesions,
        dense_nests=dense,
        lesion_nests=lesion_nests,
        nest_size=nest,
    )


# ----------------------------------------------------------------------------- writing


def write_pyramid_tiff(
    path: str | os.PathLike,
    rgb: np.ndarray,
    mpp: float = MPP,
    description: str = "",
    downsamples: Sequence[int] = LEVEL_DOWNSAMPLES,
) -> None:
    """Write ``rgb`` [H, W, 3] uint8 as a pyramidal, JPEG-tiled TIFF that OpenSlide opens.

    Levels have ``downsamples`` (each a multiple of the one before; box-filtered); the reduced
    levels carry NewSubfileType 1, without which OpenSlide's generic-tiff backend
    ignores them. Resolution tags are in px/cm, ``1e4 / mpp`` at level 0 (mpp in
    µm/px), which OpenSlide 4 reports as ``openslide.mpp-x/y``. Written
    atomically, byte-identical for identical input.
    """
    import tifffile
    from PIL import Image

    level = rgb
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp) as tiff:
        previous = 1
        for i, downsample in enumerate(downsamples):
            if i:
                level = np.asarray(Image.fromarray(level).reduce(downsample // previous))
            previous = downsample
            px_per_cm = 1e4 / (mpp * downsample)
            tiff.write(
                level,
                photometric="rgb",
                tile=(TIFF_TILE, TIFF_TILE),
                compression="jpeg",
                compressionargs={"level": JPEG_QUALITY},
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=1 if i else 0,
                description=description if i == 0 else None,
                metadata=None,
                software="msamil",
                maxworkers=1,  # parallelism is over slides
            )


def write_repeated_tile_tiff(
    path: str | os.PathLike,
    size: tuple[int, int],
    tile: np.ndarray,
    mpp: float = MPP,
    downsamples: Sequence[int] = (1,),
) -> None:
    """Write a JPEG-tiled TIFF of ``size`` (W, H) px whose level 0 repeats ``tile`` [T, T, 3]
    uint8, T a multiple of every downsample: a slide of any size in seconds and little disk
    (each tile is encoded once per level and its bytes written for every tile). Levels as in
    :func:`write_pyramid_tiff`; level ``d`` repeats ``tile`` box-filtered by ``d``, which is
    level 0 box-filtered where the size is a multiple of T. For memory and speed checks on
    slides of 100,000s of px (bench/big_slide.py, tests/test_big_slide.py). ``size`` must be a
    multiple of every downsample, so that each level's downsample is exact."""
    import io

    import tifffile
    from PIL import Image

    t = tile.shape[0]
    if tile.shape != (t, t, 3) or tile.dtype != np.uint8 or t % 16 or any(t % d for d in downsamples):
        raise ValueError(f"tile must be [T, T, 3] uint8 with T a multiple of 16 and of {list(downsamples)}")
    if any(side % d for side in size for d in downsamples):
        raise ValueError(f"size {size} must be a multiple of every downsample {list(downsamples)}")
    options = dict(photometric="rgb", tile=(t, t), compression="jpeg", compressionargs={"level": JPEG_QUALITY})
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tiff:
        for i, downsample in enumerate(downsamples):
            small = np.asarray(Image.fromarray(tile).reduce(downsample)) if downsample > 1 else tile
            level_tile = np.tile(small, (downsample, downsample, 1))
            with io.BytesIO() as buffer:  # tifffile's own encoding of the tile, read back
                with tifffile.TiffWriter(buffer) as one:
                    one.write(level_tile, **options)
                buffer.seek(0)
                with tifffile.TiffFile(buffer) as encoded:
                    page = encoded.pages[0]
                    encoded.filehandle.seek(page.dataoffsets[0])
                    data = encoded.filehandle.read(page.databytecounts[0])
            w, h = size[0] // downsample, size[1] // downsample
            count = -(-w // t) * -(-h // t)
            px_per_cm = 1e4 / (mpp * downsample)
            tiff.write((data for _ in range(count)), shape=(h, w, 3), dtype=np.uint8, **options,
                       resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER",
                       subfiletype=1 if i else 0, metadata=None, software="msamil")


def lesion_geojson(polygons: Sequence[np.ndarray]) -> dict:
    """QuPath-style GeoJSON FeatureCollection of lesion polygons (level-0 px, rings closed).

    One Polygon feature per lesion, classified ``Tumor`` like the lesion outlines
    :mod:`msamil_core.wsi.geojson` writes, so QuPath shows both alike.
    """
    from ..wsi.geojson import LESION_COLOUR, feature_collection

    features = []
    for k, poly in enumerate(polygons, start=1):
        ring = [[float(x), float(y)] for x, y in poly]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring + [ring[0]]]},
                "properties": {
                    "objectType": "annotation",
                    "name": f"lesion {k}",
                    "classification": {"name": "Tumor", "color": list(LESION_COLOUR)},
                },
            }
        )
    return feature_collection(features)


def _write_slide(job: tuple[int, str, str, int, int, str, str]) -> str:
    index, sid, label, seed, patch_size, tiff_path, geojson_path = job
    slide = render_slide(index, label, seed=seed, patch_size=patch_size)
    write_pyramid_tiff(tiff_path, slide.rgb, description=f"msamil synthetic demo slide {sid}")
    write_json(geojson_path, lesion_geojson(slide.lesion_polygons))
    return sid


def generate_cohort(
    out_dir: str | os.PathLike,
    n_slides: int = 30,
    seed: int = 0,
    patch_size: int = 256,
    threads: int = 1,
    slide_ids: Sequence[str] | None = None,
    *,
    progress: bool = False,
) -> "pd.DataFrame":
    """Write the demo cohort under ``out_dir`` and return its sheet (``cohort_table``).

    Writes ``slides/<slide_id>.tiff``, ``annotations/<slide_id>.geojson`` for
    every slide (or only ``slide_ids``) and always the full ``slides.csv``,
    each file atomically. ``threads`` worker processes render slides in
    parallel; ``progress`` shows a tqdm bar over slides. About 1 s and 0.5 GB
    of memory per worker per slide at the default size.
    """
    from tqdm import tqdm

    if threads < 1:
        raise MsamilError(f"demo cohort: threads must be at least 1, got {threads}")
    table = cohort_table(n_slides, seed, out_dir, patch_size)
    rows = _cohort_rows(n_slides, seed)
    if slide_ids is not None:
        unknown = sorted(set(slide_ids) - set(table["slide_id"]))
        if unknown:
            raise MsamilError(
                f"demo cohort: unknown slide id(s) {', '.join(unknown)}; a cohort of {n_slides} slides has "
                f"{slide_id(0)} .. {slide_id(n_slides - 1)} (raise --n-slides?)"
            )
        rows = [r for r in rows if r[1] in set(slide_ids)]
    paths = table.set_index("slide_id")
    jobs = [
        (index, sid, label, seed, patch_size, paths.at[sid, "path"], paths.at[sid, "annotation"])
        for index, sid, _, label in rows
    ]
    bar = tqdm(total=len(jobs), desc="demo slides", unit="slide", disable=not progress)
    with bar:
        if threads == 1 or len(jobs) <= 1:
            for job in jobs:
                _write_slide(job)
                bar.update()
        else:
            # spawn, not fork: the caller may hold threads (torch, pytest plugins).
            with ProcessPoolExecutor(min(threads, len(jobs)), mp_context=get_context("spawn")) as pool:
                for future in as_completed([pool.submit(_write_slide, job) for job in jobs]):
                    future.result()
                    bar.update()
    sheet = Path(out_dir) / "slides.csv"
    relative = table.copy()
    for column in ("path", "annotation"):  # from the sheet's folder: the cohort moves with its sheet
        relative[column] = [Path(p).relative_to(Path(out_dir).resolve()).as_posix() for p in table[column]]
    with atomic_path(sheet) as tmp:
        relative.to_csv(tmp, index=False)
    log.info("demo cohort: %d of %d slides written under %s", len(jobs), len(table), Path(out_dir).resolve())
    return table
