"""Attention heatmaps of one fold's model on slides: by default the fold's test slides.

For each slide, <out-dir>/<slide>/ gets (all files or none):
  attention_<scale>.png   the thumbnail with each patch of that scale (20x, 10x, 5x) painted by
                          its attention, with a colour bar in attention units
  attention_combined.png  the attention of every scale summed at each point
  top_bottom.png          the --top-k patches with the highest and the lowest attention
  attention.geojson       one square per patch in level-0 px with `attention`, `attention x N`
                          (1 = uniform) [and `lesion fraction`] as measurements, for QuPath
                          (File > Import objects from file; Measure > Show measurement maps)
  attention.csv, slide.json  the same scores; the prediction and lesion figures
and <out-dir>/summary.csv (written last) has, per slide and scale, the mean `attention x N` of
the patches inside the annotated lesion (sheet column `annotation`; at least half of the patch
annotated) and outside it.

Thumbnails and meta.json come from --slides-dir (`msamil thumbnail`'s outputs), or are made
from the slide when missing there. Every registered model returns attention; a model that does
not fails with a message saying so.
"""

from __future__ import annotations

import argparse

HELP = "a fold's model + its test slides -> attention heatmaps (PNG), montage, QuPath GeoJSON"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", required=True, help="experiment folder holding fold<k>/checkpoint.pt")
    parser.add_argument("--fold", type=int, default=0, help="the fold whose model is drawn (default 0)")
    parser.add_argument("--features", required=True, help="feature folder of the bags (<slide_id>.pt)")
    parser.add_argument("--sheet", required=True,
                        help="slide sheet: slide paths, labels and `annotation` files (for the lesion figures)")
    parser.add_argument("--folds", help="folds.csv: draw the fold's test slides (those of the experiment's task)")
    parser.add_argument("--slide-ids", nargs="+", help="draw these slides instead of the fold's test slides")
    parser.add_argument("--slides-dir", default="results/slides",
                        help="folder of <slide>/thumbnail.png and meta.json (default results/slides)")
    parser.add_argument("--out-dir", required=True, help="folder to write <slide>/ folders and summary.csv into")
    parser.add_argument("--top-k", type=int, default=8, help="patches per row of the montage (default 8)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")


def draw_slide(att, row, meta_path, thumbnail_path, out_dir, mpp, top_k: int, title: str) -> dict:
    """Heatmaps of one slide (a sheet ``row``) into ``out_dir``; the thumbnail and meta.json are
    read from their files, or made from the slide (not written) when missing."""
    from pathlib import Path

    from ..annotations import annotation_mask, load_meta, meta_sizes
    from ..heatmap import write_slide_heatmaps
    from ..segmentation import read_rgb
    from ..slide import open_slide
    from .thumbnail import thumbnail_and_meta

    sid = att.slide_id
    if Path(meta_path).exists() and Path(thumbnail_path).exists():
        meta, thumb = load_meta(meta_path), read_rgb(thumbnail_path, sid)
    else:
        with open_slide(row["path"], sid, mpp) as slide:
            thumb, meta = thumbnail_and_meta(slide, 1024)
    lesion = None
    annotation = row.get("annotation", "")
    if isinstance(annotation, str) and annotation:
        level0, thumb_size = meta_sizes(meta)
        lesion = annotation_mask(annotation, sid, level0, thumb_size)
    return write_slide_heatmaps(out_dir, att, thumb, meta, row["path"], mpp, lesion, top_k, title)


def run(args: argparse.Namespace) -> None:
    import logging
    from pathlib import Path

    import pandas as pd
    import torch

    from ..bags import find_bag
    from ..errors import MsamilError
    from ..experiment import select_slides, task_classes
    from ..heatmap import write_summary
    from ..inference import load_fold_models, slide_attention
    from ..sheet import load_sheet, slide_mpp
    from ..splits import fold_parts, read_folds
    from ..train import resolve_device

    log = logging.getLogger("msamil.heatmap")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.folds and not args.slide_ids:
        raise MsamilError("give --folds (to draw the fold's test slides) or --slide-ids")
    device = resolve_device(args.device)
    (fold,) = load_fold_models(args.models, device, [args.fold])
    sheet = load_sheet(args.sheet)
    if args.slide_ids:
        unknown = [s for s in args.slide_ids if s not in sheet.index]
        if unknown:
            raise MsamilError(f"--slide-ids: {', '.join(map(repr, unknown))} not in the sheet {args.sheet}")
        slide_ids = list(args.slide_ids)
    else:
        task = (fold.checkpoint.get("config") or {}).get("task")
        _, mapping = task_classes(sheet, task, None if task else list(fold.checkpoint["classes"]))
        slide_ids, _ = select_slides(fold_parts(read_folds(args.folds), args.fold)["test"], sheet, mapping)
    name = Path(args.models).name
    out = Path(args.out_dir)
    infos = []
    for sid in slide_ids:
        row = sheet.loc[sid]
        try:
            att, _ = slide_attention([fold], find_bag(args.features, sid), sid, device)
            info = draw_slide(att, row, Path(args.slides_dir) / sid / "meta.json", Path(args.slides_dir) / sid / "thumbnail.png",
                              out / sid, slide_mpp(row), args.top_k, f"{name} fold {args.fold}")
        except MsamilError as exc:
            raise MsamilError(f"slide {sid!r} with {fold.path}: {exc}") from None
        infos.append(info)
        lesion = {r["scope"]: r for r in info["lesion"] or []}
        if "all" in lesion:
            r = lesion["all"]
            log.info("%s: %s; attention x N inside the lesion %.2f, outside %.2f", sid, info["predicted"],
                     r["mean_inside"], r["mean_outside"])
        else:
            log.info("%s: %s (no annotation)", sid, info["predicted"])
    write_summary(out / "summary.csv", infos, {s: sheet.loc[s, "label"] for s in slide_ids})
    if infos and any(i["lesion"] for i in infos):
        from ..heatmap import pooled_lesion_attention

        pooled = pooled_lesion_attention(pd.read_csv(out / "summary.csv", dtype={"slide_id": str}))
        log.info("%s fold %d, attention inside vs outside the lesions:\n%s", name, args.fold, pooled.to_string(index=False))
