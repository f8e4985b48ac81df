"""The model registry: ``register_model``, ``create_model``, ``list_models``.

Names follow MIL-Lab: ``<model>.<config>`` (``abmil.base``, ``transmil.base``,
``msamil.base``). ``create_model`` also takes MIL-Lab's full names,
``<model>.<config>.<encoder>.<pretraining task>``: the encoder part sets ``in_dim``
(``abmil.base.uni.none`` -> 1024), and a pretraining task other than ``none`` names weights
to load with ``checkpoint_path=`` (nothing is downloaded).
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from typing import Any, Callable, TypeVar, overload

from ..errors import MsamilError

__all__ = ["register_model", "create_model", "list_models", "is_model", "model_entrypoint", "ENCODER_DIMS"]

_entrypoints: dict[str, Callable[..., Any]] = {}

# Feature width of the patch encoders MIL-Lab names (its ENCODER_DIM_MAPPING).
ENCODER_DIMS: dict[str, int] = {
    "uni": 1024,
    "uni_v2": 1536,
    "ctranspath": 768,
    "conch_v1": 512,
    "conch_v15": 768,
    "gigapath": 1536,
    "resnet50": 1024,
    "virchow": 2560,
    "virchow2": 2560,
    "phikon": 768,
    "phikon_v2": 1024,
    "hoptimus": 1536,
    "hoptimus1": 1536,
    "musk": 1024,
}

_DEFAULT_IN_DIM = 1024  # MIL-Lab's default (UNI features)

F = TypeVar("F", bound=Callable[..., Any])


@overload
def register_model(name: str) -> Callable[[F], F]: ...
@overload
def register_model(name: F) -> F: ...
def register_model(name):
    """Register a model entrypoint, timm-style.

    ``@register_model("abmil.base")`` registers under that name; a bare ``@register_model``
    uses the function's name. The entrypoint takes keyword arguments (``in_dim``,
    ``num_classes`` and any model option) and returns a :class:`~msamil_core.mil.MILModel`.
    """

    def add(fn: F, key: str) -> F:
        if key in _entrypoints and _entrypoints[key] is not fn:
            raise ValueError(f"model {key!r} is registered twice")
        _entrypoints[key] = fn
        return fn

    if callable(name):
        return add(name, name.__name__)
    return lambda fn: add(fn, name)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; ``pattern`` filters them with fnmatch (``"clam*"``)."""
    names = sorted(_entrypoints)
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)] if pattern else names


def is_model(name: str) -> bool:
    return name in _entrypoints


def model_entrypoint(name: str) -> Callable[..., Any]:
    """The function registered under ``name`` (a KeyError-free lookup: unknown names raise
    :class:`MsamilError` with the closest registered names)."""
    try:
        return _entrypoints[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_entrypoints), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise MsamilError(
            f"unknown MIL model {name!r}{hint} (msamil_core.mil.list_models() lists all {len(_entrypoints)})"
        ) from None


def _resolve_name(name: str) -> tuple[str, int | None, str | None]:
    """Split a MIL-Lab full name into (registry name, encoder in_dim, pretraining task)."""
    if name in _entrypoints:
        return name, None, None
    parts = name.split(".")
    if len(parts) in (3, 4) and ".".join(parts[:2]) in _entrypoints:
        encoder = parts[2]
        if encoder not in ENCODER_DIMS:
            raise MsamilError(
                f"{name!r}: unknown encoder {encoder!r}; known: {', '.join(sorted(ENCODER_DIMS))} "
                f"(or use {'.'.join(parts[:2])!r} with in_dim=...)"
            )
        task = parts[3] if len(parts) == 4 else None
        return ".".join(parts[:2]), ENCODER_DIMS[encoder], task
    model_entrypoint(name)  # raises with suggestions
    raise AssertionError  # unreachable


def create_model(
    name: str,
    in_dim: int | None = None,
    num_classes: int = 2,
    checkpoint_path: str | os.PathLike | None = None,
    **overrides: Any,
):
    """Build a registered model.

    Args:
        name: registry name (``"abmil.base"``) or MIL-Lab full name (``"abmil.base.uni.none"``).
        in_dim: instance feature width; default: the encoder's width for a full name, else 1024.
        num_classes: number of classes (logits).
        checkpoint_path: weights to load with :func:`~msamil_core.mil.load_pretrained`
            (our checkpoint, or a MIL-Lab / FEATHER file); the classifier is re-initialised
            if the file has another class count.
        **overrides: model options (``embed_dim=256``, ``dropout=0.1``, ...); an unknown
            option raises :class:`MsamilError` listing the valid ones.

    Returns:
        The model, with ``model.model_name`` (registry name) and ``model.model_args`` (every
        option, so ``create_model(model.model_name, **model.model_args)`` rebuilds it).
    """
    key, encoder_dim, task = _resolve_name(name)
    if task not in (None, "none") and checkpoint_path is None:
        raise MsamilError(
            f"{name!r} names MIL-Lab pretrained weights ({task}); msamil does not download weights: "
            f"fetch the file yourself and pass checkpoint_path=... (or use {'.'.join(name.split('.')[:3])}.none)"
        )
    if in_dim is None:
        in_dim = encoder_dim if encoder_dim is not None else _DEFAULT_IN_DIM
    model = _entrypoints[key](in_dim=in_dim, num_classes=num_classes, **overrides)
    model.model_name = key
    if checkpoint_path is not None:
        from .pretrained import load_pretrained

        load_pretrained(model, checkpoint_path)
    return model
