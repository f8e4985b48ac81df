"""Train a patch encoder and a MIL model end to end on K sampled patches per slide (MsaMIL-Net 3.4).

Each step reads K patches of one slide (--k, 200 in the paper; resampled every epoch) from its
20x/10x/5x coordinates (<coords-dir>/<scale>/<slide_id>.h5), encodes them with the trainable
encoder (activation checkpointing chunk by chunk), aggregates the K features with their
coordinates and scales and takes the cross-entropy on the slide label; AdamW updates both with
their own learning rates (--lr for the MIL model, --encoder-lr for the encoder); bf16 autocast
on CUDA. Each fold trains on its training slides only, picks the epoch of lowest validation
loss and writes <out>/fold<k>/checkpoint.pt: the MIL model as a SPEC checkpoint plus the tuned
encoder, which `msamil extract --encoder-checkpoint` uses to re-extract features for that fold
(never for another: its encoder has seen the other folds' test slides). A killed run resumes
from <out>/fold<k>/resume.pt, mid-epoch if need be.

Under `torchrun --nproc-per-node W` the K patches of each slide are split across the W ranks
and their features all-gathered with autograd: every rank's gradient equals one process's.

With --k-study K1 K2 ..., no model is kept: the same initial model is trained --k-study-steps
steps with each K on the training slides of --fold (default 0), and <out>/k_study.csv,
k_study_summary.csv and k_study.png record the training loss per step; the summary adds each
trained model's loss on all those slides with K patches (end_loss; two fixed patch draws) and
with the largest K (end_loss_kmax), which are far less noisy than the loss of single steps.

Examples:
  msamil e2e --sheet slides.csv --folds results/splits/folds.csv --fold 0 --coords-dir results/coords \\
      --out results/e2e/msfem --encoder msfem --input-size 512 --k 200 --epochs 10
  msamil e2e ... --encoder resnet18 --input-size 64 --k-study 4 16 64 --k-study-steps 60
"""


from __future__ import annotations

import argparse

from .options import (add_encoder_arguments, add_fold_arguments, add_settings, classes_option, encoder_spec,
                      fold_indices, from_args, json_option, load_folds, read_options, split_settings)

HELP = "slides + coords + folds -> e2e/<name>/fold<k>/checkpoint.pt (tuned encoder + MIL model)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..settings import E2EConfig

    data = parser.add_argument_group("slides and folds")
    add_fold_arguments(data)
    data.add_argument("--coords-dir", required=True,
                      help="folder with <scale>/<slide_id>.h5 coordinates (the workflow's results/coords)")
    data.add_argument("--out", required=True, help="e2e run directory: fold<k>/ (or the K study) is written inside")
    add_encoder_arguments(parser)
    tr = parser.add_argument_group("training (over --options, which is over the defaults); with --k-study, the K "
                                   "study instead of training")
    tr.add_argument("--options", help="JSON/YAML file or inline JSON with e2e options (the config's `e2e` entry keys "
                    "below)")
    add_settings(tr, E2EConfig, defaults=False, source="--options', else {default}")
    rt = parser.add_argument_group("runtime")
    rt.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    rt.add_argument("--threads", type=int, help="torch CPU threads")
    rt.add_argument("--no-progress", action="store_true", help="(kept for old command lines; progress is logged per epoch)")


def e2e_config(args: argparse.Namespace):
    """The :class:`~msamil_core.settings.E2EConfig`: the defaults, --options, then the flags."""
    from ..settings import E2EConfig

    base = E2EConfig.from_dict(read_options(args.options, "--options") if args.options else {}, "--options")
    return from_args(args, E2EConfig, base)


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ..cohort.sheet import load_sheet
    from ..reporting.plots import plot_k_study
    from ..runtime import is_main_process, resolve_device, set_threads
    from ..training.e2e import run_e2e

    set_threads(args.threads)
    cfg = e2e_config(args)
    sheet = load_sheet(args.sheet)
    folds = load_folds(args, sheet, Path(args.out))
    run_e2e(cfg, encoder_spec(args), sheet, folds, fold_indices(args, folds), args.coords_dir, args.out,
            resolve_device(args.device), classes_option(args), split_settings(args), json_option(args.task, "--task"))
    if cfg.k_study and is_main_process():  # training writes the curves' CSV; reporting draws them
        plot_k_study(args.out)
