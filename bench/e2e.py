"""Peak memory and step time of end-to-end training against K, with and without activation checkpointing.

    python bench/e2e.py                                        # CPU: msfem at 64 px, K = 16, 64, 200
    python bench/e2e.py --device cuda --input-size 512         # the paper's setting on a GPU
    python bench/e2e.py --encoder resnet18 --input-size 96 --ks 16 64

One step is what `msamil e2e` does per slide: K uint8 patches [K, S, S, 3] (random pixels; the
reading is not timed) go through the trainable encoder in chunks of --chunk-size (each chunk
recomputed in the backward pass when checkpointing), the K features with coordinates and
scales through the MIL model (msamil.base), cross-entropy, backward, and an AdamW step over
both. BatchNorm statistics are frozen as in training; bf16 autocast on CUDA.

Each (K, checkpointing) case runs in a fresh Python process so one case's memory never counts
for the next. Measured:
  time    wall-clock seconds of one step: the median of --repeats steps after the first
          (which also allocates optimizer state), or the first when it takes over 20 s.
  memory  CPU: peak resident memory increase over the first step (VmHWM after it minus VmRSS
          just before it, /proc/self/status), which includes activations kept for backward,
          gradients, AdamW state and allocator caches. CUDA: torch.cuda.max_memory_allocated()
          during the first step minus the memory allocated before it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mil import first_step_peak  # noqa: E402  (bench/mil.py)


def run_case(args, k: int, checkpointing: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from msamil_core.features.encoders import EncoderSpec
    from msamil_core.settings import E2EConfig
    from msamil_core.training.e2e import SlidePatches, build_joint_model, slide_forward

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kwargs = json.loads(args.encoder_args)
    spec = EncoderSpec(args.encoder, input_size=args.input_size, kwargs=kwargs)
    cfg = E2EConfig(model="msamil.base", k=k, checkpointing=checkpointing, chunk_size=args.chunk_size)
    model = build_joint_model(cfg, spec, num_classes=2).to(device).train()
    optimizer = torch.optim.AdamW([{"params": model.encoder.parameters(), "lr": cfg.encoder_lr},
                                   {"params": model.mil.parameters(), "lr": cfg.lr}], weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(0)
    item = SlidePatches("bench", torch.randint(0, 256, (k, args.input_size, args.input_size, 3), dtype=torch.uint8,
                                               generator=g),
                        torch.randint(0, 40000, (k, 2), generator=g), torch.randint(0, 3, (k,), generator=g), 1)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step() -> float:
        sync()
        start = time.perf_counter()
        results, _ = slide_forward(model, item, device, loss_fn=F.cross_entropy, bf16=True)
        results["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    first, peak_mb = first_step_peak(step, device.type)
    times = [step() for _ in range(args.repeats)] if first < 20 else []
    return {"k": k, "checkpointing": checkpointing, "time_s": statistics.median(times) if times else first,
            "peak_mb": peak_mb, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", nargs="+", type=int, default=[16, 64, 200], help="patches per step (default: %(default)s)")
    parser.add_argument("--encoder", default="msfem", help="msfem or a timm model (default: %(default)s)")
    parser.add_argument("--encoder-args", default="{}", help="JSON of encoder options, e.g. '{\"depth\": 2}'")
    parser.add_argument("--input-size", type=int, help="patch side in px (default: 64 on cpu, 512 on cuda)")
    parser.add_argument("--chunk-size", type=int, default=16, help="patches per encoder forward (default: %(default)s)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after the first (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--only", choices=["on", "off"], help="only with (on) or without (off) checkpointing")
    parser.add_argument("--case", nargs=2, metavar=("K", "CKPT"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    args.input_size = args.input_size or (512 if args.device == "cuda" else 64)

    if args.case:
        print(json.dumps(run_case(args, int(args.case[0]), args.case[1] == "on")))
        return

    mem = "peak RSS increase" if args.device == "cpu" else "peak allocated"
    print(f"one e2e step (encoder fwd+bwd, msamil.base, AdamW), {args.encoder} at {args.input_size} px, "
          f"chunks of {args.chunk_size}, device {args.device}")
    print(f"{'K':>6}{'checkpointing':>15}{'time (s)':>11}{mem + ' (MiB)':>26}")
    r = None
    for k in args.ks:
        for ckpt in [m for m in ("off", "on") if args.only in (None, m)]:
            cmd = [sys.executable, __file__, "--case", str(k), ckpt, "--encoder", args.encoder, "--encoder-args",
                   args.encoder_args, "--input-size", str(args.input_size), "--chunk-size", str(args.chunk_size),
                   "--device", args.device, "--repeats", str(args.repeats)]
            cmd += ["--threads", str(args.threads)] if args.threads else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                reason = (proc.stderr.strip().splitlines() or ["killed"])[-1]
                print(f"{k:>6}{ckpt:>15}{'failed':>11}  {reason}", flush=True)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{k:>6}{ckpt:>15}{r['time_s']:>11.2f}{r['peak_mb']:>26.0f}", flush=True)
    if r is not None:
        print(f"(torch {r['torch']}, {r['threads']} intra-op threads{', ' + r['gpu'] if r['gpu'] else ''})")


if __name__ == "__main__":
    main()
