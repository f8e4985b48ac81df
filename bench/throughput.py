"""Extraction throughput of a cohort: the workflow's per-slide jobs against the model alone.

    python bench/throughput.py                         # 4 demo slides, uni_v1, this machine's device
    python bench/throughput.py --slides a.svs b.svs --encoder resnet50_trunc --max-patches 0
    python bench/throughput.py --device cuda --threads 16 --max-patches 0 --n-slides 8

For N slides (default: the first ones of the demo cohort; ``--slides`` any files) and an encoder
(default ``uni_v1``, ViT-L/16, with random weights laid out in an offline Hugging Face cache as
the published ones are), the bench makes each slide's tissue coordinates (20x, 10x, 5x; at most
``--max-patches`` per scale, in grid order; 0 = all) and then measures

- wall: the cohort through ``msamil extract``, one process per slide and one after the other, as
  the workflow runs its extract_features jobs, with the feature server (``features.server``; a
  fresh one, so its start counts); and one slide with ``--no-server`` (each job loading the
  encoder, as before the server);
- model-only: the encoder's forward passes over as many patches, in batches of the same size, in
  one process (bf16 autocast on CUDA, as extraction);
- reading: reading and resizing the same patches in one process, one thread;
- fixed seconds per slide: (wall - model-only - reading) / N (on the CPU reading and the model take
  turns in a job; with reader processes on a GPU reading overlaps the model and this is an upper
  bound);
- the in-process pipeline (:class:`~msamil_core.features.extraction.Extractor` over the whole
  cohort, the next slide's readers started early, as ``msamil predict`` and the server run) as a
  share of model-only, with peak GPU memory and mean GPU utilisation on CUDA;
- per scale, our read rate over every patch of that scale of the first slide (grid order) as a
  share of the tile-once rate: decoding, straight from the file, each JPEG tile those patches
  touch once (the machine's limit).

Goals (issue 24): fixed cost at most 0.5 s per slide for uni_v1 on a CPU; reading at least 0.8
of the tile-once rate at 20x, 10x and 5x; on an H100 the uni_v1 pipeline at least 0.9 of
model-only and 2,000 patches/s with 16 cores.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # read_patches.py beside this file

from msamil_core.settings import FeatureSettings, PatchSettings, SCALES  # noqa: E402


def demo_slides(out: Path, n: int) -> list[Path]:
    from msamil_core.cohort.demo import cohort_table, generate_cohort

    ids = list(cohort_table(n_slides=30, seed=0)["slide_id"][:n])
    table = generate_cohort(out, n_slides=30, seed=0, slide_ids=ids)
    return [Path(p) for p in table.loc[table["slide_id"].isin(ids), "path"]]


def tissue_grids(slide: Path, folder: Path, patch_size: int) -> dict:
    """The slide's tissue grids at 20x, 10x and 5x (its thumbnail and tissue mask made in
    ``folder`` the first time)."""
    from msamil_core.pipeline import make_thumbnail, make_tissue_mask, select_grids
    from msamil_core.wsi.masks import load_mask
    from msamil_core.wsi.thumbnail import load_meta

    if not (folder / "tissue.png").exists():
        make_thumbnail(slide, folder / "thumbnail.png", folder / "meta.json")
        make_tissue_mask(folder / "thumbnail.png", folder / "tissue.png", slide_id=slide.stem)
    return select_grids(load_meta(folder / "meta.json"), load_mask(folder / "tissue.png"), None, "tissue",
                        PatchSettings(patch_size=patch_size))


def make_coords(slide: Path, folder: Path, max_patches: int, patch_size: int) -> tuple[list[Path], int]:
    """The slide's tissue coordinates (first ``max_patches`` per scale; 0 = all): (files, patches)."""
    from msamil_core.wsi.coords import write_coords

    grids = tissue_grids(slide, folder, patch_size)
    files, total = [], 0
    for scale, grid in grids.items():
        coords = grid.coords[:max_patches] if max_patches else grid.coords
        files.append(folder / f"{scale}.h5")
        write_coords(files[-1], coords, grid.attrs)
        total += len(coords)
    return files, total


def hub_weights(name: str, cache: Path) -> str | None:
    """``hf-hub:<repo>`` of random weights for a preset in the offline cache (None: not a preset)."""
    from msamil_core.features.encoders import build_preset_backbone
    from msamil_core.features.presets import get_preset
    from msamil_core.hub import put_in_cache

    preset = get_preset(name)
    if preset is None or not preset.repo_id:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = build_preset_backbone(preset).state_dict()
    (filename,) = preset.files[:1]
    buffer = io.BytesIO()
    if filename.endswith(".safetensors"):
        from safetensors.torch import save

        buffer.write(save({k: v.contiguous() for k, v in state.items()}))
    else:
        torch.save(state, buffer)
    put_in_cache(cache, preset.repo_id, {filename: buffer.getvalue()})
    return f"hf-hub:{preset.repo_id}"


