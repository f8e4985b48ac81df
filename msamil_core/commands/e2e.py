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

HELP = "slides + coords + folds -> e2e/<name>/fold<k>/checkpoint.pt (tuned encoder + MIL model)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..train import BALANCE_CHOICES
    from .extract import add_encoder_arguments

    data = parser.add_argument_group("slides and folds")
    data.add_argument("--sheet", required=True, help="slide sheet (CSV/TSV with slide_id, path, label, patient_id)")
    data.add_argument("--coords-dir", required=True,
                      help="folder with <scale>/<slide_id>.h5 coordinates (the workflow's results/coords)")
    data.add_argument("--folds", help="folds.csv from `msamil splits`; default: made from the sheet")
    data.add_argument("--fold", default="all", help="fold index, or `all` (default)")
    data.add_argument("--n-folds", type=int, default=5, help="folds to make when --folds is not given (default 5)")
    data.add_argument("--val-fraction", type=float, default=0.2, help="share of training patients used for validation")
    data.add_argument("--split-seed", type=int, default=0, help="seed of the folds and validation parts")
    data.add_argument("--classes", nargs="+", help="class order (default: sorted sheet labels)")
    data.add_argument("--task", help="JSON: class name -> list of sheet labels (e.g. a two-class task)")
    data.add_argument("--out", required=True, help="e2e run directory: fold<k>/ (or the K study) is written inside")

    add_encoder_arguments(parser)

    tr = parser.add_argument_group("training (flags override --options)")
    tr.add_argument("--options", help="JSON/YAML file or inline JSON with e2e options (the config's `e2e` entry keys)")
    tr.add_argument("--model", help="registered MIL model (`msamil list-models`; default msamil.base)")
    tr.add_argument("--model-args", help="JSON of MIL model options")
    tr.add_argument("--scales", nargs="+", help="scales patches are sampled from (default: 20x 10x 5x)")
    tr.add_argument("--k", type=int, help="patches sampled per slide and step (default 200, the paper's)")
    tr.add_argument("--epochs", type=int, help="epochs (default 10)")
    tr.add_argument("--lr", type=float, help="MIL model's peak learning rate (default 1e-4)")
    tr.add_argument("--encoder-lr", type=float, help="encoder's peak learning rate (default 1e-5)")
    tr.add_argument("--grad-accum", type=int, help="slides per optimizer step (default 1)")
    tr.add_argument("--balance", choices=BALANCE_CHOICES, help="class balance by loss weights or sampling")
    tr.add_argument("--train-seed", type=int,
                    help="seed of the MIL model, the patch sampling and the slide order (--seed seeds the encoder)")
    tr.add_argument("--chunk-size", type=int, help="patches per encoder forward (default 16)")
    tr.add_argument("--no-checkpointing", action="store_true",
                    help="keep the encoder's activations instead of recomputing them (more memory, less time)")
    tr.add_argument("--workers", type=int, help="reader processes reading the next slides' patches (default 0)")

    ks = parser.add_argument_group("K study")
    ks.add_argument("--k-study", type=int, nargs="+", metavar="K", help="run the K study with these K instead of training")
    ks.add_argument("--k-study-steps", type=int, default=60, help="optimizer steps per K (default 60)")

    rt = parser.add_argument_group("runtime")
    rt.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    rt.add_argument("--threads", type=int, help="torch CPU threads")
    rt.add_argument("--no-progress", action="store_true", help="no progress bar (K study)")


def e2e_options(args: argparse.Namespace) -> dict:
    """--options, then explicit flags on top."""
    import json

    from ..errors import MsamilError
    from .train import read_options

    options = read_options(args.options, "--options") if args.options else {}
    flags = {"model": args.model, "scales": args.scales, "k": args.k, "epochs": args.epochs, "lr": args.lr,
             "encoder_lr": args.encoder_lr, "grad_accum": args.grad_accum, "balance": args.balance, "seed": args.train_seed,
             "chunk_size": args.chunk_size, "workers": args.workers}
    options.update({k: v for k, v in flags.items() if v is not None})
    if args.no_checkpointing:
        options["checkpointing"] = False
    for flag, key in ((args.model_args, "model_args"), (args.task, "task")):
        if flag:
            try:
                options[key] = json.loads(flag)
            except json.JSONDecodeError as exc:
                raise MsamilError(f"--{key.replace('_', '-')}: not JSON ({exc})") from None
    return options


