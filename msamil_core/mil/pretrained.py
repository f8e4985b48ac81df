"""Load weights into a model of the zoo: our checkpoints and MIL-Lab / FEATHER files.

Accepted: our checkpoint ``.pt`` (a dict whose ``state_dict`` holds the weights), a bare
state dict (``.pt``, ``.pth``, ``.bin``, ``.ckpt``), a ``.safetensors`` file, a directory
holding ``model.safetensors`` or ``pytorch_model.bin`` (a Hugging Face snapshot), or
``hf-hub:<org>/<repo>`` such as MIL-Lab's FEATHER models (``hf-hub:MahmoodLab/abmil.base.uni_v2.pc108-24k``:
``model.safetensors`` + ``config.json``), read from the Hugging Face cache that ``msamil
fetch-weights --weights hf-hub:...`` fills.

:mod:`.transfer` checks that the bags come from the encoder the weights were trained on. Keys may
carry ``model.`` (MIL-Lab's wrapper), ``module.`` (DataParallel/DDP) or ``_orig_mod.``
(``torch.compile``) prefixes. Nothing is unpickled: ``torch.load(..., weights_only=True)``
and ``safetensors.torch.load_file`` only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import MsamilError
from .base import MILModel

__all__ = ["LoadResult", "load_pretrained", "read_state_dict"]

log = logging.getLogger(__name__)

_PREFIXES = ("module.", "model.", "_orig_mod.")
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


@dataclass
class LoadResult:
    """What :func:`load_pretrained` did.

    Attributes:
        path: the file read.
        missing_keys: model weights the file did not have (left as initialised).
        unexpected_keys: file weights the model has no place for (ignored).
        classifier_reset: the class-count-dependent layers were re-initialised instead of
            loaded (the file has another class count, or ``keep_classifier=False``).
    """

    path: str
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    classifier_reset: bool = False


def _weights_file(path: str | Path) -> Path:
    from ..hub import WEIGHT_FILES, local_weights

    file = local_weights(path)
    if file is None:
        raise MsamilError(f"{path}: directory holds no {' or '.join(WEIGHT_FILES)}; pass the weights file itself")
    if not file.is_file():
        raise MsamilError(f"{path}: weights file not found; check the path (relative paths start at {Path.cwd()})")
    return file


def _find_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    """The tensor mapping inside a loaded object: the object itself, or (recursively) its
    ``state_dict`` / ``model_state_dict`` / ``model`` entry."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
            return dict(obj)
        for key in _STATE_DICT_KEYS:
            if isinstance(obj.get(key), Mapping):
                return _find_state_dict(obj[key], path)
    found = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else type(obj).__name__
    raise MsamilError(
        f"{path}: holds {found}, not model weights; give a state dict, a checkpoint with a 'state_dict' entry "
        "or a .safetensors file"
    )


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read the weights in ``path`` without unpickling: (state dict, metadata). The metadata
    are the non-weight entries of one of our checkpoints (``model_name``, ``model_args``,
    ``classes``, ...), empty for other files."""
    file = _weights_file(path)
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(file), device="cpu")
        else:
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, pickled objects refused by weights_only, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MsamilError(
            f"{file}: cannot be read as model weights ({reason}); give a state dict saved with torch.save "
            "(.pt/.pth/.bin) or a .safetensors file"
        ) from None
    meta = {k: v for k, v in obj.items() if not isinstance(v, (Mapping, Tensor))} if isinstance(obj, Mapping) else {}
    if isinstance(obj, Mapping) and isinstance(obj.get("model_args"), Mapping):
        meta["model_args"] = dict(obj["model_args"])
    return _find_state_dict(obj, file), meta


def _strip_prefixes(state_dict: dict[str, Tensor], model_keys: set[str]) -> dict[str, Tensor]:
    out = {}
    for key, value in state_dict.items():
        while key not in model_keys and key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def load_pretrained(
    model: MILModel, path: str | os.PathLike, *, strict: bool = False, keep_classifier: bool = True
) -> LoadResult:
    """Load the weights in ``path`` into ``model`` (in place).

    Layers whose shape depends on the class count (``model.head_prefixes``) are dropped
    from the file and re-initialised when their shapes differ from the model's (another
    class count), or always with ``keep_classifier=False`` (MIL-Lab's default when
    transferring to a new task). Missing and unexpected keys are logged and returned.

    Args:
        model: a model of the zoo, built with the file's architecture options.
        path: weights file or Hugging Face snapshot directory (see module docstring).
        strict: fail unless every model weight (classifier aside, when it is re-initialised)
            comes from the file and every file weight is used.
        keep_classifier: load the classifier when its shapes fit.

    Returns:
        :class:`LoadResult`.

    Raises:
        MsamilError: missing or unreadable file, weights that do not fit the architecture
            (a shape mismatch outside the classifier, or no key in common), or with
            ``strict`` any missing or unexpected key.
    """
    state_dict, meta = read_state_dict(path)
    name = model.model_name
    file_model = meta.get("model_name")
    if isinstance(file_model, str) and ".".join(file_model.split(".")[:2]) != name:  # MIL-Lab names add .encoder.task
        log.warning("%s: checkpoint of %s loaded into %s", path, file_model, name)
    model_state = model.state_dict()
    state_dict = _strip_prefixes(state_dict, set(model_state))

    def is_head(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in model.head_prefixes)

    mismatched = [k for k in state_dict if k in model_state and state_dict[k].shape != model_state[k].shape]
    body = [k for k in mismatched if not is_head(k)]
    if body:
        k = body[0]
        more = f" (and {len(body) - 1} more)" if len(body) > 1 else ""
        raise MsamilError(
            f"{path}: weights do not fit {name}: {k} is {tuple(state_dict[k].shape)} in the file but "
            f"{tuple(model_state[k].shape)} in the model{more}; build the model with the options the file was "
            f"trained with (in_dim, embed_dim, ...) or pick the matching model"
        )
    if not any(k in model_state and not is_head(k) for k in state_dict):  # a shared classifier name proves nothing
        example = next((k for k in state_dict if not is_head(k)), next(iter(state_dict), "-"))
        raise MsamilError(
            f"{path}: none of its {len(state_dict)} weights (e.g. {example}) belong to {name}; "
            "pick the model the file was trained for"
        )

    reset = any(is_head(k) for k in mismatched) or not keep_classifier
    if reset:
        state_dict = {k: v for k, v in state_dict.items() if not is_head(k)}
    missing = [k for k in model_state if k not in state_dict and not (reset and is_head(k))]
    unexpected = [k for k in state_dict if k not in model_state]
    if strict and (missing or unexpected):
        raise MsamilError(
            f"{path}: does not match {name} exactly (missing: {', '.join(missing[:5]) or '-'}; "
            f"unexpected: {', '.join(unexpected[:5]) or '-'}); load with strict=False to keep the matching weights"
        )

    model.load_state_dict({k: v for k, v in state_dict.items() if k in model_state}, strict=False)
    if reset:
        model.reset_classifier(model.num_classes)
        log.info("%s: classifier of %s re-initialised for %d classes", path, name, model.num_classes)
    if missing:
        log.warning("%s: %d weights of %s not in the file, left as initialised: %s", path, len(missing), name, ", ".join(missing))
    if unexpected:
        log.warning("%s: %d weights in the file unused by %s: %s", path, len(unexpected), name, ", ".join(unexpected))
    log.info("%s: loaded into %s", path, name)
    return LoadResult(str(path), missing, unexpected, reset)

