"""Pretrained MIL weights transfer only to features of the encoder they were trained on.

MIL-Lab and FEATHER name it as the third part of their model names (``abmil.base.uni_v2.pc108-24k``:
UNI2-h features, 1536-d; the hub repo, cache folder or file carries that name); our checkpoints
store the encoder id of their bags and ``model_args.in_dim``. :func:`check_transfer` compares
(name, width) with the bags' and refuses a mismatch in one line.
"""

from __future__ import annotations

import os
import re

from ..errors import MsamilError
from ._registry import ENCODER_DIMS
from .pretrained import read_state_dict

__all__ = ["MIL_LAB_ENCODERS", "check_transfer", "encoder_name", "pretrained_encoder"]


# MIL-Lab's encoder names (third part of e.g. abmil.base.uni_v2.pc108-24k; its ENCODER_DIM_MAPPING)
# -> the msamil encoder preset that makes such features.
MIL_LAB_ENCODERS = {"uni": "uni_v1", "hoptimus": "h_optimus_0", "hoptimus1": "h_optimus_1", "resnet50": "resnet50_trunc"}


def encoder_name(encoder: str) -> str:
    """The encoder name of a bag's or checkpoint's encoder id (``uni_v1-3fa9c0d1e2`` -> ``uni_v1``)."""
    match = re.fullmatch(r"(.+)-[0-9a-f]{10}", encoder or "")
    return match.group(1) if match else (encoder or "")


def _mil_lab_name(path: str) -> str | None:
    """A MIL-Lab model name (model.config.encoder.task) found in a weights reference: its hub repo
    name, the cache folder (models--org--name) or the file name."""
    for part in reversed(re.split(r"[/:@]|--", str(path))):
        stem = part[: -len(".safetensors")] if part.endswith(".safetensors") else part
        pieces = stem.split(".")
        if len(pieces) == 4 and pieces[2] in ENCODER_DIMS:
            return stem
    return None


def pretrained_encoder(path: str | os.PathLike) -> tuple[str | None, int | None]:
    """(encoder name, feature width) the weights at ``path`` were trained on; None where unknown.

    Our checkpoints store the encoder id and ``model_args.in_dim``; MIL-Lab files and FEATHER hub
    repos name the encoder in their model name (``abmil.base.uni_v2.pc108-24k``).
    """
    _, meta = read_state_dict(path)
    encoder = meta.get("encoder")
    in_dim = (meta.get("model_args") or {}).get("in_dim", meta.get("in_dim"))
    if isinstance(encoder, str) and encoder:
        return encoder_name(encoder), int(in_dim) if in_dim else None
    name = meta.get("model_name") if isinstance(meta.get("model_name"), str) else None
    name = name if name and len(name.split(".")) == 4 else _mil_lab_name(str(path))
    if name:
        lab = name.split(".")[2]
        if lab in ENCODER_DIMS:
            return MIL_LAB_ENCODERS.get(lab, lab), int(in_dim) if in_dim else ENCODER_DIMS[lab]
    return None, int(in_dim) if in_dim else None


def check_transfer(init_from: str | os.PathLike, bag_encoder: str, bag_dim: int, bag_where: str) -> None:
    """Refuse bags whose encoder (name, width) is not the one ``init_from`` was trained on.

    Raises:
        MsamilError: one line naming the weights, their encoder and the bags' encoder.
    """
    name, dim = pretrained_encoder(init_from)
    found = encoder_name(bag_encoder)
    if (dim is not None and dim != bag_dim) or (name and found and name != found):
        raise MsamilError(
            f"transfer mismatch: {init_from} was trained on {name or 'unknown'} features ({dim or '?'}-d), but "
            f"{bag_where} come from {found or 'an unnamed encoder'} ({bag_dim}-d); extract the features with the "
            f"encoder {name or 'it was trained on'} (`msamil list-models`) or train without init_from"
        )
