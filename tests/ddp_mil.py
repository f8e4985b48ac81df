"""MIL training through the engine, for tests/test_train.py: run it plainly (one process) or under
`torchrun --nproc-per-node W` (gloo on a CPU); rank 0 saves the trained weights to the file named
by the first argument. The second argument is grad_accum. Everything runs in float64 so that
the order in which the ranks' gradients are summed does not blur the comparison.

Seven training bags (an odd number: with grad_accum 2 on 2 ranks the last step has 3 bags, so one
rank runs one bag fewer than the other), dsmil.base (a model with buffers), no dropout (each
process draws dropout masks from its own random stream).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from msamil_core.features.bags import Bag, save_bag
from msamil_core.runtime import distributed
from msamil_core.training.engine import Schedule, fit
from msamil_core.settings import TrainConfig
from msamil_core.training.mil import BagDataset, MILTask


def bags(folder: Path, n: int = 7, dim: int = 12) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        m = int(rng.integers(5, 20))
        feats = rng.normal(size=(m, dim)).astype(np.float32) + (i % 2)
        path = folder / f"b{i}.pt"
        if not path.exists():
            save_bag(path, Bag(features=torch.from_numpy(feats), coords=torch.from_numpy(rng.integers(0, 4000, (m, 2))),
                               scales=torch.from_numpy(rng.integers(0, 3, m)), patch_size_level0=torch.full((m,), 256),
                               slide_id=f"b{i}", encoder="synthetic"))
        paths.append(path)
    return paths


def main(out: str, grad_accum: int) -> None:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:  # the one-process run shares the test process: leave its default dtype as it was
        train(out, grad_accum)
    finally:
        torch.set_default_dtype(previous)


def train(out: str, grad_accum: int) -> None:
    torch.set_num_threads(1)
    rank, world = distributed()
    folder = Path(out).parent / "bags"
    if rank == 0:
        folder.mkdir(exist_ok=True)
        paths = bags(folder)
    if world > 1:
        torch.distributed.barrier()
    paths = bags(folder)
    labels = [i % 2 for i in range(len(paths))]
    cfg = TrainConfig(model="dsmil.base", model_args={"embed_dim": 16, "attn_dim": 8, "dropout": 0.0}, epochs=3,
                      lr=1e-3, grad_accum=grad_accum, warmup_epochs=1, patience=0, standardize=False, max_instances=0)
    train = BagDataset(paths, [p.stem for p in paths], labels, cfg.scales, train=True)
    task = MILTask(cfg, train, BagDataset([], [], [], cfg.scales), ["a", "b"], 12, torch.device("cpu"))
    assert any(True for _ in task.model.buffers()), "the model must have buffers"
    result = fit(task, Schedule.of(cfg))
    if rank == 0:
        torch.save({"state_dict": task.model.state_dict(), "world": world, "history": result.history}, out)
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], int(sys.argv[2]))
