"""Feature bags: one slide's patch features with their coordinates and scales.

Our bags are ``.pt`` dicts (``features`` float [N, D], ``coords`` int64 [N, 2] level-0 top-left,
``scales`` int64 [N] with 0 = 20x, 1 = 10x, 2 = 5x, ``patch_size_level0`` int64 [N], ``slide_id``,
``encoder``), written by ``msamil extract``. Bags made by other tools load the same way:

* TRIDENT feature ``.h5``: datasets ``features`` [N, D] and ``coords`` [N, 2]; the attributes of
  ``coords`` (``patch_size_level0``, ``target_magnification``, ...) give the patch extent and the
  scale, the ``encoder`` attribute of ``features`` the encoder. The slide id of an ``.h5`` bag is
  its file name's stem (how :func:`find_bag` pairs files with sheet rows).
* CLAM feature ``.h5`` (``h5_files/``): root datasets ``features`` [N, D] (sometimes [1, N, D])
  and ``coords`` [N, 2] (int32), usually without attributes; the patch extent is then read off
  the coordinate grid.
* CLAM ``.pt`` (``pt_files/``): a bare tensor [N, D], and TRIDENT ``.pt``: a bare numpy array;
  these have no coordinates, so they load only where coordinates are not needed.

A single-scale file (TRIDENT, CLAM) gets the scale of its ``target_magnification`` (20 -> 0,
10 -> 1, 5 -> 2), or 0 without one. Everything is read with ``torch.load(weights_only=True)`` or
h5py: no file a user hands us can run code.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MsamilError
from ..fileio import save_torch, torch_load
from ..wsi.coords import read_coords
from ..wsi.geometry import SCALES, scale_counts, scale_index

log = logging.getLogger(__name__)

BAG_SUFFIXES = (".pt", ".h5")


@dataclass
class Bag:
    """One slide's patch features.

    Attributes:
        features: float [N, D] (float32 from :func:`load_bag`; float16 if stored so).
        coords: int64 [N, 2], level-0 top-left (x, y) in pixels; -1 where the source has none.
        scales: int64 [N], index into :data:`msamil_core.wsi.geometry.SCALES` (0 = 20x, 1 = 10x, 2 = 5x).
        patch_size_level0: int64 [N], each patch's side in level-0 pixels (0 = unknown).
        slide_id: the slide's identifier.
        encoder: the encoder that made the features (``name-<hash>`` for ours).
        has_coords: False for sources without coordinates (bare CLAM/TRIDENT ``.pt``).
        patches_encoded: patches the extraction job read and encoded for this and the bags it
            wrote beside it (their union; each shared patch is encoded once); None = this bag's.
        slide_digest: the digest of the slide file the patches were read from
            (:func:`~msamil_core.wsi.thumbnail.file_identity`); None for bags of other tools.
        left_out: why the slide has no features (its tiles failed to decode), for an empty bag
            the extraction wrote in its place (``msamil extract --leave-out-unreadable``); None otherwise.
    """

    features: torch.Tensor
    coords: torch.Tensor
    scales: torch.Tensor
    patch_size_level0: torch.Tensor
    slide_id: str
    encoder: str
    has_coords: bool = True
    patches_encoded: int | None = None
    slide_digest: str | None = None
    left_out: str | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        """Feature width D."""
        return int(self.features.shape[1])

    def scale_counts(self) -> dict[str, int]:
        """Patches per scale, e.g. ``{"20x": 120, "10x": 30, "5x": 8}``."""
        return scale_counts(self.scales)

    def to_dict(self) -> dict[str, Any]:
        """The ``.pt`` layout of the SPEC (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "features": self.features,
            "coords": self.coords,
            "scales": self.scales,
            "patch_size_level0": self.patch_size_level0,
            "slide_id": self.slide_id,
            "encoder": self.encoder,
        } | ({} if self.patches_encoded is None else {"patches_encoded": int(self.patches_encoded)}) | (
            {} if self.slide_digest is None else {"slide_digest": self.slide_digest}) | (
            {} if self.left_out is None else {"left_out": self.left_out})


def save_bag(path: str | os.PathLike, bag: Bag, move: bool = True) -> Path:
    """Write ``bag`` as our ``.pt`` dict, atomically; with ``move=False`` into a temporary beside
    ``path`` that the caller moves into place (:func:`~msamil_core.fileio.commit`). Returns the
    file written."""
    if not bag.has_coords:
        raise MsamilError(f"{path}: a bag without coordinates cannot be written as an msamil bag")
    _check(bag, path)
    return save_torch(path, bag.to_dict(), move)