def extract_command(slide: Path, coords: list[Path], out: Path, args, weights: str | None, *extra) -> list[str]:
    return [sys.executable, "-m", "msamil_core", "extract", "--slide", str(slide), "--coords", *map(str, coords),
            "--out", str(out), "--encoder", args.encoder, *(["--weights", weights] if weights else []),
            "--batch-size", str(args.batch_size), "--workers", args.workers, "--device", args.device,
            "--threads", str(args.threads), "--no-progress", *extra]


def timed_run(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"extraction failed:\n{run.stderr[-3000:]}")
    return time.perf_counter() - start


class GpuMonitor:
    """Mean GPU utilisation (nvidia-smi, every 200 ms) while it runs."""

    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]],
                                     capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def mean(self) -> str:
        return f"{statistics.mean(self.samples):.0f} %" if self.samples else "n/a"


def model_only(extractor, counts: list[int], batch_size: int) -> float:
    """Seconds of the encoder's forward passes over each slide's patches (uint8 noise), in the
    batches extraction makes of them (a slide's last batch is short)."""
    from msamil_core.features.extraction import to_model_input
    from msamil_core.runtime import autocast

    size = extractor.spec.input_size
    batch = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8)
    if extractor.device.type == "cuda":
        batch = batch.pin_memory()
    sync = torch.cuda.synchronize if extractor.device.type == "cuda" else (lambda: None)
    with torch.inference_mode(), autocast(extractor.device, bf16=True):
        extractor.encoder(to_model_input(batch[:2], extractor.device))  # warm-up
        sync()
        start = time.perf_counter()
        for n in counts:
            for i in range(0, n, batch_size):
                extractor.encoder(to_model_input(batch[: min(batch_size, n - i)], extractor.device)).float().cpu()
        sync()
    return time.perf_counter() - start


def reading(jobs, input_size: int) -> float:
    from msamil_core.features.extraction import PatchDataset

    start = time.perf_counter()
    for job in jobs:
        dataset = PatchDataset(job.slide_path, job.table, input_size, job.slide_id, job.mpp)
        for row in range(len(job.table)):
            dataset.read(row)
        dataset.close()
    return time.perf_counter() - start


