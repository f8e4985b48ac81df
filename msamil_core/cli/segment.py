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
  msamil segment --checkpoint results/segmentation/checkpoint.pt \
      --thumbnail results/slides/s1/thumbnail.png --tissue-mask results/slides/s1/tissue_mask.png \
      --out results/slides/s1/lesion_mask.png
"""

from __future__ import annotations

import argparse

from .options import add_settings, given

HELP = "thumbnail + tissue mask -> lesion_mask.png (UNet++)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint from `msamil segment-train`")
    parser.add_argument("--thumbnail", required=True, help="thumbnail PNG (from `msamil thumbnail`)")
    parser.add_argument("--tissue-mask", required=True,
                        help="tissue mask PNG (from `msamil tissue`); lesion is kept inside it")
    parser.add_argument("--slide-id", help="slide name used in messages (default: the thumbnail's folder name)")
    parser.add_argument("--out", required=True, help="lesion mask PNG to write (0/255, thumbnail size)")
    parser.add_argument("--probabilities", help="also write the lesion probability as a grey PNG (0..255)")
    parser.add_argument("--fallback-below", type=float, default=0.0, metavar="F",
                        help="write the tissue mask instead when lesion covers less than this fraction of the tissue "
                        "(default 0: never)")
    parser.add_argument("--reuse", metavar="DIR",
                        help="folder of `msamil segment-train --probabilities-dir`: use this slide's stored "
                        "probabilities when this checkpoint made them from this thumbnail")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch; 0 = torch's default")
    from ..settings import PostProcessSettings

    add_settings(parser.add_argument_group("lesion mask"), PostProcessSettings, defaults=False,
                 source="the checkpoint's (segment-train's settings)")


def run(args: argparse.Namespace) -> None:
    from ..pipeline import make_lesion_mask
    from ..settings import PostProcessSettings

    post = given(args, PostProcessSettings)  # what is not given: the checkpoint's
    make_lesion_mask(args.checkpoint, args.thumbnail, args.tissue_mask, args.out, args.slide_id, post, args.reuse,
                     args.fallback_below, args.probabilities, args.device, args.threads)