def load_bag(path: str | os.PathLike, require_coords: bool = True) -> Bag:
    """Read a bag: ours (``.pt`` dict), TRIDENT or CLAM (``.h5``), or a bare CLAM/TRIDENT ``.pt``.

    Args:
        path: the file.
        require_coords: fail on sources without coordinates (bare ``.pt`` feature files); with
            False such a bag loads with coords -1, patch_size_level0 0 and ``has_coords`` False.

    Returns:
        A :class:`Bag` with float32 features and int64 coords, scales and patch_size_level0.

    Raises:
        MsamilError: the file is missing, unreadable or malformed (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise MsamilError(f"feature bag {path}: file not found; run `msamil extract` for this slide")
    if path.suffix in (".h5", ".hdf5"):
        bag = _load_h5(path)
    else:
        bag = _load_pt(path)
    if not bag.has_coords and require_coords:
        raise MsamilError(
            f"feature bag {path}: holds features only, no patch coordinates (a CLAM pt_files/ or "
            "TRIDENT .pt file); use the matching .h5 file (h5_files/ in CLAM), which has `coords`"
        )
    _check(bag, path)
    return bag


def find_bag(directory: str | os.PathLike, slide_id: str) -> Path:
    """The bag of ``slide_id`` in ``directory``.

    Looks for ``<dir>/<slide_id>.pt``, ``<dir>/<slide_id>.h5`` and CLAM's layout
    ``<dir>/h5_files/<slide_id>.h5``, ``<dir>/pt_files/<slide_id>.pt``, in that order.
    """
    directory = Path(directory)
    candidates = [directory / f"{slide_id}{suffix}" for suffix in BAG_SUFFIXES] + [
        directory / "h5_files" / f"{slide_id}.h5",
        directory / "pt_files" / f"{slide_id}.pt",
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if not directory.is_dir():
        raise MsamilError(f"feature directory {directory}: not found (looking for slide {slide_id!r})")
    raise MsamilError(
        f"slide {slide_id!r}: no feature bag in {directory} (tried {slide_id}.pt, {slide_id}.h5 and CLAM's "
        "h5_files/, pt_files/); run `msamil extract` for it or drop it from the sheet"
    )


def merge_bags(bags: list[Bag]) -> Bag:
    """Concatenate bags of one slide and encoder, e.g. TRIDENT files of 20x, 10x and 5x.

    Rows keep their order, bag after bag; all bags need the same slide, width D and encoder.
    """
    if not bags:
        raise ValueError("merge_bags needs at least one bag")
    first = bags[0]
    for other in bags[1:]:
        if other.slide_id != first.slide_id or other.dim != first.dim or other.encoder != first.encoder:
            raise MsamilError(
                f"cannot merge bags of ({first.slide_id!r}, {first.encoder}, D={first.dim}) and "
                f"({other.slide_id!r}, {other.encoder}, D={other.dim}): slide, encoder and width must match"
            )
    return Bag(
        features=torch.cat([b.features for b in bags]),
        coords=torch.cat([b.coords for b in bags]),
        scales=torch.cat([b.scales for b in bags]),
        patch_size_level0=torch.cat([b.patch_size_level0 for b in bags]),
        slide_id=first.slide_id,
        encoder=first.encoder,
        has_coords=all(b.has_coords for b in bags),
    )


# -- readers ------------------------------------------------------------------------------------
def _load_pt(path: Path) -> Bag:
    obj = torch_load(path, "feature bag", allow_numpy=True)
    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(obj)
    if isinstance(obj, torch.Tensor):
        features = _features_2d(obj, path)
        n = features.shape[0]
        return Bag(
            features=features,
            coords=torch.full((n, 2), -1, dtype=torch.int64),
            scales=torch.zeros(n, dtype=torch.int64),
            patch_size_level0=torch.zeros(n, dtype=torch.int64),
            slide_id=path.stem,
            encoder=_encoder_from_dir(path),
            has_coords=False,
        )
    if not isinstance(obj, dict):
        raise MsamilError(f"feature bag {path}: holds a {type(obj).__name__}, not a bag dict or a feature tensor")
    missing = [k for k in ("features", "coords", "scales", "patch_size_level0") if k not in obj]
    if missing:
        raise MsamilError(
            f"feature bag {path}: lacks {', '.join(missing)}; rerun `msamil extract` for this slide "
            f"(it has: {', '.join(map(str, obj)) or 'nothing'})"
        )
    return Bag(
        features=_features_2d(obj["features"], path),
        coords=_int64(obj["coords"], path, "coords"),
        scales=_int64(obj["scales"], path, "scales"),
        patch_size_level0=_int64(obj["patch_size_level0"], path, "patch_size_level0"),
        slide_id=str(obj.get("slide_id", path.stem)),
        encoder=str(obj.get("encoder", _encoder_from_dir(path))),
        patches_encoded=int(obj["patches_encoded"]) if "patches_encoded" in obj else None,
        slide_digest=str(obj["slide_digest"]) if "slide_digest" in obj else None,
        left_out=str(obj["left_out"]) if "left_out" in obj else None,
    )


def _load_h5(path: Path) -> Bag:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or not isinstance(f["features"], h5py.Dataset):
                raise MsamilError(
                    f"feature bag {path}: no `features` dataset (it has: {', '.join(f.keys()) or 'nothing'}); "
                    "a feature .h5 from TRIDENT or CLAM holds `features` and `coords`"
                )
            features = np.asarray(f["features"][()])
            encoder = _text(f["features"].attrs.get("encoder", ""))
            has_coords = "coords" in f
    except OSError as exc:
        raise MsamilError(f"feature bag {path}: cannot read HDF5 ({exc}); re-create or re-copy it") from None
    coords, attrs = read_coords(path) if has_coords else (None, {})
    features = _features_2d(torch.from_numpy(features), path)
    n = features.shape[0]
    coords_t = torch.full((n, 2), -1, dtype=torch.int64) if coords is None else torch.from_numpy(coords)
    scale = _scale_of(attrs.get("target_magnification"), path)
    size = _patch_size_level0(attrs, coords_t.numpy() if has_coords else None)
    return Bag(
        features=features,
        coords=coords_t,
        scales=torch.full((n,), scale, dtype=torch.int64),
        patch_size_level0=torch.full((n,), size, dtype=torch.int64),
        slide_id=path.stem,  # the file name is how find_bag pairs it with a sheet row
        encoder=encoder if encoder not in ("", "None") else _encoder_from_dir(path),
        has_coords=has_coords,
    )


# -- helpers ------------------------------------------------------------------------------------
def _features_2d(value: Any, path: Path) -> torch.Tensor:
    """Features as float32 [N, D]; CLAM's [1, N, D] is squeezed, TRIDENT's empty (0,) is [0, 0]."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or value.dtype == torch.bfloat16):
        raise MsamilError(f"feature bag {path}: `features` is not a float array; rerun the extraction")
    if value.ndim == 3 and value.shape[0] == 1:
        value = value[0]
    elif value.ndim == 1 and value.numel() == 0:
        value = value.reshape(0, 0)
    if value.ndim != 2:
        raise MsamilError(f"feature bag {path}: `features` has shape {list(value.shape)}, expected [N, D]")
    return value.float().contiguous()


