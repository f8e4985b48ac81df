"""Tissue masks on thumbnails, and the PNG mask files.

Brightfield (H&E and the like): tissue is what is more saturated than the glass. The saturation
threshold is Otsu's on the thumbnail, never below ``min_saturation``, so a nearly empty slide
does not turn its glass noise into tissue. Pen marks (blue, green, black ink) and dark grey
artefacts (dust, bubbles' rims, the slide edge) are removed by colour; dark stained pixels (dense
nuclei, keratin) stay tissue. Then morphology closes small gaps, fills the holes up to
``max_hole_area`` µm² and drops the pieces under ``min_object_area`` µm², areas read through the
thumbnail's µm/px (fractions of the thumbnail where it is unknown).

Fluorescence slides (dark background) are detected from the thumbnail's border and thresholded
on the local density of signal instead, dim stroma included, with a wider closing because nuclei
stains leave gaps between cells.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..errors import MsamilError
from ..settings import TissueSettings


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (maximises the between-class variance)."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1e-12)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def is_fluorescence(rgb: np.ndarray) -> bool:
    """True when the thumbnail's border (mostly background) is dark, as in fluorescence scans."""
    return float(np.median(_border(rgb.max(axis=2)))) < 0.3 * 255


# A dark pixel whose HSV saturation is below this is grey: black ink, dust, a bubble's rim.
# Haematoxylin-dark nuclei and keratin are dark but purple (saturation 0.4 and more on H&E
# thumbnails); below ~20 grey levels the hue is noise, so such pixels count as grey too.
_GREY_SATURATION = 0.35
_BLACK = 20


def pen_and_artefact_mask(rgb: np.ndarray, dark_threshold: float = 0.25, remove_pen: bool = True) -> np.ndarray:
    """Pixels that are ink or dark artefacts rather than stained tissue, bool [h, w].

    Eosin is pink-red and haematoxylin blue-purple, so at thumbnail scale tissue has red at least
    close to blue and more red than green. Blue ink has far less red than blue, green ink more
    green than red, black ink and dust are dark and grey. Dark stained pixels (dense nuclei,
    keratin) are tissue, not artefacts.
    """
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    brightest = rgb.max(axis=2).astype(np.int16)
    saturation = (brightest - rgb.min(axis=2)) / np.maximum(brightest, 1)
    dark = (brightest < dark_threshold * 255) & ((saturation < _GREY_SATURATION) | (brightest < _BLACK))
    if not remove_pen:
        return dark
    blue = (b > r + 60) & (b > g + 30)
    green = (g > r + 15) & (g >= b - 10)
    return dark | blue | green


def clean_mask(mask: np.ndarray, close_radius: int, min_object_px: float, max_hole_px: float,
               exclude: np.ndarray | None = None) -> np.ndarray:
    """Morphological clean-up of a bool mask [h, w]: closing (``close_radius`` px, 0 = none) and a
    1-px opening, removal of ``exclude`` (bool [h, w]), filling of holes up to ``max_hole_px`` px
    (an excluded speck inside tissue, such as a colour fringe, is filled too), removal of pieces
    smaller than ``min_object_px`` px."""
    from scipy import ndimage as ndi  # here: the workflow imports this module to plan, not to compute

    if close_radius > 0:
        structure = _disk(close_radius)
        mask = ndi.binary_closing(mask, structure=structure, border_value=0)
        mask = ndi.binary_opening(mask, structure=_disk(1))
    if exclude is not None:
        mask &= ~exclude
    # Fill holes up to a size: cracks, nuclei and fat cells are tissue; large lumina and glass gaps are not.
    holes = ndi.binary_fill_holes(mask) & ~mask
    labels, n = ndi.label(holes)
    if n:
        sizes = np.bincount(labels.ravel())
        small = sizes <= max_hole_px
        small[0] = False
        mask = mask | small[labels]
    labels, n = ndi.label(mask)
    if n:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= max(1.0, min_object_px)
        keep[0] = False
        mask = keep[labels]
    return mask


