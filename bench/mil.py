"""Forward + backward time and peak memory of MIL models on bags of N instances.

    python bench/mil.py                                   # msamil / abmil / transmil, N = 1k, 5k, 20k
    python bench/mil.py --models msamil.base --sizes 20000 --device cuda

Each (model, N) runs in a fresh Python process, so one case's memory never counts for
the next. In it: the model (train mode) and a random bag [1, N, in_dim] with level-0
coordinates and scales are built, then one step (forward, cross-entropy loss, backward)
is run.

What is measured:
  time    wall-clock seconds of one step; the median of ``--repeats`` steps after the
          first when the first takes under 10 s, else the first step.
  memory  CPU: peak resident memory increase during the first step, VmHWM after the step
          minus VmRSS just before it (from /proc/self/status; Linux). It covers activations
          kept for backward, gradients and allocator caches: what the step makes the
          process hold at its peak, not only tensor bytes.
          CUDA: torch.cuda.max_memory_allocated() during the step minus the memory
          allocated before it (tensor bytes, no allocator cache).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

MODELS = ["msamil.base", "abmil.base", "transmil.base"]
SIZES = [1000, 5000, 20000]


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{field} not in /proc/self/status")


def first_step_peak(step, device: str) -> tuple[float, float]:
    """Run ``step()`` (returns seconds) once: (its time, its peak memory in MiB). CPU: VmHWM after
    the step minus VmRSS before it; CUDA: max_memory_allocated during it minus allocated before."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        first = step()
        return first, (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _proc_status_mb("VmRSS")
    first = step()
    return first, _proc_status_mb("VmHWM") - base


def run_case(name: str, n: int, in_dim: int, device: str, repeats: int, threads: int | None) -> dict:
    """One (model, N) case in this process: time and peak memory of forward + backward."""
    import torch
    import torch.nn.functional as F

    from msamil_core.mil import create_model

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(name, in_dim=in_dim, num_classes=2).to(device).train()
    h = torch.randn(1, n, in_dim, device=device)
    cells = torch.randperm(4 * n, device=device)[:n]
    coords = (torch.stack([cells % 400, cells // 400], -1) * 256).unsqueeze(0)
    scales = torch.randint(0, 3, (1, n), device=device)
    label = torch.tensor([1], device=device)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        results, _ = model(h, loss_fn=F.cross_entropy, label=label, coords=coords, scales=scales)
        results["loss"].backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first, peak_mb = first_step_peak(step, device)
    times = [step() for _ in range(repeats)] if first < 10 else []
    return {
        "model": name,
        "n": n,
        "time_s": statistics.median(times) if times else first,
        "peak_mb": peak_mb,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": device,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS, help="registry names (default: %(default)s)")
    parser.add_argument("--sizes", nargs="+", type=int, default=SIZES, help="instances per bag (default: %(default)s)")
    parser.add_argument("--in-dim", type=int, default=512, help="feature width (default: %(default)s, the paper's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after the first (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--case", nargs=2, metavar=("MODEL", "N"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()

    if args.case:
        case = run_case(args.case[0], int(args.case[1]), args.in_dim, args.device, args.repeats, args.threads)
        print(json.dumps(case))
        return

    mem = "peak RSS increase" if args.device == "cpu" else "peak allocated"
    print(f"forward+backward, one bag [1, N, {args.in_dim}], train mode, device {args.device}")
    print(f"{'model':<16}{'N':>8}{'time (s)':>11}{mem + ' (MiB)':>26}")
    for name in args.models:
        for n in args.sizes:
            cmd = [sys.executable, __file__, "--case", name, str(n), "--in-dim", str(args.in_dim)]
            cmd += ["--device", args.device, "--repeats", str(args.repeats)]
            cmd += ["--threads", str(args.threads)] if args.threads else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                reason = (proc.stderr.strip().splitlines() or ["killed"])[-1]
                print(f"{name:<16}{n:>8}{'failed':>11}  {reason}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{name:<16}{n:>8}{r['time_s']:>11.2f}{r['peak_mb']:>26.0f}", flush=True)
    if args.device == "cpu" and "r" in locals():
        print(f"(torch {r['torch']}, {r['threads']} intra-op threads)")


if __name__ == "__main__":
    main()
