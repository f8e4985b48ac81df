"""Local weights files: read a state dict without unpickling, and load it strictly into a model.

Accepted: ``.safetensors``, or ``.bin``/``.pth``/``.pt`` read with ``torch.load(weights_only=True)``;
checkpoint wrappers (``{"state_dict": ...}``, ``{"model": ...}``, ``{"teacher": ...}``, an e2e
checkpoint's ``encoder_state_dict``) are unwrapped, wrapper prefixes stripped, and timm's own
converters tried for original layouts. A file that does not fit fails in one line naming it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import MsamilError
from ..fileio import torch_load

log = logging.getLogger(__name__)

# Common checkpoint wrappers around a state dict (training scripts, DINO, Lightning, ours).
# An e2e checkpoint (msamil_core.training.e2e) holds the tuned encoder under encoder_state_dict
# beside the MIL model's state_dict, so that key is looked at first.
_STATE_DICT_KEYS = ("encoder_state_dict", "state_dict", "model_state_dict", "model", "teacher", "student", "module")
# Prefixes of a state dict's keys: DDP, our PatchEncoder wrapper, SSL frameworks, whole
# segmentation models (encoder + decoder).
_STRIP_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "trunk.", "_orig_mod.", "module.encoder.",
                   "model.encoder.")


def read_state_dict(path: str | os.PathLike, what: str = "encoder weights") -> dict[str, torch.Tensor]:
    """Tensors of a local state-dict file (``.safetensors``, or ``.bin``/``.pth``/``.pt`` via torch).

    Checkpoint wrappers (``{"state_dict": ...}``, ``{"model": ...}``, ``{"teacher": ...}``) are
    unwrapped; non-tensor entries are dropped.
    """
    path = Path(path)
    fix = "fix the weights path in the config (or --weights), or leave it empty for random initialisation"
    if not path.is_file():
        raise MsamilError(f"{what} {path}: file not found; {fix}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # SafetensorError, OSError
            raise MsamilError(f"{what} {path}: not a readable .safetensors file ({exc}); {fix}") from None
    else:
        obj = torch_load(path, what, allow_numpy=True)
    # Descend through wrappers; a real state dict never maps these names to dicts.
    while isinstance(obj, dict):
        inner = next((obj[k] for k in _STATE_DICT_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise MsamilError(f"{what} {path}: holds a {type(obj).__name__}, not a state dict (name -> tensor); {fix}")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise MsamilError(f"{what} {path}: holds no tensors; {fix}")
    return state


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Key prefixes of the classifier a timm checkpoint has and a pooled backbone lacks."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names) + ("head.", "fc.", "classifier.", "head_dist.", "_fc.", "last_linear.")


def _match(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, shape mismatches) of ``state`` against ``model``."""
    target = model.state_dict()
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    shapes = [
        f"{k} {list(state[k].shape)} vs {list(target[k].shape)}"
        for k in state
        if k in target and state[k].shape != target[k].shape
    ]
    return missing, unexpected, shapes


def _adapt(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Best fit of a foreign state dict: strip a shared prefix, drop the classifier, let timm
    convert original formats (e.g. resample a ViT position embedding to the input size)."""
    target = set(model.state_dict())
    # as is, with timm-universal's "model." prefix (segmentation_models_pytorch tu- encoders), or
    # the keys under one prefix, stripped
    candidates = [state, {f"model.{k}": v for k, v in state.items()}]
    for prefix in _STRIP_PREFIXES:
        inner = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if inner:
            candidates.append(inner)
    state = max(candidates, key=lambda s: len(target.intersection(s)))
    heads = _classifier_prefixes(model)
    state = {k: v for k, v in state.items() if k in target or not k.startswith(heads)}
    missing, unexpected, shapes = _match(model, state)
    if missing or unexpected or shapes:
        filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if filter_fn is not None:
            try:
                filtered = filter_fn(dict(state), model)
                filtered = {k: v for k, v in filtered.items() if k in target or not k.startswith(heads)}
                if sum(map(len, _match(model, filtered))) < len(missing) + len(unexpected) + len(shapes):
                    state = filtered
            except Exception:  # a converter for another layout; keep our own report of the mismatch
                log.debug("timm checkpoint_filter_fn of %s failed", type(model).__name__, exc_info=True)
    return state


def load_weights(model: nn.Module, weights: str | os.PathLike | dict[str, torch.Tensor], what: str,
                 source: str | os.PathLike | None = None) -> None:
    """Load a state dict (a local file, or tensors already read from ``source``) into ``model``
    strictly, or raise one clear :class:`MsamilError`.

    Accepts timm and Hugging Face (timm-format) state dicts; a classifier head present in the
    file but absent from the pooled backbone is ignored, every other key must match in name
    and shape.
    """
    path = source if isinstance(weights, dict) else weights
    state = weights if isinstance(weights, dict) else read_state_dict(weights, f"{what} weights")
    state = _adapt(model, state)
    missing, unexpected, shapes = _match(model, state)
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
            if keys:
                parts.append(f"{len(keys)} keys {label} (e.g. {', '.join(keys[:2])})")
        raise MsamilError(
            f"{what}: weights {path} do not fit this architecture: {'; '.join(parts)}; give the "
            "weights of this exact model (same name and encoder options) or change the encoder name"
        )
    model.load_state_dict(state, strict=False)  # strictness checked above, minus num_batches_tracked
    log.info("%s: loaded weights from %s (%d tensors)", what, path, len(state))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a weights file's bytes; an unreadable file is a one-line error naming it."""
    from ..fileio import file_sha256 as sha256

    try:
        return sha256(path)
    except OSError as exc:
        raise MsamilError(f"weights {path}: cannot read ({exc.strerror}); fix the weights path") from None
