"""Where and how computation runs: device choice, GPU claiming, autocast, threads, torchrun ranks.

Extraction, training (MIL, end-to-end, segmentation) and prediction all pick their device here,
so ``--device auto`` means the same everywhere: the CPU without CUDA; under torchrun the GPU of
the process's ``LOCAL_RANK``; else a GPU that no other msamil process on this machine holds, so
that Snakemake's ``--resources gpu=N`` gives N jobs N different GPUs.
"""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import nullcontext

import torch

from .errors import MsamilError

log = logging.getLogger(__name__)

_claimed: dict[str, int] = {}  # lock file -> open descriptor, held until the process exits


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device of a command's ``--device`` option (``auto``, ``cpu``, ``cuda``, ``cuda:N``)."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if "LOCAL_RANK" in os.environ:
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda", claim_gpu())
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MsamilError(f"device {name!r} asked for, but no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


def claim_free(keys: list[str], lock_dir: str | os.PathLike) -> int | None:
    """Index of the first key whose lock file in ``lock_dir`` no other process holds, now held
    by this one until it exits (the operating system releases it even after SIGKILL);
    None when every key is held.

    The lock files are shared by every user of the machine (a GPU is one device whoever runs the
    job): created read-write for all, and opened without ``O_CREAT`` when they exist (in a sticky
    world-writable folder ``fs.protected_regular`` refuses an ``O_CREAT`` open of another user's
    file), read-only where writing is not allowed (all ``flock`` needs on a local file system). A lock file this user cannot open (made 0600 by an older
    version) is replaced by one in a folder of this user's own, with a warning: that GPU is then
    claimed among this user's jobs only.
    """
    import fcntl

    for index, key in enumerate(keys):
        path = os.path.join(lock_dir, f"msamil-{key}.lock")
        if path in _claimed:
            return index
        try:
            fd = _open_lock(path)
        except PermissionError:
            own = os.path.join(f"{os.fspath(lock_dir)}-uid{os.getuid()}", f"msamil-{key}.lock")
            log.warning("GPU lock %s belongs to another user and is not readable; claiming via %s (jobs of other "
                        "users may share that GPU; remove the old lock file to fix this)", path, own)
            os.makedirs(os.path.dirname(own), mode=0o700, exist_ok=True)
            path = own
            if path in _claimed:
                return index
            fd = _open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _claimed[path] = fd
        return index
    return None


def _open_lock(path: str) -> int:
    """A descriptor of the lock file ``path`` (created read-write for every user if missing):
    read-write where allowed (NFS emulates ``flock`` by write locks), else read-only."""
    for flags in (os.O_RDWR, os.O_RDONLY):
        try:
            return os.open(path, flags)
        except FileNotFoundError:
            break
        except PermissionError:
            if flags == os.O_RDONLY:
                raise
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:  # another process made it in between
        return _open_lock(path)
    os.fchmod(fd, 0o666)  # whatever this user's umask
    return fd


def release_gpus() -> list[str]:
    """Let go of every GPU this process claimed (a feature server between slides, so that a job
    starting meanwhile may claim it); returns their lock keys for :func:`reclaim_gpus`."""
    keys = []
    for path, fd in list(_claimed.items()):
        os.close(fd)
        del _claimed[path]
        keys.append(os.path.basename(path).removeprefix("msamil-").removesuffix(".lock"))
    return keys


def reclaim_gpus(keys: list[str]) -> None:
    """Claim again the GPUs :func:`release_gpus` let go; one another job holds now is shared, with
    a warning (this process's model lives there)."""
    for key in keys:
        if claim_free([key], gpu_lock_dir()) is None:
            log.warning("GPU %s was claimed by another job while this one was idle; sharing it", key)


def gpu_lock_dir(base: str | os.PathLike | None = None) -> str:
    """The folder of the GPU lock files: ``msamil-gpu-locks`` in the system's temporary folder (or
    ``base``), shared by all users (sticky and world-writable, like /tmp itself)."""
    path = os.path.join(base or tempfile.gettempdir(), "msamil-gpu-locks")
    try:
        os.mkdir(path)
        os.chmod(path, 0o1777)  # mkdir applies the umask
    except FileExistsError:
        pass
    return path


def claim_gpu() -> int:
    """A visible GPU for this process; GPUs are named by UUID, so jobs that see them in another
    order (CUDA_VISIBLE_DEVICES) still claim each physical GPU once."""
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    keys = [f"gpu-{torch.cuda.get_device_properties(i).uuid}" for i in range(count)]
    index = claim_free(keys, gpu_lock_dir())
    if index is None:
        log.warning("all %d GPUs are in use by other msamil jobs; sharing GPU 0 (limit GPU jobs with "
                    "snakemake --resources gpu=%d)", count, count)
        return 0
    return index


def autocast(device: torch.device, bf16: bool = True):
    """bf16 autocast on CUDA; CPU runs in float32 (bf16 matmuls are slow on most CPUs)."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def set_threads(threads: int | None) -> None:
    """torch's intra-op CPU threads; None or 0 keeps torch's default."""
    if threads is None or threads == 0:
        return
    if threads < 0:
        raise MsamilError(f"--threads must be at least 1 (or 0 for torch's default), got {threads}")
    torch.set_num_threads(threads)


def distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun (NCCL on GPUs, Gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    """Rank 0 under torchrun (the one that writes files), and any plain process."""
    return int(os.environ.get("RANK", "0")) == 0
