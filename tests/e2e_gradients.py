"""One end-to-end step's gradients, for tests/test_e2e.py: run it plainly (one process) or under
`torchrun --nproc-per-node W` (patches split across ranks, gloo on a CPU); rank 0 saves
{parameter name: gradient} and the loss to the file named by the first argument; the second
is the dtype (float64 by default, so that float32 rounding of differently sized chunks does not
blur the comparison).

The joint model is msfem (ResNet-18 feature map with BatchNorm -> tokens -> Transformer) and
msamil.base with dropout, in train mode; K = 11 patches, so 2 ranks get 6 and 5.
"""

from __future__ import annotations

import os
import sys

import torch

from msamil_core.settings import E2EConfig
from msamil_core.training.e2e import EndToEnd, SlidePatches, build_joint_model, slide_forward, step_seed
from msamil_core.training.engine import sync_gradients
from msamil_core.features.encoders import EncoderSpec
from msamil_core.runtime import distributed


def main(out: str, dtype: str) -> None:
    torch.set_num_threads(1)
    rank, world = distributed()
    spec = EncoderSpec("msfem", input_size=64, seed=3,
                       kwargs={"backbone": "resnet18", "dim": 64, "depth": 1, "heads": 4, "grid_size": 2})
    cfg = E2EConfig(model="msamil.base", model_args={"dropout": 0.25}, k=11, chunk_size=4, seed=5)
    model: EndToEnd = build_joint_model(cfg, spec, num_classes=3).to(getattr(torch, dtype)).train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # timm zero-initialises each residual branch's last BN scale: no gradient would reach it
        for m in model.encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
    patches = torch.rand(cfg.k, 64, 64, 3, generator=g, dtype=getattr(torch, dtype))  # RGB in [0, 1]
    item = SlidePatches("s", patches,
                        torch.randint(0, 4000, (cfg.k, 2), generator=g), torch.randint(0, 3, (cfg.k,), generator=g), 2)
    results, _ = slide_forward(model, item, torch.device("cpu"), rank, world,
                               loss_fn=torch.nn.functional.cross_entropy, dropout_seed=step_seed(5, 0, 0))
    results["loss"].backward()
    params = [p for p in model.parameters() if p.requires_grad]
    sync_gradients(params, world)
    if rank == 0:
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
        torch.save({"grads": grads, "loss": results["loss"].detach(), "world": world}, out)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "float64")
