"""The per-slide chain: slide -> thumbnail + meta.json -> tissue mask -> lesion mask -> patch
coordinates -> feature bags.

Each step is one function that reads its inputs from files and writes its outputs atomically.
The workflow's rules run them one job at a time (``msamil thumbnail``, ``tissue``, ``segment``,
``coords``, ``extract``), and ``msamil predict`` runs them in a row for each new slide
(:func:`prepare_slide`): both make the same files from the same settings.

Every file of the chain records the slide file it was made from: meta.json its ``source``
(:func:`~msamil_core.wsi.thumbnail.file_identity`), the coordinates files a ``slide_digest``
attribute, the bags a ``slide_digest`` key. Extraction refuses coordinates of another file, and
:func:`prepare_slide` reuses a file only when it was made from the very slide file it is given,
so a new slide listed under the id of a cohort slide gets its own thumbnail, coordinates and
features, never the cohort slide's.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import layout
from .errors import MsamilError
from .fileio import make_temp_dir, write_json
from .settings import STRATEGIES, FeatureSettings, PatchSettings, ThumbnailSettings, TissueSettings
from .wsi.geometry import SCALES

log = logging.getLogger(__name__)

#: The ``selection`` attribute each strategy's coordinates files carry.
SELECTION = {"lesion": "lesion", "tissue": "tissue", "random": "random tissue"}


@dataclass
class ExtractOptions:
    """How features are computed: the config's `features` (batch size, readers, stored
    precision) and the machine's device; not what they are (that is the encoder spec)."""

    features: FeatureSettings = field(default_factory=FeatureSettings)
    device: str = "auto"
    progress: bool = True

    def bags(self, slide_path: str | os.PathLike, coords_sets: list[list], spec, slide_id: str | None = None,
             mpp: float | None = None, digest: str | None = None, leave_out: bool = False) -> list:
        """One slide's patch sets encoded into one bag each (:func:`~msamil_core.features.extraction.bags_of`)
        by this process's extractor of these options (built once per process)."""
        from .features.extraction import bags_of, extractor_for

        return bags_of(extractor_for(spec, self.features, self.device), slide_path, coords_sets, slide_id, mpp,
                       digest, self.progress, leave_out=leave_out)


# ----------------------------------------------------------------------------- the steps


def make_thumbnail(slide_path: str | os.PathLike, thumbnail: str | os.PathLike, meta: str | os.PathLike,
                   slide_id: str | None = None, mpp: float | None = None,
                   settings: ThumbnailSettings | None = None) -> None:
    """Write a slide's thumbnail (PNG, long side ``settings.long_side`` px) and meta.json (last:
    it marks the pair complete)."""
    from .wsi.masks import save_rgb_png
    from .wsi.slide import open_slide
    from .wsi.thumbnail import thumbnail_and_meta

    with open_slide(slide_path, slide_id, mpp) as slide:
        rgb, info = thumbnail_and_meta(slide, (settings or ThumbnailSettings()).long_side)
    save_rgb_png(thumbnail, rgb)
    write_json(meta, info)


def make_tissue_mask(thumbnail: str | os.PathLike, out: str | os.PathLike, params: TissueSettings | None = None,
                     slide_id: str | None = None, meta: str | os.PathLike | None = None) -> np.ndarray:
    """Write the tissue mask of a thumbnail (PNG, 0/255); fails naming the slide when it has no tissue.

    The areas of the tissue settings are µm², read through the thumbnail's µm/px from ``meta``
    (default: the meta.json beside the thumbnail, when there is one).
    """
    from .wsi.masks import read_rgb, save_mask
    from .wsi.thumbnail import load_meta, meta_sizes, thumbnail_mpp
    from .wsi.tissue import slide_tissue_mask

    slide_id = slide_id or Path(thumbnail).parent.name
    rgb = read_rgb(thumbnail, slide_id)
    meta = Path(meta) if meta else Path(thumbnail).with_name(layout.META)
    mpp = None
    if meta.is_file():
        info = load_meta(meta)
        if meta_sizes(info)[1] != (rgb.shape[1], rgb.shape[0]):
            raise MsamilError(f"slide {slide_id!r}: {meta} describes a thumbnail of another size than {thumbnail}; "
                              "rerun the thumbnail step of this slide")
        mpp = thumbnail_mpp(info)
    if mpp is None:
        log.warning("%s: no µm/px for the thumbnail (no %s); tissue areas are fractions of the thumbnail",
                    slide_id, meta)
    mask = slide_tissue_mask(rgb, params or TissueSettings(), slide_id, mpp)
    save_mask(out, mask)
    return mask