def run(args: argparse.Namespace) -> None:
    import logging
    from pathlib import Path

    import torch

    from ..e2e import E2EConfig, SlidePatchDataset, SlideSource, k_study, train_e2e, write_k_study
    from ..errors import MsamilError
    from ..experiment import select_slides, task_classes
    from ..sheet import load_sheet, slide_mpp
    from ..slide import SCALES
    from ..splits import fold_parts
    from ..train import resolve_device
    from .extract import encoder_spec
    from .train import fold_indices, load_folds

    log = logging.getLogger("msamil.e2e")
    if args.threads:
        torch.set_num_threads(args.threads)
    options = e2e_options(args)
    task = options.pop("task", None)
    name = options.pop("name", Path(args.out).name)
    for key in ("encoder", "experiments", "folds", "k_study", "k_study_steps"):  # the workflow's keys, not training options
        options.pop(key, None)
    cfg = E2EConfig.from_dict(options)
    spec = encoder_spec(args)
    sheet = load_sheet(args.sheet)
    classes, mapping = task_classes(sheet, task, args.classes)
    out = Path(args.out)
    folds = load_folds(args, sheet, out)
    device = resolve_device(args.device)
    coords_dir = Path(args.coords_dir)

    def dataset(ids, labels):
        sources = [SlideSource(s, sheet.loc[s, "path"], slide_mpp(sheet.loc[s]),
                               tuple(str(coords_dir / scale / f"{s}.h5") for scale in SCALES)) for s in ids]
        return SlidePatchDataset(sources, labels, cfg.k, spec.input_size, cfg.scales, cfg.seed)

    fold_list = fold_indices(args, folds)
    if args.k_study:
        if any(k < 1 for k in args.k_study) or args.k_study_steps < 1:
            raise MsamilError("--k-study values and --k-study-steps must be at least 1")
        k = 0 if args.fold == "all" else fold_list[0]
        ids, labels = select_slides(fold_parts(folds, k, val_fraction=args.val_fraction, seed=args.split_seed)["train"],
                                    sheet, mapping)
        rows, ends = k_study(cfg, spec, dataset(ids, labels), classes, sorted(args.k_study), args.k_study_steps,
                             device, progress=not args.no_progress)
        for r in write_k_study(out, rows, ends):
            log.info("K study: K=%d, after %d steps: running loss (last quarter) %.4f, loss on all training slides "
                     "%.4f (K=%d) and %.4f (K=%d)", r["k"], r["steps"], r["final_loss"], r["end_loss"], r["k"],
                     r["end_loss_kmax"], max(args.k_study))
        return
    for k in fold_list:
        parts = fold_parts(folds, k, val_fraction=args.val_fraction, seed=args.split_seed)
        train_ids, train_y = select_slides(parts["train"], sheet, mapping)
        val_ids, val_y = select_slides(parts["val"], sheet, mapping)
        if not train_ids:
            raise MsamilError(f"fold {k} has no training slides for classes {classes}; check folds.csv and the task")
        log.info("%s fold %d: %d train / %d val slides, encoder %s -> %s, K=%d", name, k, len(train_ids), len(val_ids),
                 spec.name, cfg.model, cfg.k)
        run_config = {"name": name, "task": task, **options}
        metrics = train_e2e(cfg, spec, dataset(train_ids, train_y), dataset(val_ids, val_y), classes, out / f"fold{k}",
                            device, run_config)
        log.info("%s fold %d: best validation %s", name, k,
                 {m: round(v, 4) for m, v in metrics.items() if isinstance(v, float)})
