"""Feature-extraction speed on this machine: does patch reading hide behind the model?

Prints, for one real multi-level slide and its 20x/10x/5x coordinates (made by
``msamil_core.wsi.coords``):

* reader only: read + decode + resize, patches/s, through the DataLoader workers;
* model only: forward passes over the same batches already in memory, patches/s;
* whole pipeline (``msamil_core.features.extraction.encode_patches``: workers read while the model runs),
  patches/s, and its ratio to model only (goal >= 0.8: reading costs the model little);
* where the time goes: per patch, reading + decoding the region (OpenSlide / tile reader), the
  resize to the input size, and the model, in ms, measured one after the other in this process;
* model-only images/s of efficientnet_b3 at 224 and 512 px and of msfem at 512 and a small size;
* peak resident memory (ru_maxrss) of this process and of the reader processes.

``--encoder`` takes a preset (``resnet50_trunc``, ``uni_v1``, ``phikon``, ...; its own input size
and normalisation, random weights: speed does not depend on them) or any encoder name;
``--presets a,b,c`` (or ``cpu`` / ``all``) runs the comparison for each preset in turn.

This bench measures the CPU only: no GPU was available to the session that wrote it, so the GPU
figures (bf16, channels_last, peak GPU memory, uni_v1 pipeline/model >= 0.9) are not measured.

Run: ``.venv/bin/python bench/extract.py`` (a few minutes on 2 CPU cores; ``--help`` for options).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

from msamil_core.features.encoders import EncoderSpec, build_encoder
from msamil_core.features.presets import PRESETS
from msamil_core.features.extraction import PatchDataset, encode_patches, make_loader, prepare_encoder, to_model_input
from msamil_core.wsi.coords import PatchTable, make_grids
from msamil_core.wsi.slide import Slide, open_slide

DEFAULT_SLIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "test3-DAPI-2-(387).ndpi"
# presets whose forward pass takes well under a second per patch on 2 CPU cores
CPU_PRESETS = ("resnet50_trunc", "phikon", "uni_v1", "phikon_v2")


def patch_table(slide: Slide, patch_size: int, max_patches: int) -> PatchTable:
    """Grid patches of the three scales (the whole slide as the mask), at most ``max_patches``,
    taken evenly so that every scale stays represented."""
    mask = np.ones((64, 64), bool)
    grids = make_grids(mask, slide.dimensions, slide.mpp, patch_size=patch_size, name=slide.slide_id)
    coords = np.concatenate([g.coords for g in grids.values()])
    scales = np.concatenate([np.full(len(g.coords), i) for i, g in enumerate(grids.values())])
    sizes = np.concatenate([np.full(len(g.coords), g.attrs["patch_size_level0"]) for g in grids.values()])
    keep = np.linspace(0, len(coords) - 1, min(max_patches, len(coords))).round().astype(int)
    return PatchTable(coords[keep].astype(np.int64), scales[keep].astype(np.int64), sizes[keep].astype(np.int64))


def model_only(encoder, batches: list[torch.Tensor], device: torch.device) -> float:
    """Patches/s of forward passes over batches already in memory (after one warm-up pass)."""
    with torch.inference_mode():
        encoder(to_model_input(batches[0], device))
        start = time.perf_counter()
        for batch in batches:
            encoder(to_model_input(batch, device))
        return sum(len(b) for b in batches) / (time.perf_counter() - start)


def images_per_second(spec: EncoderSpec, batch_size: int, batches: int) -> float:
    """Model-only images/s of ``spec`` on random uint8 images, prepared as the pipeline prepares
    them (channels_last), after one warm-up batch."""
    device = torch.device("cpu")
    encoder = prepare_encoder(build_encoder(spec)[0], device)
    hwc = torch.randint(0, 256, (batch_size, spec.input_size, spec.input_size, 3), dtype=torch.uint8)
    return model_only(encoder, [hwc] * batches, device)


def where_time_goes(slide_path: Path, table: PatchTable, input_size: int, encoder, device, n: int = 32) -> dict:
    """ms per patch of read + decode, resize and model, for ``n`` patches of ``table``, one step
    after the other in this process (what a reader worker and the model each spend)."""
    from PIL import Image

    read = resize = 0.0
    patches = []
    with open_slide(slide_path) as slide:
        for i in range(min(n, len(table))):
            x, y = (int(v) for v in table.coords[i])
            size = int(table.patch_size_level0[i])
            choice = slide.best_level(size, input_size)
            start = time.perf_counter()
            region = slide.read_region(x, y, choice.level, (choice.size, choice.size))
            read += time.perf_counter() - start
            start = time.perf_counter()
            if choice.size != input_size:
                region = np.asarray(Image.fromarray(region).resize((input_size, input_size), Image.Resampling.BOX))
            resize += time.perf_counter() - start
            patches.append(torch.from_numpy(np.ascontiguousarray(region)))
    batch = torch.stack(patches)
    rate = model_only(encoder, [batch], device)
    k = len(patches)
    return {"read_decode_ms": 1000 * read / k, "resize_ms": 1000 * resize / k, "model_ms": 1000 / rate}


def compare(spec: EncoderSpec, slide_path: Path, table: PatchTable, mpp: float, args, device) -> dict:
    """Reader-only, model-only and whole-pipeline patches/s of ``spec`` (best of ``args.rounds``)."""
    encoder = prepare_encoder(build_encoder(spec)[0], device)
    dataset = PatchDataset(slide_path, table, spec.input_size, slide_path.stem, mpp)
    # reader alone: the same loader the pipeline uses, the model not running
    start = time.perf_counter()
    batches = list(make_loader(dataset, args.batch_size, args.workers, device))
    read_rate = len(table) / (time.perf_counter() - start)
    # Model only and whole pipeline alternate, best of --rounds each: other processes on a shared
    # machine slow both alike instead of biasing whichever ran during a busy spell.
    model_rates, pipeline_rates = [], []
    for _ in range(args.rounds):
        model_rates.append(model_only(encoder, batches, device))
        loader = make_loader(dataset, args.batch_size, args.workers, device)
        start = time.perf_counter()
        features = encode_patches(encoder, loader, device, progress=False)
        pipeline_rates.append(len(table) / (time.perf_counter() - start))
        del loader
        assert features.shape[0] == len(table)
    split = where_time_goes(slide_path, table, spec.input_size, encoder, device)
    return {"read": read_rate, "model": max(model_rates), "pipeline": max(pipeline_rates), "model_rounds": model_rates,
            "pipeline_rounds": pipeline_rates, **split}


def report(name: str, size: int, r: dict, workers: int) -> None:
    print(f"[{name} @ {size} px]")
    print(f"  reader only   ({workers} workers): {r['read']:8.1f} patches/s")
    print(f"  model only:                  {r['model']:8.1f} patches/s  (rounds: "
          f"{', '.join(f'{v:.1f}' for v in r['model_rounds'])})")  # fmt: skip
    print(f"  whole pipeline (read + decode + resize + model, worker start-up included): {r['pipeline']:8.1f} "
          f"patches/s  (rounds: {', '.join(f'{v:.1f}' for v in r['pipeline_rounds'])})")  # fmt: skip
    print(f"  pipeline / model-only ratio: {r['pipeline'] / r['model']:.2f}  (goal >= 0.8 on CPU; 0.9 for uni_v1 on a GPU)")
    total = r["read_decode_ms"] + r["resize_ms"] + r["model_ms"]
    print(f"  where the time goes, ms per patch: read + decode {r['read_decode_ms']:.2f} "
          f"({100 * r['read_decode_ms'] / total:.0f}%), resize {r['resize_ms']:.2f} ({100 * r['resize_ms'] / total:.0f}%), "
          f"model {r['model_ms']:.2f} ({100 * r['model_ms'] / total:.0f}%)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=DEFAULT_SLIDE, help="a multi-level slide (default: the shared NDPI)")
    parser.add_argument("--encoder", default="efficientnet_b3", help="encoder of the pipeline comparison (a preset "
                        "or any encoder name)")
    parser.add_argument("--presets", help="comma-separated presets to compare in turn, or `cpu` "
                        f"({','.join(CPU_PRESETS)}) or `all`")
    parser.add_argument("--input-size", type=int, default=None, help="default: the preset's, else 224")
    parser.add_argument("--patch-size", type=int, default=128, help="patch px at each magnification")
    parser.add_argument("--max-patches", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--small-size", type=int, default=128, help="the small msfem input size")
    parser.add_argument("--rounds", type=int, default=2, help="alternating model-only / pipeline rounds (best of)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # random-init warnings would drown the figures
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    busy = " (other processes share the machine: every figure below is pessimistic)" if load > 0.5 * cpus else ""
    print(f"load average before: {load:.1f} on {cpus} CPUs{busy}")

    with open_slide(args.slide) as slide:
        table = patch_table(slide, args.patch_size, args.max_patches)
        mpp = slide.mpp
        print(f"slide: {args.slide.name}  {slide.dimensions[0]}x{slide.dimensions[1]} px, {slide.level_count} levels, "
              f"{slide.mpp:.4f} µm/px")  # fmt: skip
    print(f"patches: {len(table)} {table.counts()}, {args.patch_size} px at each scale -> the input size; "
          f"batch {args.batch_size}, {args.workers} workers, {torch.get_num_threads()} torch threads")  # fmt: skip
    names = [args.encoder] if not args.presets else (
        list(PRESETS) if args.presets == "all" else list(CPU_PRESETS) if args.presets == "cpu" else args.presets.split(","))
    for name in names:
        spec = EncoderSpec(name, input_size=args.input_size)
        result = compare(spec, args.slide, table, mpp, args, device)
        report(name, spec.input_size, result, args.workers)
    print(f"peak memory so far (ru_maxrss): main process {_peak_mib(resource.RUSAGE_SELF):.0f} MiB, "
          f"largest reader process {_peak_mib(resource.RUSAGE_CHILDREN):.0f} MiB")  # fmt: skip
    if args.presets:
        return

    print("model-only images/s (CPU, channels_last, batch 8, 2 timed batches after a warm-up):")
    for name, size in (("efficientnet_b3", 224), ("efficientnet_b3", 512), ("msfem", 512), ("msfem", args.small_size)):
        rate = images_per_second(EncoderSpec(name, input_size=size), batch_size=8, batches=2)
        print(f"  {name:16s} @ {size:3d} px: {rate:7.2f} images/s")

    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print(f"peak memory at the end (ru_maxrss, msfem @ 512 included): main process "
          f"{_peak_mib(resource.RUSAGE_SELF):.0f} MiB")  # fmt: skip


def _peak_mib(who: int) -> float:
    """Peak resident set size in MiB (ru_maxrss is KiB on Linux); RUSAGE_CHILDREN is the
    largest finished child, here a reader process."""
    return resource.getrusage(who).ru_maxrss / 1024


if __name__ == "__main__":
    main()
