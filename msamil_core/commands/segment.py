"""Segment lesions on one thumbnail with a trained UNet++: lesion_mask.png, thumbnail size, 0/255.

The thumbnail is resized to the checkpoint's input size, segmented, and the probabilities are
upsampled back; lesion is where the probability reaches --threshold, inside the tissue mask,
with small holes filled and specks removed. Any slide can be segmented, annotated or not.
Without --threshold/--min-object-fraction/--max-hole-fraction the values the checkpoint was
evaluated with are used.

With --reuse D (the workflow passes results/segmentation/probabilities), the probabilities that
`msamil segment-train --probabilities-dir D` stored for this slide are used when they were made
by this checkpoint file from this thumbnail (SHA-256 of both); the network, and torch with it, is
then not loaded at all. Otherwise the network runs.

With --fallback-below F, a slide whose lesion covers less than F of its tissue gets its tissue
mask as "lesion" mask instead (logged), so that patch selection never ends with an empty bag.

Example:
  msamil segment --checkpoint results/segmentation/checkpoint.pt \\
      --thumbnail results/slides/s1/thumbnail.png --tissue-mask results/slides/s1/tissue_mask.png \\
      --out results/slides/s1/lesion_mask.png
"""

from __future__ import annotations

import argparse

HELP = "thumbnail + tissue mask -> lesion_mask.png (UNet++)"


def add_postprocess_arguments(parser: argparse.ArgumentParser, from_checkpoint: bool) -> None:
    """--threshold, --min-object-fraction, --max-hole-fraction; with ``from_checkpoint`` they default to
    the checkpoint's values (None here)."""
    from ..lesionmask import PostProcess

    d = PostProcess()
    where = "the checkpoint's" if from_checkpoint else "%(default)s"
    g = parser.add_argument_group("lesion mask")
    g.add_argument(
        "--threshold",
        type=float,
        default=None if from_checkpoint else d.threshold,
        help=f"lesion where the probability is at least this (default {where})",
    )
    g.add_argument(
        "--min-object-fraction",
        type=float,
        default=None if from_checkpoint else d.min_object_fraction,
        help=f"drop lesion pieces smaller than this fraction of the thumbnail (default {where})",
    )
    g.add_argument(
        "--max-hole-fraction",
        type=float,
        default=None if from_checkpoint else d.max_hole_fraction,
        help=f"fill holes in lesions up to this fraction of the thumbnail (default {where})",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint from `msamil segment-train`")
    parser.add_argument("--thumbnail", required=True, help="thumbnail PNG (from `msamil thumbnail`)")
    parser.add_argument(
        "--tissue-mask", required=True, help="tissue mask PNG (from `msamil tissue`); lesion is kept inside it"
    )
    parser.add_argument("--slide-id", help="slide name used in messages (default: the thumbnail's folder name)")
    parser.add_argument("--out", required=True, help="lesion mask PNG to write (0/255, thumbnail size)")
    parser.add_argument("--probabilities", help="also write the lesion probability as a grey PNG (0..255)")
    parser.add_argument(
        "--fallback-below",
        type=float,
        default=0.0,
        metavar="F",
        help="write the tissue mask instead when lesion covers less than this fraction of the tissue "
        "(default 0: never)",
    )
    parser.add_argument(
        "--reuse",
        metavar="DIR",
        help="folder of `msamil segment-train --probabilities-dir`: use this slide's stored probabilities when "
        "this checkpoint made them from this thumbnail",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch; 0 = torch's default")
    add_postprocess_arguments(parser, from_checkpoint=True)


def run(args: argparse.Namespace) -> None:
    import logging
    from dataclasses import asdict
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from ..errors import MsamilError
    from ..fileio import atomic_path
    from ..lesionmask import PostProcess, postprocess, stored_probabilities
    from ..tissue import load_mask, save_mask

    log = logging.getLogger("msamil.segment")
    slide_id = args.slide_id or Path(args.thumbnail).parent.name
    if not Path(args.checkpoint).is_file():
        raise MsamilError(f"segmentation checkpoint {args.checkpoint}: file not found; train one with `msamil segment-train`")
    tissue = load_mask(args.tissue_mask)
    stored = stored_probabilities(args.reuse, slide_id, args.checkpoint, args.thumbnail) if args.reuse else None
    if stored is not None:
        prob, saved_post = stored
        log.info("%s: probabilities of this checkpoint and thumbnail from %s", slide_id, args.reuse)
    else:
        import torch

        from ..segmentation import load_segmentation_checkpoint, read_rgb, thumbnail_probabilities

        if args.threads > 0:
            torch.set_num_threads(args.threads)
        model, ckpt = load_segmentation_checkpoint(args.checkpoint, args.device)
        saved_post = ckpt.get("postprocess", {})
        prob = thumbnail_probabilities(model, ckpt, read_rgb(args.thumbnail, slide_id), args.device)
    if tissue.shape != prob.shape:  # probabilities have the thumbnail's size
        raise MsamilError(
            f"slide {slide_id!r}: tissue mask {args.tissue_mask} is {tissue.shape[1]} x {tissue.shape[0]} px, "
            f"the thumbnail {prob.shape[1]} x {prob.shape[0]}; rerun the tissue step of this slide"
        )
    saved = dict(asdict(PostProcess()), **saved_post)
    given = {
        "threshold": args.threshold,
        "min_object_fraction": args.min_object_fraction,
        "max_hole_fraction": args.max_hole_fraction,
    }
    post = PostProcess(**{k: (v if v is not None else saved[k]) for k, v in given.items()})
    mask = postprocess(prob, tissue, post)
    tissue_px = int(tissue.sum())
    fraction = float(mask.sum()) / tissue_px if tissue_px else 0.0
    log.info("%s: lesion %.1f %% of the tissue (threshold %.2f)", slide_id, 100 * fraction, post.threshold)
    if fraction < args.fallback_below:
        log.warning(
            "%s: lesion covers %.2f %% of the tissue, below --fallback-below %.2f %%; writing the tissue mask instead",
            slide_id,
            100 * fraction,
            100 * args.fallback_below,
        )
        mask = tissue
    if args.probabilities:
        with atomic_path(args.probabilities) as tmp:
            Image.fromarray(np.round(prob * 255).astype(np.uint8), mode="L").save(tmp, format="PNG")
    save_mask(args.out, mask)
