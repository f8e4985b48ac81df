"""From lesion probabilities to the lesion mask, and the probabilities `segment-train` leaves behind.

Kept free of torch and segmentation_models_pytorch: importing those costs a segmentation job
several seconds, far more than the network's forward pass on one thumbnail. So
``msamil segment-train --probabilities-dir D`` writes, for every slide it trained or was
evaluated on, the lesion probability of each thumbnail pixel under the checkpoint it saved,
``D/<slide_id>.npz``, with the SHA-256 of that checkpoint file and of the thumbnail. ``msamil
segment --reuse D`` then takes the stored probabilities when both digests match (the same
network on the same pixels gives the same probabilities) and otherwise runs the network; either
way the mask comes from :func:`postprocess` with the same settings.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from ..errors import MsamilError
from ..fileio import atomic_path, file_sha256
from ..settings import PostProcessSettings

log = logging.getLogger(__name__)


def postprocess(prob: np.ndarray, tissue: np.ndarray | None, params: PostProcessSettings) -> np.ndarray:
    """Lesion mask bool [h, w]: ``prob >= threshold`` within tissue, small holes filled, specks dropped."""
    from ..wsi.tissue import clean_mask

    mask = prob >= params.threshold
    if tissue is not None:
        mask &= tissue
    # close_radius 0: no morphology beyond hole filling and speck removal, so edges stay where predicted.
    mask = clean_mask(mask, 0, params.min_object_fraction * mask.size, params.max_hole_fraction * mask.size)
    if tissue is not None:
        mask &= tissue  # filled holes may include glass
    return mask


def save_probabilities(directory: str | os.PathLike, slide_id: str, prob: np.ndarray, checkpoint_digest: str,
                       thumbnail: str | os.PathLike, postprocess_settings: dict) -> Path:
    """Write ``directory/<slide_id>.npz``: float32 [h, w] probabilities, the checkpoint's and the
    thumbnail's digests and the checkpoint's post-processing settings."""
    path = Path(directory) / f"{slide_id}.npz"
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a bare name
            np.savez_compressed(
                f,
                prob=np.asarray(prob, dtype=np.float32),
                checkpoint_sha256=np.array(checkpoint_digest),
                thumbnail_sha256=np.array(file_sha256(thumbnail)),
                postprocess=np.array(json.dumps(postprocess_settings, sort_keys=True)),
            )
    return path


def stored_probabilities(directory: str | os.PathLike, slide_id: str, checkpoint: str | os.PathLike,
                         thumbnail: str | os.PathLike) -> tuple[np.ndarray, dict] | None:
    """``(probabilities, post-processing settings)`` that ``checkpoint`` gave ``thumbnail``, from
    ``directory/<slide_id>.npz``; None when there is none, or it was made by another checkpoint
    or from other thumbnail pixels."""
    path = Path(directory) / f"{slide_id}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["checkpoint_sha256"]) != file_sha256(checkpoint):
                log.info("%s: stored probabilities are of another checkpoint; running the network", slide_id)
                return None
            if str(stored["thumbnail_sha256"]) != file_sha256(thumbnail):
                log.info("%s: stored probabilities are of another thumbnail; running the network", slide_id)
                return None
            return stored["prob"].astype(np.float32), json.loads(str(stored["postprocess"]))
    except (OSError, KeyError, ValueError) as exc:
        log.warning("%s: cannot read stored probabilities %s (%s); running the network", slide_id, path, exc)
        return None
