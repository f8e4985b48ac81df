"""Patch features of one slide at 20x, 10x and 5x: coordinates -> one feature bag (.pt).

Reads every patch listed in the coordinates files (one per scale; a file's scale is its
`target_magnification` attribute, so their order does not matter), resizes it to --input-size
px, encodes it and writes the bag: features [N, D], coords [N, 2] (level-0 top-left), scales [N]
(0 = 20x, 1 = 10x, 2 = 5x), patch_size_level0 [N], slide_id and encoder ("<name>-<hash>").

Several bags from one pass: give --coords and --out once per bag (the i-th --out gets the i-th
--coords). Patches the sets share (lesion and random patches are tissue patches) are read and
encoded once; each bag keeps its own rows and records the pass's patch count
(`patches_encoded`). The workflow writes the bags of all patch-selection strategies so.

With --encoder-checkpoint (an `msamil e2e` checkpoint) the encoder is the tuned one, built as it
was trained; the other encoder options are then ignored.

Encoders: `msfem` (MsaMIL-Net: EfficientNet-B3 feature map + Transformer, 512-d) or any timm
model by name (resnet50, efficientnet_b3, vit_base_patch16_224, ...). Nothing is downloaded:
weights come from a local file (--weights: .safetensors, .bin, .pth; a timm or Hugging Face
state dict); without one the encoder is randomly initialised (--seed) and a warning says so.

Examples:
  msamil extract --slide s1.svs --coords coords/20x/s1.h5 coords/10x/s1.h5 coords/5x/s1.h5 \\
      --out features/msfem/s1.pt --encoder msfem --input-size 512 \\
      --encoder-arg backbone_weights=efficientnet_b3.safetensors
  msamil extract --slide s1.svs --coords coords/{20x,10x,5x}/s1.h5 --out lesion/s1.pt \\
      --coords coords/tissue/{20x,10x,5x}/s1.h5 --out tissue/s1.pt --encoder resnet18
  msamil extract --slide s1.svs --coords coords/20x/s1.h5 --out s1.pt \\
      --encoder vit_large_patch16_224 --encoder-arg init_values=1e-5 --weights uni.bin
"""

from __future__ import annotations

import argparse
import json

HELP = "coords/{20x,10x,5x}/<slide>.h5 -> features/<encoder>/<slide>.pt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("input and output")
    io.add_argument("--slide", required=True, help="the slide file (anything OpenSlide opens)")
    io.add_argument("--slide-id", help="slide id stored in the bag (default: the slide file's stem)")
    io.add_argument("--mpp", type=float, help="level-0 µm/px, overriding the file's (the sheet's `mpp` column)")
    io.add_argument(
        "--coords",
        nargs="+",
        action="append",
        required=True,
        metavar="H5",
        help="coordinates HDF5 files, one per scale, in any order (scale read from target_magnification); "
        "repeat it with --out for more bags from one pass",
    )
    io.add_argument("--out", action="append", required=True, help="feature bag to write (.pt); one per --coords")

    add_encoder_arguments(parser)

    add_runtime_arguments(parser)


def add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    """The encoder options (the config's `encoders` entries), shared with `msamil predict`."""
    enc = parser.add_argument_group("encoder")
    enc.add_argument(
        "--encoder-checkpoint",
        help="an e2e checkpoint (results/e2e/<name>/fold<k>/checkpoint.pt): its tuned encoder, with the name, "
        "input size, normalisation and options it was trained with; replaces the other encoder options",
    )
    enc.add_argument("--encoder", default="msfem", help="msfem or a timm model name (default msfem)")
    enc.add_argument("--weights", help="local weights file (.safetensors, .bin, .pth); default: random init")
    enc.add_argument(
        "--input-size", type=int, default=224, help="patch side fed to the encoder, px (paper: 512; default 224)"
    )
    rgb = ("R", "G", "B")
    enc.add_argument("--mean", type=float, nargs=3, metavar=rgb, help="normalisation mean (default ImageNet)")
    enc.add_argument("--std", type=float, nargs=3, metavar=rgb, help="normalisation std (default ImageNet)")
    enc.add_argument(
        "--encoder-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="encoder option, repeatable; VALUE is read as JSON when it parses (msfem: depth=2 heads=8 dim=512 "
        "backbone=efficientnet_b3 backbone_weights=FILE; timm: e.g. init_values=1e-5 dynamic_img_size=true)",
    )
    enc.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default 0)")


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """Batch size, reader processes, device, threads, fp16, progress; shared with `msamil predict`."""
    rt = parser.add_argument_group("runtime")
    rt.add_argument("--batch-size", type=int, default=32, help="patches per forward pass (default 32)")
    rt.add_argument("--workers", type=int, default=2, help="reader processes decoding patches (0 = none; default 2)")
    rt.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    rt.add_argument("--threads", type=int, help="torch threads for the model (default: torch's choice)")
    rt.add_argument("--fp16", action="store_true", help="store features as float16 (computation unchanged)")
    rt.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_runtime(args: argparse.Namespace) -> None:
    """Check the options of :func:`add_runtime_arguments` and the input size; set torch's threads."""
    import torch

    from ..errors import MsamilError

    for name in ("batch_size", "input_size"):
        if getattr(args, name) < 1:
            raise MsamilError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.workers < 0:
        raise MsamilError(f"--workers must be 0 or more, got {args.workers}")
    if args.threads is not None:
        if args.threads < 1:
            raise MsamilError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def encoder_spec(args: argparse.Namespace):
    """The :class:`~msamil_core.encoders.EncoderSpec` of the options of :func:`add_encoder_arguments`
    (an e2e checkpoint's tuned encoder with ``--encoder-checkpoint``)."""
    from ..encoders import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec

    if getattr(args, "encoder_checkpoint", None):
        from ..e2e import encoder_spec_from_checkpoint

        return encoder_spec_from_checkpoint(args.encoder_checkpoint)
    return EncoderSpec(
        name=args.encoder,
        weights=args.weights,
        input_size=args.input_size,
        mean=tuple(args.mean) if args.mean else IMAGENET_MEAN,
        std=tuple(args.std) if args.std else IMAGENET_STD,
        kwargs=parse_encoder_args(args.encoder_arg),
        seed=args.seed,
    )


def parse_encoder_args(items: list[str]) -> dict:
    """``["depth=2", "backbone=efficientnet_b3"]`` -> ``{"depth": 2, "backbone": "efficientnet_b3"}``."""
    from ..errors import MsamilError

    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MsamilError(f"--encoder-arg {item!r}: expected KEY=VALUE, e.g. depth=2")
        try:
            kwargs[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.strip()] = value  # a bare string such as a model or file name
    return kwargs


def run(args: argparse.Namespace) -> None:
    from ..bags import save_bag
    from ..errors import MsamilError
    from ..extract import extract_bags

    if len(args.coords) != len(args.out):
        raise MsamilError(f"{len(args.coords)} --coords sets but {len(args.out)} --out files: give one --out per --coords")
    if len(set(args.out)) != len(args.out):
        raise MsamilError(f"--out names a file twice ({', '.join(args.out)}); each bag needs its own file")
    check_runtime(args)
    spec = encoder_spec(args)
    bags = extract_bags(
        args.slide,
        args.coords,
        spec,
        slide_id=args.slide_id,
        mpp=args.mpp,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        fp16=args.fp16,
        progress=not args.no_progress,
    )
    for out, bag in zip(args.out, bags):  # each atomically; all are computed before the first is written
        save_bag(out, bag)
