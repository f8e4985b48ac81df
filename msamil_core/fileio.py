"""Atomic output files: write to a temporary name beside the target, then rename.

A job killed half-way (error, SIGKILL, preemption) never leaves a partial file
under the final name, so Snakemake and reruns never mistake it for a result.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import MsamilError


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto ``path`` on success.

    The temporary name keeps the target's suffix (``suffix`` overrides it) so libraries
    that pick a format from the extension (PIL, torch) still work. On any exception the
    temporary file is removed and the target is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=suffix if suffix is not None else target.suffix, dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; give the file the mode a plain open() would (umask applied)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` atomically (the object must hold only tensors and plain types,
    so that ``torch.load(path, weights_only=True)`` reads it back)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (a previous
    folder of that name is removed), on any exception it is removed and ``path`` is untouched.
    For outputs made of several files that must appear together or not at all."""
    import shutil

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks (OSError when it cannot be read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _numpy_safe_globals() -> list:
    """numpy globals that plain numeric arrays pickle through (torch.load(weights_only=True))."""
    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType") and n != "ObjectDType"]
    # Files written under numpy 1.x name these numpy.core.multiarray.*.
    return [
        multiarray._reconstruct,
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        multiarray.scalar,
        (multiarray.scalar, "numpy.core.multiarray.scalar"),
        np.ndarray,
        np.dtype,
        *dtypes,
    ]


def torch_load(path: str | os.PathLike, what: str, allow_numpy: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, failing as one clear line.

    ``allow_numpy`` also admits numeric numpy arrays and scalars (TRIDENT's ``.pt`` feature files
    hold an array, training checkpoints often a numpy metric); object arrays and any other class
    are still refused, so nothing arbitrary is unpickled.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise MsamilError(f"{what} {path}: file not found")
    try:
        if allow_numpy:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError, RuntimeError (not a zip), EOFError (truncated)
        culprit = re.search(r"GLOBAL (\S+) was not|but got <class '([^']+)'>", str(exc))
        if "Weights only load failed" in str(exc):
            name = next(filter(None, culprit.groups())) if culprit else "a Python object"
            reason = f"it pickles {name}; only tensors, numbers and plain containers are read"
        else:
            reason = f"not a PyTorch file, or truncated; {type(exc).__name__}"
        raise MsamilError(f"{what} {path}: cannot read it ({reason})") from None
