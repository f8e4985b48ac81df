"""Valid names of MIL models and patch encoders, checked fast enough for Snakemake's parse time.

The workflow checks the config's names (``experiments.<x>.model``, ``encoders.<key>.name``) while
Snakemake parses the Snakefile, so that a typo fails at once with a did-you-mean instead of at
training or extraction, hours later. The Snakefile is parsed on every ``snakemake`` call and
again in each cluster job, and the sources of these names are slow to import (torch 2-3 s, the
MIL registry 3 s, ``timm.list_models()`` 8 s). So this module imports only the standard library
and torch-free parts of msamil_core:

* the preset names come from :mod:`.features.presets` (torch-free) and the registered encoders
  (``msfem``) from reading ``features/encoders.py`` with :mod:`ast`, both in milliseconds;
* the MIL models and timm's names are listed once by a subprocess
  (``python -m msamil_core list-models --json``) and cached in
  ``$XDG_CACHE_HOME/msamil/`` (``~/.cache/msamil/``), keyed by a digest of what decides them:
  the msamil version, the bytes of ``mil/*.py``, ``features/presets.py`` and
  ``features/encoders.py``, and the installed timm version. A changed key or an unreadable file
  is recomputed; a cache that cannot be written is recomputed on every call.

Example::

    check_mil_model("abmill.base", "config: experiment 'x'")
    # MsamilError: config: experiment 'x' model 'abmill.base' is not a registered MIL model;
    #   did you mean 'abmil.base'? (`msamil list-models` lists them)
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Iterable

from . import __version__
from .errors import MsamilError
from .fileio import write_json
from .hub import is_hub_ref
from .settings import closest

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parent
# The files whose content decides the names (the cache key covers their bytes).
NAME_SOURCES = ("mil/*.py", "features/presets.py", "features/encoders.py")
MIL_LISTING = "`msamil list-models` lists them"
ENCODER_LISTING = "`msamil list-models` lists the presets and msfem; any timm model name works too"
# difflib similarity needed for a suggestion: 'resnet50_trunk' -> 'resnet50_trunc' (0.93) and
# 'abmil' -> 'abmil.base' (0.67) pass; unrelated words stay below it against ~1,300 timm names.
CUTOFF = 0.6


def did_you_mean(value: str, choices: Iterable[str], listing: str = MIL_LISTING) -> str:
    """The tail of a one-line error: ``"; did you mean 'abmil.base'? (<listing>)"``, or only
    ``" (<listing>)"`` when nothing is close; ``listing`` says where the valid names are listed."""
    match = closest(value, choices, CUTOFF)
    return f"; did you mean {match!r}? ({listing})" if match else f" ({listing})"


# -- the names, cached --------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/msamil`` (``~/.cache/msamil`` when the variable is unset or relative)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "msamil"


def cache_file() -> Path:
    """The cache of this installation's names. One file per installed package (its folder and
    interpreter), so that several checkouts do not overwrite each other's cache."""
    where = hashlib.sha1(f"{PACKAGE}\0{sys.prefix}".encode()).hexdigest()[:12]
    return cache_dir() / f"names-{where}.json"


def _timm_version() -> str:
    try:
        return metadata.version("timm")  # the installed distribution's, without importing timm
    except metadata.PackageNotFoundError:
        return "none"


def cache_key() -> str:
    """A digest of what decides the names: msamil's version, the bytes of the files that register
    MIL models and encoders, and the installed timm version."""
    digest = hashlib.sha256(f"msamil {__version__}\0timm {_timm_version()}\0".encode())
    for pattern in NAME_SOURCES:
        for path in sorted(PACKAGE.glob(pattern)):
            digest.update(f"{path.relative_to(PACKAGE).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _list_in_subprocess() -> dict:
    """What ``msamil list-models --json`` prints, run by this interpreter on this package."""
    cmd = [sys.executable, "-m", "msamil_core", "list-models", "--json"]
    env = dict(os.environ)
    # The child must import this very package (the cache key covers its files): a source checkout
    # goes first on its path, as when run from the checkout (Snakemake may have put it on ours at
    # run time). An installed package is found anyway, and site-packages must not go before the
    # standard library.
    if PACKAGE.parent.name not in ("site-packages", "dist-packages"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE.parent), env.get("PYTHONPATH")]))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MsamilError(f"could not list the MIL models and encoders (`{' '.join(cmd)}`): {exc}") from None
    if out.returncode == 0:
        try:
            names = json.loads(out.stdout.strip().splitlines()[-1])  # the JSON is the last line
            if _well_formed(names):
                return names
        except (ValueError, IndexError):
            pass
    tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-10:])
    raise MsamilError(
        f"could not list the MIL models and encoders (`{' '.join(cmd)}` exited with status {out.returncode}"
        f"{'' if out.returncode else ' but printed no valid JSON'}): {tail}"
    )