def read_shares(slide: Path, folder: Path, patch_size: int) -> list[str]:
    """Per scale: our read rate over all the slide's tissue patches of that scale, as a share of
    decoding each tile they touch once."""
    from read_patches import RawTiles

    from msamil_core.wsi.slide import open_slide

    grids = tissue_grids(slide, folder, patch_size)
    raw = RawTiles(slide)
    lines = []
    for scale in SCALES:
        grid = grids[scale]
        size0 = int(grid.attrs["patch_size_level0"])
        with open_slide(slide) as ours:
            choice = ours.best_level(size0, patch_size)
            page = raw.page_for(ours.level_dimensions[choice.level])
            start = time.perf_counter()
            for x, y in grid.coords:
                ours.read_patch(int(x), int(y), size0, patch_size)
            ours_s = time.perf_counter() - start
        tw, th, ds = page.tilewidth, page.tilelength, choice.downsample
        tiles = set()
        for x, y in grid.coords:
            lx, ly, n = int(x / ds), int(y / ds), choice.size
            for ty in range(ly // th, min(ly + n - 1, page.imagelength - 1) // th + 1):
                for tx in range(lx // tw, min(lx + n - 1, page.imagewidth - 1) // tw + 1):
                    tiles.add((tx, ty))
        start = time.perf_counter()
        for tx, ty in tiles:
            raw.decode_region(page, tx * tw, ty * th, 1)
        once_s = time.perf_counter() - start
        lines.append(f"  {scale:>3}: {len(grid.coords):5d} patches, {len(tiles):5d} tiles: ours "
                     f"{len(grid.coords) / ours_s:7.1f} patches/s, tile-once {len(grid.coords) / once_s:7.1f} "
                     f"patches/s -> {once_s / ours_s:.2f} of tile-once (goal >= 0.8)")
    raw.close()
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", nargs="+", type=Path, help="slide files (default: demo slides)")
    parser.add_argument("--n-slides", type=int, default=4, help="demo slides when --slides is not given (default 4)")
    parser.add_argument("--encoder", default="uni_v1", help="preset, msfem or timm name (default uni_v1)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="the job's threads")
    parser.add_argument("--workers", default="auto", help="features.workers (default auto)")
    parser.add_argument("--batch-size", type=int, default=FeatureSettings().batch_size)
    parser.add_argument("--max-patches", type=int, default=None,
                        help="patches per scale and slide, 0 = all (default: 2 on the CPU, all on a GPU)")
    parser.add_argument("--patch-size", type=int, default=256, help="px at each magnification (default 256)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    if args.max_patches is None:
        args.max_patches = 0 if cuda else 2
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="msamil-tput-"))
    slides = args.slides or demo_slides(work / "demo", args.n_slides)
    cache = work / "hf"
    cache.mkdir()
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1",
               XDG_RUNTIME_DIR=tempfile.mkdtemp(prefix="msamil-tput-srv-"))  # a fresh server: its start counts
    os.environ.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    weights = hub_weights(args.encoder, cache)
    coords, counts = {}, []
    for slide in slides:
        coords[slide], n = make_coords(slide, work / "coords" / slide.stem, args.max_patches, args.patch_size)
        counts.append(n)
    patches = sum(counts)
    print(f"{len(slides)} slides, {patches} patches ({args.max_patches or 'all'} per scale and slide), encoder "
          f"{args.encoder} ({'random weights in an offline hub cache' if weights else 'random initialisation'}), "
          f"device {args.device}, {args.threads} threads, workers {args.workers}, batch {args.batch_size}")

    walls = [timed_run(extract_command(s, coords[s], work / "bags" / f"{s.stem}.pt", args, weights), env)
             for s in slides]
    wall = sum(walls)
    no_server = timed_run(extract_command(slides[0], coords[slides[0]], work / "job.pt", args, weights,
                                          "--no-server"), env)

    from msamil_core.features.extraction import Extractor, patch_job

    features = FeatureSettings(batch_size=args.batch_size, workers=args.workers)
    extractor = Extractor(_spec(args.encoder, weights), features, args.device, args.threads)
    jobs = [patch_job(s, [coords[s]])[0] for s in slides]
    model_s = model_only(extractor, counts, args.batch_size)
    read_s = reading(jobs, extractor.spec.input_size)
    if extractor.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(extractor.device)
    with GpuMonitor() if extractor.device.type == "cuda" else _Nothing() as monitor:
        start = time.perf_counter()
        for _ in extractor.encode(jobs, progress=False):
            pass
        if extractor.device.type == "cuda":
            torch.cuda.synchronize()
        pipeline_s = time.perf_counter() - start

    n = len(slides)
    fixed = (wall - model_s - read_s) / n
    # each slide's own fixed seconds: its wall minus its share of model-only and reading
    own = [w - (model_s + read_s) * c / patches for w, c in zip(walls, counts)]
    print(f"cohort wall (msamil extract per slide, feature server): {wall:.2f} s; per slide: first "
          f"{walls[0]:.2f} s (starts the server), then median {statistics.median(walls[1:] or walls):.2f} s")
    print(f"one slide with --no-server (the job loads the encoder): {no_server:.2f} s")
    print(f"model-only: {model_s:.2f} s ({patches / model_s:.1f} patches/s); reading: {read_s:.2f} s "
          f"({patches / read_s:.1f} patches/s)")
    print(f"fixed seconds per slide: {fixed:.2f} s over the cohort (goal <= 0.5 for uni_v1 on a CPU): the first "
          f"slide {own[0]:.2f} s (the server's start), each later one {statistics.mean(own[1:] or own):.2f} s on "
          f"average; without the server {no_server - (model_s + read_s) * counts[0] / patches:.2f} s every slide")
    print(f"patches/s: {patches / wall:.1f} (cohort wall); in-process pipeline {patches / pipeline_s:.1f}, "
          f"{model_s / pipeline_s:.2f} of model-only (goal >= 0.9 for uni_v1 on an H100)")
    if extractor.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(extractor.device) / 2**30
        print(f"GPU: {torch.cuda.get_device_name(extractor.device)}; peak memory {peak:.2f} GiB; mean "
              f"utilisation {monitor.mean()} during the in-process pipeline")
    print(f"read rate as a share of tile-once decoding, slide {slides[0].name}:")
    for line in read_shares(slides[0], work / "coords" / slides[0].stem, args.patch_size):
        print(line)
    return 0


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _spec(name: str, weights: str | None):
    from msamil_core.features.encoders import EncoderSpec

    return EncoderSpec(name, weights=weights)


if __name__ == "__main__":
    sys.exit(main())