def make_lesion_mask(checkpoint: str | os.PathLike, thumbnail: str | os.PathLike, tissue_mask: str | os.PathLike,
                     out: str | os.PathLike, slide_id: str | None = None, postprocess: dict | None = None,
                     reuse: str | os.PathLike | None = None, fallback_below: float = 0.0,
                     probabilities: str | os.PathLike | None = None, device: str = "cpu",
                     threads: int | None = None) -> np.ndarray:
    """Write the lesion mask of a thumbnail with a UNet++ checkpoint (PNG, 0/255, inside the tissue).

    ``postprocess`` overrides the checkpoint's threshold / min_object_fraction / max_hole_fraction
    (None values keep the checkpoint's). With ``reuse`` (a ``segment-train --probabilities-dir``)
    the stored probabilities are taken when this checkpoint file made them from this thumbnail,
    and torch is never imported (``threads`` sets torch's threads when the network runs). A
    lesion covering less than ``fallback_below`` of the tissue is
    replaced by the tissue mask. ``probabilities`` also writes the probability map as grey PNG.
    """
    from PIL import Image

    from .fileio import atomic_path
    from .segmentation.postprocess import postprocess as apply, stored_probabilities
    from .settings import PostProcessSettings
    from .wsi.masks import load_mask, read_rgb, save_mask

    slide_id = slide_id or Path(thumbnail).parent.name
    if not Path(checkpoint).is_file():
        raise MsamilError(f"segmentation checkpoint {checkpoint}: file not found; train one with `msamil segment-train`")
    tissue = load_mask(tissue_mask)
    stored = stored_probabilities(reuse, slide_id, checkpoint, thumbnail) if reuse else None
    if stored is not None:
        prob, saved = stored
        log.info("%s: probabilities of this checkpoint and thumbnail from %s", slide_id, reuse)
    else:
        from .runtime import set_threads
        from .segmentation.model import load_segmentation_checkpoint, thumbnail_probabilities

        set_threads(threads)
        model, ckpt = load_segmentation_checkpoint(checkpoint, device)
        saved = ckpt.get("postprocess", {})
        prob = thumbnail_probabilities(model, ckpt, read_rgb(thumbnail, slide_id), device)
    if tissue.shape != prob.shape:  # probabilities have the thumbnail's size
        raise MsamilError(
            f"slide {slide_id!r}: tissue mask {tissue_mask} is {tissue.shape[1]} x {tissue.shape[0]} px, the thumbnail "
            f"{prob.shape[1]} x {prob.shape[0]}; rerun the tissue step of this slide"
        )
    settings = {**PostProcessSettings().to_dict(), **saved,
                **{k: v for k, v in (postprocess or {}).items() if v is not None}}
    post = PostProcessSettings(**{k: settings[k] for k in PostProcessSettings.names()})
    mask = apply(prob, tissue, post)
    tissue_px = int(tissue.sum())
    fraction = float(mask.sum()) / tissue_px if tissue_px else 0.0
    log.info("%s: lesion %.1f %% of the tissue (threshold %.2f)", slide_id, 100 * fraction, post.threshold)
    if fraction < fallback_below:
        log.warning("%s: lesion covers %.2f %% of the tissue, below the fallback of %.2f %%; writing the tissue mask "
                    "instead", slide_id, 100 * fraction, 100 * fallback_below)
        mask = tissue
    if probabilities:
        with atomic_path(probabilities) as tmp:
            Image.fromarray(np.round(prob * 255).astype(np.uint8), mode="L").save(tmp, format="PNG")
    save_mask(out, mask)
    return mask


