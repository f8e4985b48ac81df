"""The extraction pipeline: readers sized from the job, bands of batches per reader, many slides
through one encoder with the next slide read early, and the GPU path's resize (on the CPU here;
the CUDA tests run wherever a GPU is present)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msamil_core.errors import MsamilError
from msamil_core.features.encoders import EncoderSpec
from msamil_core.features.extraction import (Extractor, PatchDataset, batch_order, patch_job, resize_on_device)
from msamil_core.settings import FeatureSettings
from msamil_core.wsi.coords import make_grids, write_coords
from msamil_core.wsi.slide import open_slide

SPEC = EncoderSpec("resnet18", input_size=64)


def test_workers_auto_follows_the_jobs_threads_and_device():
    auto = FeatureSettings()
    assert auto.workers == "auto"
    assert auto.reader_processes("cuda", 8) == 7 and auto.reader_processes("cuda", 1) == 1
    assert auto.reader_processes("cpu", 8) == 0
    assert FeatureSettings(workers="3").reader_processes("cpu", 8) == 3  # a number as the CLI gives it
    with pytest.raises(MsamilError, match="whole number or auto"):
        FeatureSettings(workers="many")


@pytest.mark.parametrize("n, readers", [(10, 3), (7, 7), (5, 8), (64, 4), (1, 2), (0, 3)])
def test_each_reader_reads_one_contiguous_band_of_batches(n, readers):
    order = batch_order(n, readers)
    assert sorted(order) == list(range(n))
    for reader in range(readers):  # a DataLoader deals position i to reader i % readers
        mine = order[reader::readers]
        assert mine == list(range(mine[0], mine[0] + len(mine))) if mine else True


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Two patch jobs on CMU-1-Small-Region (different parts of the slide)."""
    from conftest import shared_slide

    slide = shared_slide("CMU-1-Small-Region.svs")
    root = tmp_path_factory.mktemp("pipeline")
    out = []
    with open_slide(slide) as s:
        for name, rows in (("top", slice(0, 12)), ("bottom", slice(40, 52))):
            mask = np.zeros((60, 44), bool)
            mask[rows] = True
            files = []
            for scale, grid in make_grids(mask, s.dimensions, s.mpp, patch_size=128, name=name).items():
                files.append(root / name / f"{scale}.h5")
                write_coords(files[-1], grid.coords, grid.attrs)
            out.append(patch_job(slide, [files], name)[0])
    return out


def test_many_slides_through_one_encoder_equal_one_at_a_time(jobs):
    one = Extractor(SPEC, FeatureSettings(batch_size=16, workers=0), "cpu", threads=1)
    alone = [next(one.encode([job], progress=False)) for job in jobs]
    # two reader processes, the second slide's started while the first is encoded
    many = Extractor(SPEC, FeatureSettings(batch_size=16, workers=2), "cpu", threads=1)
    together = list(many.encode(iter(jobs), progress=False))
    assert len(together) == 2
    for a, b in zip(alone, together):
        assert torch.equal(a, b)


@pytest.mark.parametrize("size", [64, 224])
def test_resize_on_the_device_gives_the_readers_pixels(jobs, size):
    """The GPU path's resize (run here on the CPU) against the CPU path's Pillow resize, from
    128, 256 and 512 px regions: integer shrinks to 64 px, box filter and enlargement to 224 px;
    Pillow's integer arithmetic on the device gives the same pixels."""
    job = jobs[0]
    resized = PatchDataset(job.slide_path, job.table, size, job.slide_id, job.mpp, batch_size=32)
    as_read = PatchDataset(job.slide_path, job.table, size, job.slide_id, job.mpp, batch_size=32, device_resize=True)
    diffs, sizes = [], set()
    for index in range(len(resized)):
        _, cpu = resized[index]
        _, groups = as_read[index]
        sizes |= {patches.shape[1] for _, patches in groups}
        device = resize_on_device(groups, len(cpu), size, torch.device("cpu"))
        diffs.append(torch.equal(device, cpu.permute(0, 3, 1, 2)))
    assert sizes == {128, 256, 512}  # 20x, 10x and 5x regions, each read at its own size
    assert all(diffs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_features_match_the_cpus_to_bf16_precision(jobs):
    cpu = Extractor(SPEC, FeatureSettings(batch_size=16), "cpu", threads=1)
    gpu = Extractor(SPEC, FeatureSettings(batch_size=16), "cuda")
    assert gpu.readers >= 1 and gpu.device_resize
    a = list(cpu.encode(jobs, progress=False))
    b = list(gpu.encode(jobs, progress=False))
    for x, y in zip(a, b):
        cosine = torch.nn.functional.cosine_similarity(x, y.float(), dim=1)
        assert cosine.min() > 0.99, cosine.min()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_jpeg_decoding_matches_the_cpu_decoder(jobs):
    cpu = Extractor(SPEC, FeatureSettings(batch_size=16), "cuda")
    gpu = Extractor(SPEC, FeatureSettings(batch_size=16, gpu_decode=True), "cuda")
    for x, y in zip(cpu.encode(jobs, progress=False), gpu.encode(jobs, progress=False)):
        cosine = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=1)
        assert cosine.min() > 0.99, cosine.min()


def test_an_idle_server_lets_other_jobs_claim_its_gpu(tmp_path, caplog):
    """A feature server releases its GPU's lock between slides (release_gpus) and takes it back for
    the next (reclaim_gpus); if a job claimed it meanwhile, the GPU is shared and the log says so."""
    import fcntl
    import os

    from msamil_core import runtime

    key = f"gpu-test-{os.getpid()}"
    assert runtime.claim_free([key], runtime.gpu_lock_dir()) == 0
    released = runtime.release_gpus()
    assert released == [key]
    path = os.path.join(runtime.gpu_lock_dir(), f"msamil-{key}.lock")
    other = os.open(path, os.O_RDWR)  # another job claims the free GPU
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    runtime.reclaim_gpus(released)
    assert "sharing it" in caplog.text and path not in runtime._claimed
    os.close(other)
    runtime.reclaim_gpus(released)  # free again: held by this process
    assert path in runtime._claimed
    runtime.release_gpus()
    os.unlink(path)
