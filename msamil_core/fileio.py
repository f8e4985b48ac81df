"""Atomic output files: write to a temporary name beside the target, then rename.

A job killed half-way (error, SIGKILL, preemption) never leaves a partial file
under the final name, so Snakemake and reruns never mistake it for a result; the temporary it
leaves has a name no output glob matches and is removed by the next writer in that folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import MsamilError

log = logging.getLogger(__name__)


# Every temporary file or folder msamil writes beside an output is named
# ``.msamil-tmp-<host>+<pid>+<start>+<target name>.<random>.tmp``: hidden, with a suffix no output
# has, so no glob for outputs (``*.pt``, ``*.h5``, ``fold*``...) ever matches one. The writer's
# host, process id and process start time let a later writer in the same folder tell a leftover
# of a killed job (its process is gone) from the temporary of a job still running there.
TEMP_PREFIX = ".msamil-tmp-"
TEMP_SUFFIX = ".tmp"
# A leftover written on another machine (shared file system) whose liveness cannot be checked from
# here is removed once it has not been modified for this long.
FOREIGN_TEMP_AGE_S = 24 * 3600

_swept: set[str] = set()  # folders whose stale temporaries this process has removed
# A write that fails while the file system has less than this free (read before the temporary is
# removed) failed for want of space; libraries that write through C (torch.save's zip writer,
# HDF5) raise without an errno.
FULL_DISK_BYTES = 1 << 20


def _process_start(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot ("" where /proc does not tell,
    "gone" when the process does not exist)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # field 22; the command name (field 2) may hold spaces, so count from its closing parenthesis
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except FileNotFoundError:
        return "gone" if os.path.isdir("/proc/self") else ""
    except (OSError, IndexError):
        return ""


def _writer_tag() -> str:
    return f"{socket.gethostname()}+{os.getpid()}+{_process_start(os.getpid())}"


def temp_name(target: Path) -> str:
    """The prefix of a temporary beside ``target`` (mkstemp/mkdtemp add ``<random>`` and ``.tmp``)."""
    return f"{TEMP_PREFIX}{_writer_tag()}+{target.name[:80]}."


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether ``path`` is one of msamil's temporaries (never an output)."""
    return Path(path).name.startswith(TEMP_PREFIX)


def _stale(entry: os.DirEntry) -> bool:
    """Whether a temporary was left by a writer that no longer runs."""
    try:
        host, pid, start = entry.name[len(TEMP_PREFIX):].split("+", 3)[:3]
        pid_ = int(pid)
    except ValueError:
        host, pid_, start = "", 0, ""
    if host == socket.gethostname() and pid_ > 0:
        if pid_ == os.getpid():
            return False
        now = _process_start(pid_)
        if now == "gone" or (now and start and now != start):  # exited, or its pid now names another process
            return True
        if now:
            return False
        try:  # no /proc: a signal 0 tells whether the pid exists
            os.kill(pid_, 0)
            return False
        except ProcessLookupError:
            return True
        except OSError:
            return False
    try:
        return time.time() - entry.stat(follow_symlinks=False).st_mtime > FOREIGN_TEMP_AGE_S
    except OSError:
        return False


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries in ``folder`` whose writer is gone (killed mid-write); those of
    writers still running (this process, other jobs) stay. Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if entry.name.startswith(TEMP_PREFIX) and _stale(entry):
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            except FileNotFoundError:  # another process removed it first
                continue
            except OSError as exc:
                log.debug("cannot remove stale temporary %s: %s", entry.path, exc)
                continue
            log.info("removed %s, left by a writer that was stopped mid-write", entry.path)
            removed.append(Path(entry.path))
    return removed


def _sweep_once(folder: Path) -> None:
    key = str(folder.resolve())
    if key not in _swept:
        _swept.add(key)
        remove_stale_temporaries(folder)


def make_temp_dir(parent: str | os.PathLike, target: str | os.PathLike) -> Path:
    """A new temporary folder in ``parent`` for files that will become ``target`` (removes the
    folder's stale temporaries first, once per process)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(parent)
    return Path(tempfile.mkdtemp(prefix=temp_name(Path(target)), suffix=TEMP_SUFFIX, dir=parent))


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto ``path`` on success.

    The temporary's name ends in ``.tmp`` (see :data:`TEMP_PREFIX`), so writers must name their
    format (``savefig(format=...)``, ``Image.save(format=...)``) rather than rely on the
    extension. On any exception the temporary file is removed and the target is left untouched;
    a temporary left by a killed writer is removed by the next writer in that folder.
    """
    target = Path(path)
    tmp = temporary_beside(target)
    try:
        yield tmp
        commit(tmp, target)
    except BaseException as exc:
        full = _disk_full(target, exc)
        tmp.unlink(missing_ok=True)
        if full:
            raise full from exc
        raise


def temporary_beside(path: str | os.PathLike) -> Path:
    """A new empty temporary file for ``path``, in its folder (whose stale temporaries are removed
    first, once per process); :func:`commit` moves it onto ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(target.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_name(target), suffix=TEMP_SUFFIX, dir=target.parent)
    os.close(fd)
    return Path(tmp_name)


def commit(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the finished temporary ``tmp`` onto ``path`` (one rename: readers see the old file or
    the new one), with the mode a plain ``open()`` would give it."""
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_torch(path: str | os.PathLike, obj: Any, move: bool = True) -> Path:
    """``torch.save`` atomically (the object must hold only tensors and plain types,
    so that ``torch.load(path, weights_only=True)`` reads it back). With ``move=False`` the
    finished temporary is left for the caller to :func:`commit` (or remove); returns it."""
    import torch

    if not move:
        tmp = temporary_beside(path)
        try:
            torch.save(obj, tmp)
        except BaseException as exc:
            full = _disk_full(Path(path), exc)
            tmp.unlink(missing_ok=True)
            if full:
                raise full from exc
            raise
        return tmp
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (a previous
    folder of that name is removed), on any exception it is removed and ``path`` is untouched.
    For outputs made of several files that must appear together or not at all."""
    target = Path(path)
    tmp = make_temp_dir(target.parent, target)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if target.exists():
            old = make_temp_dir(target.parent, target)
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as exc:
        full = _disk_full(target, exc)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise full from exc
        raise


def _disk_full(target: Path, exc: BaseException) -> MsamilError | None:
    """The one-line error for a write of ``target`` that failed with ``exc`` because its file
    system is full or over quota; None for any other failure."""
    if not isinstance(exc, Exception) or isinstance(exc, MsamilError):
        return None
    if not (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)):
        try:
            if shutil.disk_usage(target.parent).free >= FULL_DISK_BYTES:
                return None
        except OSError:
            return None
    return MsamilError(f"could not write {target}: the file system holding {target.parent} is full (or over "
                       "quota); free space there, or move the output folder to a larger disk, and rerun")


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
            raise MsamilError(f"{what} {path}: cannot read it ({reason})") from None
        raise MsamilError(f"{what} {path}: cannot read it (not a PyTorch file, or truncated; {type(exc).__name__}); "
                          "delete it and rerun the step that wrote it, or copy it again") from None