def select_grids(meta: dict, tissue: np.ndarray, lesion: np.ndarray | None, strategy: str,
                 settings: PatchSettings) -> dict:
    """The kept patches of one strategy, ``{"20x": Grid, "10x": Grid, "5x": Grid}``, attributes
    included (``selection``, and ``slide_digest`` from meta.json's source)."""
    from .wsi.coords import Grid, make_grids, sample_grids

    if strategy not in STRATEGIES:
        raise MsamilError(f"patch strategy {strategy!r}: not one of {', '.join(STRATEGIES)}")
    slide_id = meta["slide_id"]
    if strategy == "lesion":
        if lesion is None:
            raise MsamilError(f"slide {slide_id!r}: the lesion strategy needs a lesion mask")
        if lesion.shape != tissue.shape:
            raise MsamilError(f"slide {slide_id!r}: the lesion mask is {lesion.shape[1]}x{lesion.shape[0]} px but the "
                              f"tissue mask {tissue.shape[1]}x{tissue.shape[0]}; both must be at thumbnail size")
        mask = tissue & lesion
    else:
        mask = tissue
    grids = make_grids(mask, (meta["width"], meta["height"]), meta["mpp"], patch_size=settings.patch_size,
                       min_fraction=settings.min_fraction, base_mpp=settings.base_mpp, name=slide_id)
    if strategy == "random":
        grids = sample_grids(grids, settings.random_n, settings.random_seed, slide_id)
    digest = (meta.get("source") or {}).get("digest")
    extra = {"selection": SELECTION[strategy], **({"slide_digest": digest} if digest else {})}
    return {scale: Grid(g.coords, g.fractions, {**g.attrs, **extra}) for scale, g in grids.items()}


def make_coordinates(meta: str | os.PathLike, tissue_mask: str | os.PathLike, outputs: dict[str, dict[str, str]],
                     settings: PatchSettings, lesion_mask: str | os.PathLike | None = None,
                     geojson: str | os.PathLike | None = None, geojson_strategy: str | None = None) -> None:
    """Write the 20x/10x/5x coordinates files of one or more strategies: ``outputs`` maps a
    strategy to ``{scale: HDF5 path}`` with all three scales. Every grid is made before the first
    file is written. With ``geojson``, the masks and the grids of ``geojson_strategy`` (default:
    the first of ``outputs``) are then exported for QuPath (:func:`~msamil_core.wsi.geojson.export_slide`)."""
    from .wsi.coords import write_coords
    from .wsi.masks import load_mask
    from .wsi.thumbnail import load_meta

    info = load_meta(meta)
    for strategy, files in outputs.items():
        missing = [s for s in SCALES if s not in files]
        if missing or len(files) != len(SCALES):
            raise MsamilError(f"strategy {strategy!r}: give one output for each of {', '.join(SCALES)} "
                              f"(missing: {', '.join(missing) or 'none'}; got {', '.join(files)})")
    drawn = geojson_strategy or next(iter(outputs), None)
    if geojson and drawn not in outputs:
        raise MsamilError(f"--geojson-strategy {drawn}: no coordinates of that strategy are written here "
                          f"(strategies: {', '.join(outputs) or 'none'})")
    tissue = load_mask(tissue_mask)
    lesion = load_mask(lesion_mask) if lesion_mask else None
    written = {strategy: select_grids(info, tissue, lesion, strategy, settings) for strategy in outputs}
    for strategy, grids in written.items():
        for scale, grid in grids.items():
            write_coords(outputs[strategy][scale], grid.coords, grid.attrs)
            log.info("%s %s (%s): %d patches of %d level-0 px", info["slide_id"], scale, strategy, len(grid.coords),
                     grid.attrs["patch_size_level0"])
    if geojson:
        from .wsi.geojson import export_slide

        export_slide(meta, geojson, lesion_mask=lesion_mask, tissue_mask=tissue_mask,
                     coords=[outputs[drawn][scale] for scale in SCALES])


def make_bags(slide_path: str | os.PathLike, bags: dict[str, tuple[list[str], str]], spec,
              slide_id: str | None = None, mpp: float | None = None, options: ExtractOptions | None = None,
              leave_out: bool = False) -> list:
    """Encode one slide's patch sets into bags: ``bags`` maps a name to (coordinates files, bag
    path). Patches the sets share are read and encoded once; every bag is computed before the
    first is written (each atomically). ``leave_out``: see
    :func:`~msamil_core.features.extraction.bags_of`."""
    from .features.bags import save_bag

    options = options or ExtractOptions()
    outs = [out for _, out in bags.values()]
    made = options.bags(slide_path, [list(coords) for coords, _ in bags.values()], spec, slide_id, mpp,
                        leave_out=leave_out)
    for out, bag in zip(outs, made):
        save_bag(out, bag)
    return made


# ----------------------------------------------------------------------------- the chain for a new slide


