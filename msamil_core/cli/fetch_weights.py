"""Fetch an encoder's weights from the Hugging Face Hub once, before extraction.

Downloads the weights file a preset is published in (and its config file) into the Hugging
Face cache (HF_HOME / HF_HUB_CACHE) or, with --local-dir, into a folder that `weights` /
--weights can then name. Extraction jobs only read the cache; they never download. The
workflow runs this as its `fetch_weights` rule, once per encoder whose weights are `hf-hub:`.

Gated models (UNI, Virchow, H-optimus, Prov-GigaPath, ...): accept the licence on the model
page while logged in, create a read token and export it as HF_TOKEN. HF_HUB_OFFLINE=1 is
honoured: then only the cache is checked.

Examples:
  HF_TOKEN=hf_... msamil fetch-weights uni_v1
  msamil fetch-weights phikon --local-dir weights/phikon
  msamil fetch-weights --encoder vit_large_patch16_224 --weights hf-hub:MahmoodLab/UNI
"""

from __future__ import annotations

import argparse

from .options import add_settings, given

HELP = "download an encoder's Hugging Face weights once (gated repos: HF_TOKEN)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="a preset name (see `msamil list-models`); same as --encoder")
    from ..settings import EncoderSettings

    # an `encoders` entry's name and weights (hf-hub:<org>/<repo>[@revision]; default: the preset's repo)
    add_settings(parser, EncoderSettings, only=["name", "weights"], defaults=False,
                 source="the positional name; weights: the preset's hub repo")
    parser.add_argument("--local-dir", help="copy the files into this folder instead of only the HF cache")
    parser.add_argument("--record", metavar="JSON",
                        help="write what was fetched (ref, file, sha256, bytes) to this file (the workflow's output)")


def run(args: argparse.Namespace) -> None:
    import logging

    from ..errors import MsamilError
    from ..features.encoders import fetch_weights
    from ..fileio import write_json
    from ..settings import EncoderSettings

    entry = given(args, EncoderSettings)
    weights = entry.get("weights")
    name = entry.get("name") or args.name or ("" if weights else None)  # a bare repo: default file names
    if name is None:
        raise MsamilError("name the encoder: msamil fetch-weights <preset> (or --encoder NAME --weights hf-hub:...)")
    for noisy in ("httpx", "httpx2", "httpcore"):  # one log line per HTTP request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    fetched = fetch_weights(name, weights, args.local_dir)
    if args.record:
        write_json(args.record, {"encoder": name, **fetched})
    print(f"{name}: {fetched['ref']} -> {fetched['file']} ({fetched['bytes']} bytes, sha256 {fetched['sha256'][:12]})")
