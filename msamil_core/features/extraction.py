"""Feature extraction: one slide's patches at 20x, 10x and 5x -> one feature bag.

The patches of every scale come from their coordinates files (the scale of a file is its
``target_magnification`` attribute, never its position on the command line). Each patch spans
``patch_size_level0`` level-0 px and is read from the best pyramid level, resized to the
encoder's input size and encoded; the bag lists 20x patches first, then 10x, then 5x, each in
its file's order.

An :class:`Extractor` holds one encoder on its device and encodes the patches of any number of
slides: the encoder is built once, not per slide (a feature server keeps one alive between the
workflow's per-slide jobs, :mod:`msamil_core.feature_server`). Reading overlaps encoding: reader processes
(DataLoader workers) decode patches while the model runs, and the next slide's first batches are
read while one slide ends. Each reader takes a contiguous band of the slide's batches, so that
the tiles neighbouring patches share are decoded once (the slide reader caches decoded tiles).

On the CPU, readers resize patches to the input size and batches are uint8; on a GPU they travel
at the size they were read in pinned memory, are copied ``non_blocking`` and resized and
normalised on the device, in bf16 autocast; with ``gpu_decode`` the JPEG tiles themselves are
decoded there. Every batch holds the same patches whatever the number of readers, so a CPU rerun
gives bit-identical features.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import MsamilError, SlideDataError
from ..runtime import autocast, resolve_device
from ..settings import FeatureSettings
from ..wsi.coords import PatchTable, read_patch_table, union_table
from ..wsi.slide import Slide, open_slide
from ..wsi.thumbnail import file_identity
from .bags import Bag
from .encoders import EncoderSpec, PatchEncoder, build_encoder, encoder_id, weights_file

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """Extraction stopped because whoever asked for it is gone."""


def batch_order(n_batches: int, readers: int) -> list[int]:
    """The order in which ``readers`` round-robin readers are handed ``n_batches`` batches so that
    each reads one contiguous band of them (position ``i`` goes to reader ``i % readers``, as a
    DataLoader deals them): neighbouring patches, and the tiles they share, stay with one reader."""
    if readers <= 1:
        return list(range(n_batches))
    base, extra = divmod(n_batches, readers)
    sizes = [base + (w < extra) for w in range(readers)]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return [int(starts[w]) + k for k in range(max(sizes, default=0)) for w in range(readers) if k < sizes[w]]


class PatchDataset(Dataset):
    """Batches of the patches of a :class:`PatchTable`: item ``i`` is batch ``order[i]``, as
    ``(batch index, patches)``.

    Patches are uint8 RGB: resized to ``out_size`` ([B, S, S, 3]) by default; with
    ``device_resize``, as read ([n, s, s, 3] per read size s, with each group's rows in the batch),
    for the device to resize. The slide opens lazily in whichever process reads first, so each
    DataLoader worker gets its own OpenSlide handle; pickling the dataset never carries a handle.
    """

    def __init__(self, slide_path: str | os.PathLike, table: PatchTable, out_size: int, slide_id: str, mpp: float,
                 batch_size: int = 64, readers: int = 0, device_resize: bool = False):
        self.slide_path = str(slide_path)
        self.table = table
        self.out_size = int(out_size)
        self.slide_id = slide_id
        self.mpp = float(mpp)
        self.batch_size = int(batch_size)
        self.device_resize = device_resize
        self.n_batches = -(-len(table) // self.batch_size)
        self.order = batch_order(self.n_batches, readers)
        self._slide: Slide | None = None

    def __len__(self) -> int:
        return self.n_batches

    @property
    def slide(self) -> Slide:
        if self._slide is None:
            self._slide = open_slide(self.slide_path, self.slide_id, self.mpp)
        return self._slide

    def rows(self, batch: int) -> range:
        return range(batch * self.batch_size, min(len(self.table), (batch + 1) * self.batch_size))

    def __getitem__(self, index: int):
        batch = self.order[index]
        rows = self.rows(batch)
        if not self.device_resize:
            return batch, torch.stack([self.read(i) for i in rows])
        groups: dict[int, list] = {}
        for j, i in enumerate(rows):
            region = self.read(i, resize=False)
            groups.setdefault(region.shape[0], []).append((j, region))
        return batch, [(torch.tensor([j for j, _ in items]), torch.stack([r for _, r in items]))
                       for items in groups.values()]

    def read(self, row: int, resize: bool = True) -> torch.Tensor:
        """Patch ``row`` as uint8 [S, S, 3]: at ``out_size``, or with ``resize=False`` as read
        from its pyramid level."""
        x, y = self.table.coords[row]
        size = int(self.table.patch_size_level0[row])
        if resize:
            patch = self.slide.read_patch(int(x), int(y), size, self.out_size)
        else:
            choice = self.slide.best_level(size, self.out_size)
            patch = self.slide.read_region(int(x), int(y), choice.level, (choice.size, choice.size))
        # PIL hands back read-only arrays; torch wants a writable, contiguous buffer.
        return torch.from_numpy(np.require(patch, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"]))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_slide"] = None
        return state

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None


def _worker_init(_: int) -> None:
    # Decoding is single-threaded; extra intra-op threads in workers would only fight the model.
    torch.set_num_threads(1)


def _one_line(exc: MsamilError) -> MsamilError:
    """A worker's MsamilError arrives wrapped in its traceback (as its own class): the same error
    with the original message."""
    text = str(exc).strip()
    if "Traceback" in text:
        text = text.splitlines()[-1].split(f"{type(exc).__name__}: ", 1)[-1]
    return type(exc)(text)


def _items(dataset: PatchDataset, readers: int, device: torch.device) -> Iterator:
    """The dataset's items in order: read by ``readers`` processes (started now, so that they
    read ahead while the caller is busy), or by this process when it reaches each item."""
    if readers == 0:
        return (dataset[i] for i in range(len(dataset)))
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=min(readers, len(dataset)),
                        pin_memory=device.type == "cuda", prefetch_factor=4, worker_init_fn=_worker_init)
    return iter(loader)


def prepare_encoder(encoder: PatchEncoder, device: torch.device) -> PatchEncoder:
    """Move to ``device`` in eval mode with channels_last weights: convolutions run faster so on
    CUDA and on the CPU too (oneDNN; EfficientNet-B3 at 224 px ~1.4x on this project's CPU)."""
    return encoder.eval().to(device).to(memory_format=torch.channels_last)


def to_model_input(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> uint8 [B, 3, S, S] on ``device``, channels_last.

    The permuted view of the loader's HWC batch already has channels_last strides: no copy.
    """
    return batch.to(device, non_blocking=True).permute(0, 3, 1, 2)


def resize_on_device(groups: list[tuple[torch.Tensor, torch.Tensor]], n: int, size: int,
                     device: torch.device) -> torch.Tensor:
    """Patches read at their level's size (groups of rows and uint8 [m, s, s, 3]) -> uint8
    [n, 3, size, size] on ``device``, channels_last: resized there in Pillow's integer arithmetic
    (:func:`~msamil_core.wsi.device_decode.resize_like_pillow`), so the pixels are those the
    CPU path's readers make."""
    from ..wsi.device_decode import resize_like_pillow

    out = torch.empty(n, 3, size, size, dtype=torch.uint8, device=device).contiguous(
        memory_format=torch.channels_last)
    for rows, patches in groups:
        x = patches.to(device, non_blocking=True).permute(0, 3, 1, 2)
        out[rows.to(device)] = resize_like_pillow(x, size)
    return out


@dataclass
class PatchJob:
    """The patches of one slide to encode."""

    slide_path: str
    table: PatchTable
    slide_id: str
    mpp: float


class Extractor:
    """One encoder on its device, built once, encoding the patches of any number of slides.

    Args:
        spec: the encoder.
        features: batch size, readers (``workers``: a number or ``auto``), stored precision,
            ``gpu_decode``.
        device: ``auto`` (a free GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        threads: the job's threads (``auto`` readers follow them); default torch's.
    """

    def __init__(self, spec: EncoderSpec, features: FeatureSettings | None = None, device: str = "auto",
                 threads: int | None = None):
        self.spec = spec
        self.features = features or FeatureSettings()
        self.device = resolve_device(device)
        self.threads = int(threads or torch.get_num_threads())
        self.readers = self.features.reader_processes(self.device.type, self.threads)
        # build_encoder seeds the random initialisation and inference draws no random numbers, so
        # a CPU rerun gives identical features (same batch size and threads); on CUDA, bf16
        # autocast makes them equal to bf16 precision.
        encoder, self.dim = build_encoder(spec)
        self.encoder = prepare_encoder(encoder, self.device)
        self.encoder_id = encoder_id(spec)  # hashes the weights file: once
        self.store_dtype = torch.float16 if self.features.fp16 else torch.float32
        self.device_resize = self.device.type == "cuda"
        log.info("encoder %s on %s: %d-d features, %d reader process(es), batches of %d", self.encoder_id,
                 self.device, self.dim, self.readers, self.features.batch_size)

    def dataset(self, job: PatchJob) -> PatchDataset:
        return PatchDataset(job.slide_path, job.table, self.spec.input_size, job.slide_id, job.mpp,
                            self.features.batch_size, self.readers, self.device_resize)

    def encode(self, jobs: Iterable[PatchJob], progress: bool = True,
               stop: Callable[[], bool] | None = None) -> Iterator[torch.Tensor]:
        """Features [N, D] (on the CPU, in the stored precision) of each job, in order.

        The next job's readers start when a job starts, so its first batches are read while this
        one ends. ``stop`` is asked before each batch; when it says True, :class:`Cancelled` is
        raised.
        """
        jobs = iter(jobs)
        upcoming = self._start(next(jobs, None))
        while upcoming is not None:
            job, dataset, items = upcoming
            upcoming = self._start(next(jobs, None))
            try:
                features = self._encode_one(job, dataset, items, progress, stop)
            finally:
                dataset.close()
                del items  # stops this job's readers now rather than at interpreter exit
            yield features

    def _start(self, job: PatchJob | None):
        if job is None:
            return None
        dataset = self.dataset(job)
        if self.features.gpu_decode and self.device.type == "cuda" and len(job.table):
            from ..wsi.device_decode import supports_device_decode

            if supports_device_decode(dataset.slide, self.device):
                return job, dataset, self._device_decoded(dataset)
            log.info("slide %r: its tiles cannot be decoded on the GPU; decoding them on the CPU", job.slide_id)
        return job, dataset, _items(dataset, self.readers, self.device) if len(job.table) else iter(())

    def _device_decoded(self, dataset: PatchDataset) -> Iterator:
        """Batches whose JPEG tiles are decoded on the device, each distinct tile once."""
        from ..wsi.device_decode import read_patches

        table = dataset.table
        for batch in range(len(dataset)):
            rows = dataset.rows(batch)
            yield batch, read_patches(dataset.slide, table.coords[rows.start:rows.stop],
                                      table.patch_size_level0[rows.start:rows.stop], dataset.out_size, self.device)

    @torch.inference_mode()
    def _encode_one(self, job: PatchJob, dataset: PatchDataset, items: Iterator, progress: bool,
                    stop: Callable[[], bool] | None) -> torch.Tensor:
        from tqdm import tqdm

        n = len(job.table)
        out = torch.empty(n, self.dim, dtype=self.store_dtype)
        interactive = sys.stderr.isatty()
        bar = tqdm(total=n, unit="patch", desc=job.slide_id, disable=not progress,
                   mininterval=0.5 if interactive else 30.0,  # log files get a line every 30 s, not a flood
                   dynamic_ncols=interactive)
        done = 0
        try:
            with bar, autocast(self.device, bf16=True):
                for batch, patches in items:
                    if stop is not None and stop():
                        raise Cancelled(f"slide {job.slide_id!r}: extraction cancelled")
                    rows = dataset.rows(batch)
                    features = self.encoder(self._model_input(patches, len(rows)))
                    out[rows.start:rows.stop] = features.float().to("cpu", self.store_dtype)
                    done += len(rows)
                    bar.update(len(rows))
        except MsamilError as exc:  # raised in a reader: strip the reader's traceback
            raise _one_line(exc) from None
        if done != n:
            raise RuntimeError(f"encoded {done} of {n} patches")
        return out

    def _model_input(self, patches, n: int) -> torch.Tensor:
        """uint8 [n, 3, S, S] on the device (the encoder normalises it there)."""
        if isinstance(patches, list):  # groups at their read size
            return resize_on_device(patches, n, self.spec.input_size, self.device)
        return to_model_input(patches, self.device)  # already there when decoded on the device

    def close(self) -> None:
        """Free the model's memory (a GPU's too)."""
        self.encoder = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def patch_job(slide_path: str | os.PathLike, coords_sets: list[list[str | os.PathLike]], slide_id: str | None = None,
              mpp: float | None = None, digest: str | None = None) -> tuple[PatchJob, list[PatchTable], list[np.ndarray], str]:
    """The union of a slide's patch sets, checked against the slide: (job, each set's table, each
    set's rows in the union, the slide file's digest)."""
    with open_slide(slide_path, slide_id, mpp) as slide:  # validates the slide before any work
        digest = digest or file_identity(slide_path)["digest"]
        tables = [read_patch_table(paths, slide, digest) for paths in coords_sets]
        slide_id, slide_mpp = slide.slide_id, slide.mpp
    union, positions = union_table(tables)
    return PatchJob(str(slide_path), union, slide_id, slide_mpp), tables, positions, digest


def make_bag_objects(extractor: Extractor, job: PatchJob, features: torch.Tensor, tables: list[PatchTable],
                     positions: list[np.ndarray], coords_sets: list, digest: str) -> list[Bag]:
    """One bag per patch set from the union's features."""
    bags = []
    for table, rows, paths in zip(tables, positions, coords_sets):
        if len(tables) > 1:
            log.info("slide %r: %d of the %d patches -> bag of %s", job.slide_id, len(table), len(job.table),
                     ", ".join(map(str, paths)))  # fmt: skip
        bags.append(Bag(
            features=features[torch.from_numpy(rows)],
            coords=torch.from_numpy(table.coords),
            scales=torch.from_numpy(table.scales),
            patch_size_level0=torch.from_numpy(table.patch_size_level0),
            slide_id=job.slide_id,
            encoder=extractor.encoder_id,
            patches_encoded=len(job.table) if len(tables) > 1 else None,
            slide_digest=digest,
        ))  # fmt: skip
    return bags


def bags_of(extractor: Extractor, slide_path: str | os.PathLike, coords_sets: list[list[str | os.PathLike]],
            slide_id: str | None = None, mpp: float | None = None, digest: str | None = None,
            progress: bool = True, stop: Callable[[], bool] | None = None, leave_out: bool = False) -> list[Bag]:
    """Encode one slide's patch sets (e.g. the lesion, tissue and random patches, each its
    coordinates files, one per scale) with ``extractor`` into one bag each, reading and encoding
    every patch they share once. ``mpp`` overrides the file's µm/px (the sheet's column);
    ``digest`` is the slide file's when the caller has it; ``stop`` cancels (:meth:`Extractor.encode`).

    Returns one bag per set: features [N, D] (float32, or float16 with ``fp16``), coords int64
    [N, 2], scales int64 [N], patch_size_level0 int64 [N], rows in the set's own order (20x, then
    10x, then 5x); N = 0 gives features [0, D]. With several sets each bag records the union's
    size as ``patches_encoded``. With ``leave_out``, a slide whose tiles fail to decode
    (:class:`~msamil_core.errors.SlideDataError`) gets empty bags that say why (``left_out``)
    instead of failing: the workflow's cohort steps then leave it out.
    """
    started = time.perf_counter()
    job, tables, positions, digest = patch_job(slide_path, coords_sets, slide_id, mpp, digest)
    if len(job.table) == 0:
        log.warning("slide %r: no patches in %s; writing empty [0, %d] bags", job.slide_id, coords_sets, extractor.dim)
    try:
        features = next(extractor.encode([job], progress, stop))
    except SlideDataError as exc:
        if not leave_out:
            raise
        log.warning("%s -- left out: its bags are written empty, with this reason", exc)
        return left_out_bags(extractor, job.slide_id, len(coords_sets), str(exc), digest)
    elapsed = time.perf_counter() - started
    counts = ", ".join(f"{name}: {n}" for name, n in job.table.counts().items())
    log.info("slide %r: %d patches (%s) -> [%d, %d] features in %.1f s (%.1f patches/s)", job.slide_id,
             len(job.table), counts, len(job.table), extractor.dim, elapsed, len(job.table) / max(elapsed, 1e-9))
    return make_bag_objects(extractor, job, features, tables, positions, coords_sets, digest)


def left_out_bags(extractor: Extractor, slide_id: str, n: int, reason: str, digest: str | None) -> list[Bag]:
    """``n`` empty bags of a slide that could not be encoded, each recording ``reason``."""
    empty = torch.empty(0, dtype=torch.int64)
    return [Bag(features=torch.empty(0, extractor.dim, dtype=extractor.store_dtype), coords=empty.view(0, 2),
                scales=empty, patch_size_level0=empty, slide_id=slide_id, encoder=extractor.encoder_id,
                slide_digest=digest, left_out=reason) for _ in range(n)]


_extractors: dict[tuple, Extractor] = {}


def file_signature(path: str | os.PathLike | None) -> tuple | None:
    """(path, size, mtime) of a weights file: what tells a loaded model from new weights written to
    the same file (None: no file)."""
    if path is None:
        return None
    stat = os.stat(path)
    return str(path), stat.st_size, stat.st_mtime_ns


def extractor_for(spec: EncoderSpec, features: FeatureSettings, device: str = "auto",
                  threads: int | None = None) -> Extractor:
    """The extractor of these settings, built once per process: a process that extracts many
    slides (``msamil predict``, a feature server) loads the encoder once. One is kept at a time."""
    key = (repr(spec), repr(features), device, threads or torch.get_num_threads(),
           file_signature(weights_file(spec)))  # new weights in the same file: a new model
    if key not in _extractors:
        for old in _extractors.values():
            old.close()
        _extractors.clear()
        _extractors[key] = Extractor(spec, features, device, threads)
    return _extractors[key]