@dataclass
class SlideSettings:
    """Everything the chain needs besides the slide: the settings the experiment was trained with
    (its manifest's), and how to compute (``extract``)."""

    encoder: object  # features.encoders.EncoderSpec
    thumbnail: ThumbnailSettings = field(default_factory=ThumbnailSettings)
    tissue: TissueSettings = field(default_factory=TissueSettings)
    patches: PatchSettings = field(default_factory=PatchSettings)
    segmentation_checkpoint: str | None = None  # the lesion model of the lesion strategy
    extract: ExtractOptions = field(default_factory=ExtractOptions)

    def __post_init__(self):
        self.strategy = self.patches.resolved_strategy(bool(self.segmentation_checkpoint))
        if self.strategy == "lesion" and not self.segmentation_checkpoint:
            raise MsamilError("the lesion patch strategy needs the lesion model (a segmentation checkpoint)")


@dataclass
class SlideFiles:
    """Where one slide's per-slide files live: the workflow's layout under a results folder."""

    slide_id: str
    thumbnail: Path
    meta: Path
    tissue: Path
    lesion: Path
    coords: dict[str, Path]
    bag: Path

    @classmethod
    def under(cls, results: str | os.PathLike, slide_id: str, feature_dir: str | os.PathLike | None = None,
              coords_dir: str | os.PathLike | None = None) -> "SlideFiles":
        """A slide's files in the results layout (:mod:`msamil_core.layout`) under ``results``:
        its slide folder, its coordinates in ``coords_dir`` (default ``results/coords``) and its
        bag in ``feature_dir`` (default ``results/features``)."""
        results = str(results)
        coords_dir = str(coords_dir) if coords_dir else f"{results}/coords"
        bag = Path(feature_dir) / f"{slide_id}.pt" if feature_dir else Path(results) / "features" / f"{slide_id}.pt"
        files = [Path(layout.slide_file(slide_id, name, results))
                 for name in (layout.THUMBNAIL, layout.META, layout.TISSUE_MASK, layout.LESION_MASK)]
        return cls(slide_id, *files, {s: Path(layout.scale_file(coords_dir, s, slide_id)) for s in SCALES}, bag)


class _Staging:
    """Files for their final paths, written under a temporary folder and moved in by commit()."""

    def __init__(self, root: Path):
        self.dir = make_temp_dir(root, "staging")
        self.files: dict[Path, Path] = {}

    def path(self, target: Path) -> Path:
        tmp = self.dir / str(len(self.files)) / target.name
        tmp.parent.mkdir()
        self.files[target] = tmp
        return tmp

    def commit(self) -> None:
        for target, tmp in self.files.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def check_encoder(expected: str, found: str, model_where: str, found_where: str) -> None:
    """Fail unless the encoder of the model (``expected``) is the one of the features (``found``)."""
    if expected and found and expected != found:
        raise MsamilError(
            f"encoder mismatch: {model_where} was trained on features of encoder {expected!r}, but {found_where} "
            f"{'is' if found_where.startswith('the encoder') else 'comes from'} {found!r}; use the encoder settings "
            "(config `encoders` entry) the experiment was trained with, or another checkpoint"
        )


def _reusable_coords(files: SlideFiles, digest: str, settings: SlideSettings) -> bool:
    """Whether all three coordinates files exist, were made from this slide file and with these settings."""
    from .wsi.coords import read_coords

    wanted = {"slide_digest": digest, "patch_size": settings.patches.patch_size,
              "min_mask_fraction": settings.patches.min_fraction, "selection": SELECTION[settings.strategy]}
    if settings.strategy == "random":
        wanted["random_seed"] = settings.patches.random_seed
    for path in files.coords.values():
        try:
            attrs = read_coords(path)[1]
        except MsamilError:  # missing or unreadable
            return False
        if any(attrs.get(k) != v for k, v in wanted.items()):
            return False
    return True


def _reusable_slide_dir(files: SlideFiles, identity: dict, needs_lesion: bool) -> bool:
    """Whether a slide folder's meta.json was made from the slide file of ``identity``
    (:func:`~msamil_core.wsi.thumbnail.file_identity`) and the masks are there."""
    from .wsi.thumbnail import load_meta, same_file

    if not (files.meta.is_file() and files.thumbnail.is_file() and files.tissue.is_file()):
        return False
    if needs_lesion and not files.lesion.is_file():
        return False
    try:
        return same_file(load_meta(files.meta).get("source"), identity)
    except MsamilError:
        return False