def _well_formed(names) -> bool:
    def strings(value) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    return (
        isinstance(names, dict)
        and strings(names.get("mil"))
        and isinstance(names.get("encoders"), dict)
        and all(strings(names["encoders"].get(kind)) for kind in ("presets", "registered", "timm"))
    )


def _read_cache(path: Path, key: str) -> dict | None:
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, unreadable or corrupt (UnicodeDecodeError is a ValueError)
        return None
    if isinstance(cached, dict) and cached.get("key") == key and _well_formed(cached.get("names")):
        return cached["names"]
    return None


def _write_cache(path: Path, key: str, names: dict) -> None:
    """Write atomically (:func:`~msamil_core.fileio.write_json`: a temporary file in the same
    folder, then ``os.replace``), so that readers never see half a file and concurrent writers
    leave one whole file. A cache that cannot be written (read-only home, full disk) is not an
    error: the names are then listed on every call."""
    try:
        write_json(path, {"key": key, "names": names})
    except (OSError, MsamilError) as exc:
        log.debug("names cache %s not written: %s", path, exc)


def known_names(refresh: bool = False) -> dict:
    """Every valid name: ``{"mil": [...], "encoders": {"presets": [...], "registered": [...],
    "timm": [...]}}``, from the cache, else listed in a subprocess and cached.

    Args:
        refresh: list them anew even when the cache is current.

    Raises:
        MsamilError: the subprocess failed (the message ends with its stderr).
    """
    path, key = cache_file(), cache_key()
    names = None if refresh else _read_cache(path, key)
    if names is None:
        names = _list_in_subprocess()
        _write_cache(path, key, names)
    return names


def mil_models() -> list[str]:
    """The registered MIL models (what ``msamil_core.mil.list_models()`` returns), without torch."""
    return known_names()["mil"]


def encoder_names() -> dict[str, list[str]]:
    """Encoder names by kind: ``presets``, ``registered`` (``msfem``) and ``timm``, without torch."""
    return known_names()["encoders"]


# -- the fast names: no subprocess, no cache ---------------------------------------------------
def preset_names() -> list[str]:
    """The named encoder presets (``uni_v1``, ``resnet50_trunc``, ...)."""
    from .features.presets import PRESETS  # torch-free; imported only when a check needs it

    return list(PRESETS)


def registered_encoders() -> list[str]:
    """Encoders registered with ``@register_encoder`` in ``features/encoders.py`` (``msfem``),
    read from its source: importing it would import torch. A name registered some other way is
    still found, through :func:`encoder_names`."""
    tree = ast.parse((PACKAGE / "features" / "encoders.py").read_text())
    return [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and any(isinstance(d, ast.Name) and d.id == "register_encoder" for d in node.decorator_list)
    ]


# -- checks -------------------------------------------------------------------------------------
def check_mil_model(name: str, where: str) -> None:
    """Raise :class:`MsamilError` unless ``name`` is a registered MIL model (``abmil.base``) or a
    MIL-Lab full name of one (``abmil.base.uni.none``; ``create_model`` checks its encoder part).

    ``where`` opens the message and names the place, e.g. ``"config: experiment 'x'"``.
    """
    models = mil_models()
    parts = name.split(".")
    if name in models or (len(parts) in (3, 4) and ".".join(parts[:2]) in models):
        return
    raise MsamilError(f"{where} model {name!r} is not a registered MIL model{did_you_mean(name, models)}")


def check_encoder_name(name: str, where: str) -> None:
    """Raise :class:`MsamilError` unless ``name`` is a patch encoder: a preset, a registered
    encoder (``msfem``) or a timm model name (with or without a pretrained tag,
    ``vit_base_patch16_224.augreg_in21k``). Presets and registered encoders are checked first;
    timm's names only when needed (cached, see :func:`known_names`).

    ``where`` opens the message and names the place, e.g. ``"config: encoder 'uni'"``.
    """
    if name in preset_names() or name in registered_encoders():
        return
    if is_hub_ref(name):
        raise MsamilError(
            f"{where} name {name!r} is a hub reference, not an encoder name; name a preset or timm architecture "
            f"and give {name} as the encoder's weights ({ENCODER_LISTING})"
        )
    kinds = encoder_names()
    valid = [*kinds["presets"], *kinds["registered"], *kinds["timm"]]
    if name in valid or name.split(".")[0] in kinds["timm"]:
        return
    raise MsamilError(
        f"{where} name {name!r} is not a patch encoder (preset, registered encoder or timm model)"
        f"{did_you_mean(name, valid, ENCODER_LISTING)}"
    )
