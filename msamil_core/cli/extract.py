"""Patch features of one slide at 20x, 10x and 5x: coordinates -> one feature bag (.pt).

Reads every patch listed in the coordinates files (one per scale; a file's scale is its
`target_magnification` attribute, so their order does not matter), resizes it to --input-size
px, encodes it and writes the bag: features [N, D], coords [N, 2] (level-0 top-left), scales [N]
(0 = 20x, 1 = 10x, 2 = 5x), patch_size_level0 [N], slide_id, encoder ("<name>-<hash>") and
slide_digest (the slide file's; coordinates made from another file are refused).

Several bags from one pass, each named: --bag NAME=PT and its files --bag-coords NAME=H5,
repeated. Patches the bags share (lesion and random patches are tissue patches) are read and
encoded once; each bag keeps its own rows and records the pass's patch count
(`patches_encoded`). The workflow writes the bags of all patch-selection strategies so.

With --encoder-checkpoint (an `msamil e2e` checkpoint) the encoder is the tuned one, built as it
was trained; the other encoder options are then ignored.

The encoder stays loaded between calls (--server, the default): this command hands the slide to
a feature server on this machine that holds the model (started on first use, one per user,
encoder, settings, device and concurrent call; it exits after --server-idle seconds without
work; its log is in $XDG_RUNTIME_DIR/msamil or <tmp>/msamil-<uid>). --no-server loads the encoder
in this process; the bags are the same. --workers auto (the default) reads patches in this
process on the CPU and in --threads minus one reader processes on a GPU.

Encoders: a preset (`msamil list-models`: resnet50_trunc, uni_v1, uni_v2, virchow, virchow2,
h_optimus_0, h_optimus_1, gigapath, phikon, phikon_v2; their input size, normalisation and output
rule are the model card's), `msfem` (MsaMIL-Net: EfficientNet-B3 feature map + Transformer, 512-d)
or any timm model by name (resnet50, efficientnet_b3, ...). Nothing is downloaded: weights come
from a local file or folder (--weights: .safetensors, .bin, .pth; read without unpickling) or
from hf-hub:<org>/<repo> already in the Hugging Face cache (`msamil fetch-weights` puts it
there); without weights the encoder is randomly initialised (--seed) and a warning says so.

Examples:
  msamil extract --slide s1.svs --coords coords/20x/s1.h5 coords/10x/s1.h5 coords/5x/s1.h5 \
      --out features/msfem/s1.pt --encoder msfem --input-size 512 \
      --encoder-options '{"backbone_weights": "efficientnet_b3.safetensors"}'
  msamil extract --slide s1.svs --bag lesion=lesion/s1.pt --bag-coords lesion=coords/20x/s1.h5 ... \
      --bag tissue=tissue/s1.pt --bag-coords tissue=coords/tissue/20x/s1.h5 ... --encoder resnet18
  msamil extract --slide s1.svs --coords coords/20x/s1.h5 --out s1.pt \
      --encoder uni_v1 --weights hf-hub:MahmoodLab/UNI      # after `msamil fetch-weights uni_v1`
"""

from __future__ import annotations

import argparse

from .options import (add_encoder_arguments, add_extract_arguments, add_slide_arguments, encoder_spec, extract_options,
                      from_args, named)

HELP = "coords/{20x,10x,5x}/<slide>.h5 -> features/<encoder>/<slide>.pt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("input and output")
    add_slide_arguments(io)
    io.add_argument("--coords", nargs="+", metavar="H5",
                    help="coordinates HDF5 files of one bag, one per scale, in any order (scale read from "
                    "target_magnification)")
    io.add_argument("--out", help="the feature bag to write (.pt), with --coords")
    io.add_argument("--bag", action="append", default=[], metavar="NAME=PT",
                    help="instead of --coords/--out: a named bag to write, repeatable")
    io.add_argument("--bag-coords", action="append", default=[], metavar="NAME=H5",
                    help="a coordinates file of the bag NAME, repeatable")
    io.add_argument("--leave-out-unreadable", action="store_true",
                    help="a slide whose tiles fail to decode gets empty bags that record why (key `left_out`) "
                    "instead of failing; training, evaluation and `msamil left-out` leave it out (the workflow "
                    "extracts so)")
    add_encoder_arguments(parser)
    add_extract_arguments(parser)


def bags(args: argparse.Namespace) -> dict[str, tuple[list[str], str]]:
    """bag name -> (coordinates files, bag file) from --coords/--out or --bag/--bag-coords."""
    from ..errors import MsamilError

    if args.bag:
        if args.coords or args.out:
            raise MsamilError("give either --coords with --out, or --bag with --bag-coords, not both")
        out: dict[str, tuple[list[str], str]] = {}
        for name, path in named(args.bag, "--bag"):
            if name in out:
                raise MsamilError(f"--bag {name}: named twice")
            out[name] = ([], path)
        for name, path in named(args.bag_coords, "--bag-coords"):
            if name not in out:
                raise MsamilError(f"--bag-coords {name}={path}: no --bag {name}=... to write")
            out[name][0].append(path)
        empty = [name for name, (coords, _) in out.items() if not coords]
        if empty:
            raise MsamilError(f"--bag {empty[0]}: no --bag-coords {empty[0]}=H5 given")
        return out
    if not args.coords or not args.out:
        raise MsamilError("give --coords (the slide's coordinates files) and --out (the bag), or --bag/--bag-coords")
    return {"bag": (list(args.coords), args.out)}


def run(args: argparse.Namespace) -> None:
    from ..errors import MsamilError
    from ..settings import EncoderSettings, FeatureSettings

    todo = bags(args)
    outs = [str(out) for _, out in todo.values()]
    if len(set(outs)) != len(outs):
        raise MsamilError(f"a bag file is named twice ({', '.join(outs)}); each bag needs its own file")
    features = from_args(args, FeatureSettings)
    if not features.server:
        from ..pipeline import make_bags

        make_bags(args.slide, todo, encoder_spec(args), args.slide_id, args.mpp, extract_options(args),
                  leave_out=args.leave_out_unreadable)
        return
    # a thin client: no torch here; the server holds the encoder (msamil_core.features.client)
    from ..features.client import extract_via_server, server_config

    config = server_config(from_args(args, EncoderSettings).to_dict(), args.encoder_checkpoint, features.to_dict(),
                           args.device, args.threads)
    request = {"slide": args.slide, "slide_id": args.slide_id, "mpp": args.mpp, "progress": not args.no_progress,
               "leave_out": args.leave_out_unreadable,
               "bags": {name: [coords, out] for name, (coords, out) in todo.items()}}
    extract_via_server(request, config, features.server_idle)