def slide_folder(slide_path: str | os.PathLike, places: list[SlideFiles]) -> SlideFiles | None:
    """The first of ``places`` whose slide folder (meta.json, thumbnail, tissue mask) was made from
    the file ``slide_path``; None when none was."""
    from .wsi.thumbnail import file_identity

    identity = file_identity(slide_path)
    return next((f for f in places if _reusable_slide_dir(f, identity, needs_lesion=False)), None)


def prepare_slide(slide_path: str | os.PathLike, slide_id: str, mpp: float | None, settings: SlideSettings,
                  out: SlideFiles, reuse: list[SlideFiles] = (), encoder: str = "") -> Path:
    """Run the chain for one slide up to its feature bag; returns the bag's path.

    A file is reused, from ``out`` or else from the ``reuse`` locations (read only), when it was
    made from this slide file (and, for coordinates and bags, with these settings and the encoder
    ``encoder``); whatever is missing is computed into ``out``, staged, and moved into place only
    when the slide's bag is complete, so a slide that fails leaves no file behind.
    """
    from .features.bags import load_bag, save_bag
    from .features.encoders import encoder_id
    from .wsi.thumbnail import file_identity

    if not Path(slide_path).is_file():
        raise MsamilError(f"slide {slide_id!r}: file not found: {slide_path}; fix its `path` in the slide sheet")
    identity = file_identity(slide_path)  # read once: every reuse check and the extraction compare to it
    digest = identity["digest"]
    wanted = encoder or encoder_id(settings.encoder)
    places = [out, *reuse]
    for files in places:
        if files.bag.is_file():
            bag = load_bag(files.bag)
            if bag.slide_digest == digest:
                check_encoder(wanted, bag.encoder, "the model", f"the existing bag {files.bag}")
                log.info("%s: reusing %s", slide_id, files.bag)
                return files.bag
    stage = _Staging(out.bag.parent)
    try:
        coords = next((f.coords for f in places if _reusable_coords(f, digest, settings)), None)
        if coords is not None:
            log.info("%s: reusing the coordinates %s", slide_id, coords["20x"])
        else:
            coords = _stage_coordinates(slide_path, slide_id, mpp, settings, out, places, stage, identity)
        bag = settings.extract.bags(slide_path, [list(coords.values())], settings.encoder, slide_id, mpp, digest)[0]
        check_encoder(wanted, bag.encoder, "the model", "the encoder given")
        if len(bag) == 0:
            raise MsamilError(f"slide {slide_id!r}: no patch passes the selection mask, so there is nothing to classify")
        save_bag(stage.path(out.bag), bag)
        stage.commit()
    finally:
        stage.close()
    return out.bag


def _stage_coordinates(slide_path, slide_id: str, mpp, settings: SlideSettings, out: SlideFiles,
                       places: list[SlideFiles], stage: _Staging, identity: dict) -> dict[str, Path]:
    """Coordinates of the chain's strategy, staged for ``out``; the slide folder's files (thumbnail,
    meta.json, masks) are reused from a place that made them from this slide, or staged too."""
    from .wsi.coords import write_coords
    from .wsi.masks import load_mask
    from .wsi.thumbnail import load_meta

    needs_lesion = settings.strategy == "lesion"
    folder = next((f for f in places if _reusable_slide_dir(f, identity, needs_lesion)), None)
    if folder is not None:
        log.info("%s: reusing %s", slide_id, folder.meta.parent)
        meta_path, tissue_path, lesion_path = folder.meta, folder.tissue, folder.lesion
    else:
        thumb, meta_path = stage.path(out.thumbnail), stage.path(out.meta)
        make_thumbnail(slide_path, thumb, meta_path, slide_id, mpp, settings.thumbnail)
        tissue_path = stage.path(out.tissue)
        make_tissue_mask(thumb, tissue_path, settings.tissue, slide_id, meta_path)
        lesion_path = None
        if needs_lesion:
            lesion_path = stage.path(out.lesion)
            make_lesion_mask(settings.segmentation_checkpoint, thumb, tissue_path, lesion_path, slide_id)
    grids = select_grids(load_meta(meta_path), load_mask(tissue_path),
                         load_mask(lesion_path) if needs_lesion else None, settings.strategy, settings.patches)
    coords = {}
    for scale, grid in grids.items():
        coords[scale] = stage.path(out.coords[scale])
        write_coords(coords[scale], grid.coords, grid.attrs)
    return coords
