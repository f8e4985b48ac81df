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
    None when every key is held."""
    import fcntl

    for index, key in enumerate(keys):
        path = os.path.join(lock_dir, f"msamil-{key}.lock")
        if path in _claimed:
            return index
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _claimed[path] = fd
        return index
    return None


def claim_gpu() -> int:
    """A visible GPU for this process; GPUs are named by UUID, so jobs that see them in another
    order (CUDA_VISIBLE_DEVICES) still claim each physical GPU once."""
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    keys = [f"gpu-{torch.cuda.get_device_properties(i).uuid}" for i in range(count)]
    index = claim_free(keys, tempfile.gettempdir())
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