def _disk(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def _areas_px(params: TissueSettings, shape: tuple[int, ...], mpp: float | None) -> tuple[float, float]:
    """(smallest piece, largest filled hole) in thumbnail px: the µm² settings through the
    thumbnail's ``mpp`` (µm/px), or without one the fractions of the thumbnail."""
    if mpp:
        return params.min_object_area / mpp**2, params.max_hole_area / mpp**2
    area = shape[0] * shape[1]
    return params.min_object_fraction * area, params.max_hole_fraction * area


def tissue_mask(rgb: np.ndarray, params: TissueSettings | None = None, mpp: float | None = None) -> np.ndarray:
    """Tissue mask of an RGB uint8 thumbnail [h, w, 3] whose pixels are ``mpp`` µm wide
    (:func:`~msamil_core.wsi.thumbnail.thumbnail_mpp`; None: unknown); bool [h, w]."""
    from scipy import ndimage as ndi

    params = params or TissueSettings()
    min_object_px, max_hole_px = _areas_px(params, rgb.shape, mpp)
    mode = params.mode
    if mode == "auto":
        mode = "fluorescence" if is_fluorescence(rgb) else "brightfield"
    if mode == "fluorescence":
        return clean_mask(_fluorescence_signal(rgb), max(params.close_radius, 4), min_object_px, max_hole_px)
    hsv = np.asarray(Image.fromarray(rgb).convert("HSV"))
    sat = hsv[..., 1].astype(np.float32) / 255.0
    artefacts = pen_and_artefact_mask(rgb, params.dark_threshold, params.remove_pen)
    candidates = sat[~artefacts]
    thr = otsu_threshold(candidates) if candidates.size else 1.0
    thr = max(thr, params.min_saturation)
    mask = (sat > thr) & ~artefacts
    # Ink often has a halo after closing: the dilated ink stays out.
    halo = ndi.binary_dilation(artefacts, structure=_disk(1)) if artefacts.any() else None
    return clean_mask(mask, params.close_radius, min_object_px, max_hole_px, exclude=halo)


def _fluorescence_signal(rgb: np.ndarray) -> np.ndarray:
    """Pixels of a fluorescence thumbnail [h, w, 3] whose local signal is above the glass's, bool [h, w].

    Nuclear stains light nuclei, not the cytoplasm and stroma between them: threshold the local
    density of signal (brightness smoothed over ~1.5 % of the long side), on a log scale because
    glass and dim tissue differ by a few grey levels only. Three levels are told apart, glass,
    dim tissue (stroma, autofluorescent) and nuclei: Otsu's threshold splits off the nuclei, a
    second one below it the glass. The border (mostly glass, :func:`is_fluorescence`) keeps that
    second threshold 2 grey levels above the glass's median, so a slide without dim tissue does
    not split its glass noise in two.
    """
    from scipy import ndimage as ndi

    value = rgb.max(axis=2).astype(np.float32)
    window = max(3, round(0.015 * max(rgb.shape[:2])))
    density = np.log1p(ndi.uniform_filter(value, window)) / np.log(256.0)
    nuclei = otsu_threshold(density)
    dim = density[density < nuclei]
    glass = otsu_threshold(dim) if dim.size else nuclei
    floor = np.log1p(float(np.median(_border(value))) + 2) / np.log(256.0)
    return density > max(glass, floor)


def _border(value: np.ndarray) -> np.ndarray:
    """The 4-px frame of a [h, w] image, flattened."""
    return np.concatenate([value[:4].ravel(), value[-4:].ravel(), value[:, :4].ravel(), value[:, -4:].ravel()])


def slide_tissue_mask(rgb: np.ndarray, params: TissueSettings, slide_id: str, mpp: float | None = None) -> np.ndarray:
    """:func:`tissue_mask` of a slide's thumbnail (``mpp`` µm/px); fails naming the slide when less
    than ``params.min_tissue_fraction`` of the thumbnail is tissue."""
    mask = tissue_mask(rgb, params, mpp)
    fraction = float(mask.mean())
    if fraction < params.min_tissue_fraction:
        raise MsamilError(
            f"slide {slide_id!r}: no tissue found ({fraction:.2%} of the thumbnail); check the slide, "
            "or lower tissue.min_saturation in the config, or remove the slide from the sheet"
        )
    return mask