def _int64(value: Any, path: Path, name: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise MsamilError(f"feature bag {path}: `{name}` is a {type(value).__name__}, expected a tensor")
    if value.is_floating_point():
        value = value.round()
    return value.to(torch.int64)


def _check(bag: Bag, path: str | os.PathLike) -> None:
    """Shapes agree and scales are 0..2; raise naming the file otherwise."""
    n = len(bag)
    problems = []
    if tuple(bag.coords.shape) != (n, 2):
        problems.append(f"coords {list(bag.coords.shape)} (expected [{n}, 2])")
    for name in ("scales", "patch_size_level0"):
        if tuple(getattr(bag, name).shape) != (n,):
            problems.append(f"{name} {list(getattr(bag, name).shape)} (expected [{n}])")
    if not problems and n and (bag.scales.min() < 0 or bag.scales.max() >= len(SCALES)):
        problems.append(f"scales outside 0..{len(SCALES) - 1}")
    if problems:
        raise MsamilError(
            f"feature bag {path}: {n} feature rows but {'; '.join(problems)}; the file is malformed, "
            "re-create it (msamil extract)"
        )


def _scale_of(magnification: Any, path: Path) -> int:
    """Scale index of a single-scale file's ``target_magnification``; 0 when absent or unusual."""
    if magnification is None:
        return 0
    try:
        return scale_index(magnification)
    except MsamilError:
        log.info("feature bag %s: magnification %s is none of %s; scale 0 assumed", path, magnification, SCALES)
        return 0


def _patch_size_level0(attrs: dict, coords: np.ndarray | None) -> int:
    """Patch side in level-0 px: from the attributes (TRIDENT; CLAM coordinate files), else the
    coordinate grid's step (CLAM feature files, which patch without overlap), else 0."""
    if "patch_size_level0" in attrs:
        return int(attrs["patch_size_level0"])
    if "patch_size" in attrs and "downsample" in attrs:  # CLAM: patch_size at patch_level
        return int(round(float(attrs["patch_size"]) * float(np.ravel(attrs["downsample"])[0])))
    if {"patch_size", "level0_magnification", "target_magnification"} <= set(attrs):
        return int(round(float(attrs["patch_size"]) * attrs["level0_magnification"] / attrs["target_magnification"]))
    if coords is not None and len(coords) > 1:
        steps = [np.diff(np.unique(coords[:, axis])) for axis in (0, 1)]
        steps = np.concatenate([s[s > 0] for s in steps])
        if steps.size:
            return int(steps.min())
    return 0


def _encoder_from_dir(path: Path) -> str:
    """Encoder name implied by the folder: TRIDENT writes ``features_<encoder>/``, we ``features/<encoder>/``;
    CLAM's ``h5_files``/``pt_files`` say nothing, so their parent's name is used."""
    folder = path.parent
    if folder.name in ("h5_files", "pt_files"):
        folder = folder.parent
    return folder.name.removeprefix("features_") or "unknown"


def _text(value: Any) -> str:
    """An h5py string attribute (bytes or str) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)
