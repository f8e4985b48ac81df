"""The one training loop: MIL aggregators, encoder + MIL end to end, and the UNet++ segmenter.

A :class:`Task` says what the model is, what one training item is (a bag, a slide's K patches, a
batch of thumbnails), what its loss is and how the model is validated; :func:`fit` does the rest
the same way for every task, read top to bottom like nanoGPT's ``train.py``:

* AdamW over the task's parameter groups, each with its own peak and floor learning rate,
  following one pure schedule (:func:`lr_at`: linear warm-up, then cosine decay);
* gradient accumulation over ``grad_accum`` items, gradient clipping, bf16 autocast on CUDA;
* after every epoch a ``@torch.no_grad()`` validation in eval mode, the best epoch's weights by
  the monitored metric, early stopping after ``patience`` epochs without improvement, history;
* ``resume.pt`` after every epoch and, on SIGTERM (SLURM preemption, ``scancel``), at the next
  optimizer step; a rerun with the same task continues exactly where the run stopped, mid-epoch
  included (model, optimizer, loop state, torch's RNG and the task's own random state); a
  resume.pt written for another run (its fingerprint: config, classes, training and validation
  slides) or one that cannot be read starts the run over, with a log line saying why;
* DDP under ``torchrun``: an optimizer step covers ``grad_accum x world`` items, each rank takes
  its own contiguous share of them (ranks with nothing left in a short last step contribute
  zeros), and the summed gradients divided by the world size are exactly those of one process
  with ``grad_accum x world`` accumulation on the same items in the same order. Every rank runs
  the same number of steps, so no rank waits for another, and a SIGTERM seen by any rank stops
  all of them at the same step. A task whose items cannot be split (end-to-end training splits
  each slide's patches across ranks instead) sets ``shard_items = False``: every rank then runs
  every item and the same gradient average applies.
"""

from __future__ import annotations

import copy
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import MsamilError
from ..fileio import save_torch, torch_load
from ..runtime import autocast, distributed

log = logging.getLogger(__name__)


@dataclass
class Schedule:
    """How long and how a task trains: the keys every task's config shares."""

    epochs: int
    grad_accum: int = 1  # items per optimizer step (per process under torchrun)
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0
    patience: int = 0  # epochs without improvement of `monitor` before stopping; 0 = never
    monitor: str = "val_loss"  # val_<key of the task's evaluate()>; *loss is minimised, the rest maximised
    bf16: bool = True  # bf16 autocast on CUDA
    workers: int = 0  # DataLoader processes loading items
    max_steps: int = 0  # stop after this many optimizer steps; 0 = epochs decide

    @classmethod
    def of(cls, cfg, monitor: str = "val_loss", max_steps: int = 0) -> "Schedule":
        """The schedule of a task's settings (:mod:`msamil_core.settings`): the keys every task
        shares; ``monitor``, ``bf16`` and ``workers`` where the task has them (``monitor`` is the
        metric of tasks without one)."""
        return cls(epochs=cfg.epochs, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip,
                   warmup_epochs=cfg.warmup_epochs, weight_decay=cfg.weight_decay, patience=cfg.patience,
                   monitor=getattr(cfg, "monitor", monitor), bf16=getattr(cfg, "bf16", True),
                   workers=getattr(cfg, "workers", 0), max_steps=max_steps)


@dataclass
class FitResult:
    """What :func:`fit` returns: the best epoch's weights and metrics, and the history."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_metrics: dict
    history: list[dict]
    rank: int = 0


class Task:
    """What the engine trains. Set ``model`` (on its device) and ``device``; override the methods."""

    model: nn.Module
    device: torch.device
    shard_items: bool = True  # under torchrun, each rank takes its share of a step's items

    def param_groups(self) -> list[dict]:
        """AdamW groups: ``{"params": [...], "lr": peak, "min_lr": floor}``."""
        raise NotImplementedError

    def dataset(self) -> torch.utils.data.Dataset:
        """Training items by index (loaded one at a time, in the epoch's order)."""
        raise NotImplementedError

    def epoch_order(self, epoch: int) -> Sequence[int]:
        """Indices of the items of ``epoch``, in order; the same on every rank."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Called at the start of each epoch, before its items are loaded."""

    def loss(self, item: Any, epoch: int, position: int) -> torch.Tensor:
        """The training loss of one item; ``position`` is its place in the epoch's order."""
        raise NotImplementedError

    def evaluate(self) -> dict | None:
        """Validation metrics (``loss`` and any others) in eval mode; None without validation data
        (then every epoch counts as an improvement and the last is kept)."""
        return None

    def fingerprint(self) -> dict:
        """What a resume checkpoint must have been written with (config, classes, slides)."""
        return {}

    def state_dict(self) -> dict:
        """The task's own random state, saved in resume.pt."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """Learning rate at optimizer step ``step``: linear warm-up, then cosine decay to ``min_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class StopRequest:
    """SIGTERM (SLURM preemption, scancel) sets a flag; the loop saves and exits at the next step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            log.warning("SIGTERM: saving a resume checkpoint and stopping")
            self.requested = True

        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Preempted(SystemExit):
    """Raised after a SIGTERM checkpoint; exit status 143 like a process killed by SIGTERM."""

    def __init__(self):
        super().__init__(143)


def sync_gradients(parameters: list[nn.Parameter], world: int) -> None:
    """Sum every gradient over the ranks and divide by the world size (in one all-reduce); a
    parameter without a gradient on a rank counts as zero there."""
    if world == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(parameters, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
        offset += g.numel()


def stop_everywhere(requested: bool, world: int, device: torch.device) -> bool:
    """A SIGTERM seen by any rank stops every rank at the same step (collectives stay matched)."""
    if world == 1:
        return requested
    import torch.distributed as dist

    flag = torch.tensor([float(requested)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _first(batch):
    return batch[0]


def _scalars(metrics: dict) -> dict:
    """The numbers of a metrics dict (no lists, matrices or curves)."""
    return {k: v for k, v in metrics.items()
            if v is None or (isinstance(v, (int, float, np.number)) and not isinstance(v, bool))}


def _score(monitor: str, metrics: dict) -> float:
    """The monitored metric as 'higher is better' (NaN when undefined)."""
    key = monitor.removeprefix("val_")
    value = metrics.get(key)
    value = math.nan if value is None else float(value)
    return -value if key.endswith("loss") else value


@dataclass
class _LoopState:
    epoch: int = 0  # the epoch being run (or next to run)
    position: int = 0  # optimizer steps of this epoch done
    step: int = 0  # optimizer steps done in all
    losses: list = field(default_factory=list)  # item losses of this epoch so far
    best_score: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    best_state: dict | None = None
    best_metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)


def fit(task: Task, schedule: Schedule, resume_path: str | Path | None = None,
        on_step: Callable[[int, list[float]], None] | None = None) -> FitResult:
    """Train ``task.model`` by ``schedule``; see the module docstring.

    ``resume_path``: where resume.pt lives (None: no resuming and no preemption checkpoints).
    ``on_step(step, losses)`` is called after every optimizer step with that step's item losses.
    """
    rank, world = distributed()
    model, device = task.model, task.device
    groups = task.param_groups()
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=groups[0]["lr"], weight_decay=schedule.weight_decay)
    for group in optimizer.param_groups:
        group["peak_lr"] = group["lr"]
    dataset = task.dataset()
    per_step = schedule.grad_accum * (world if task.shard_items else 1)  # items per optimizer step
    steps_per_epoch = math.ceil(len(dataset) / per_step)
    total_steps = steps_per_epoch * schedule.epochs
    if schedule.max_steps:
        total_steps = min(total_steps, schedule.max_steps)
    warmup_steps = round(schedule.warmup_epochs * steps_per_epoch)

    state = _LoopState()
    saved = _load_resume(resume_path, task.fingerprint())
    if saved is not None:
        model.load_state_dict(saved["state_dict"])
        optimizer.load_state_dict(saved["optimizer"])
        state = _LoopState(**saved["engine"])
        log.info("resuming from %s at epoch %d%s (optimizer step %d)", resume_path, state.epoch,
                 f", step {state.position}" if state.position else "", state.step)

    def restore_random_state():
        # The random state as it was when saved: between epochs (before the next one's set-up),
        # or mid-epoch (after its set-up, which may draw random numbers).
        torch.set_rng_state(saved["rng_state"])
        task.load_state_dict(saved["task"])

    if saved is not None and state.position == 0:
        restore_random_state()
        saved = None

    def save_resume():
        if rank == 0 and resume_path is not None:
            save_torch(resume_path, {"epoch": state.epoch, "engine": vars(state), "state_dict": model.state_dict(),
                                     "optimizer": optimizer.state_dict(), "rng_state": torch.get_rng_state(),
                                     "task": task.state_dict(), "fingerprint": task.fingerprint()})

    loader_kwargs = dict(batch_size=1, collate_fn=_first, num_workers=schedule.workers,
                         pin_memory=device.type == "cuda", persistent_workers=False)
    with StopRequest() as stop:
        while state.epoch < schedule.epochs and not (schedule.max_steps and state.step >= schedule.max_steps):
            epoch, started = state.epoch, time.perf_counter()
            task.set_epoch(epoch)
            order = list(task.epoch_order(epoch))
            steps = [order[i : i + per_step] for i in range(0, len(order), per_step)]
            if task.shard_items:
                share = schedule.grad_accum
                steps = [s[rank * share : (rank + 1) * share] for s in steps]
            # positions in the epoch's order, for the task's per-item randomness
            offsets = [i * per_step + (rank * schedule.grad_accum if task.shard_items else 0) for i in range(len(steps))]
            todo = [i for s in steps[state.position :] for i in s]
            items = iter(torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, todo), **loader_kwargs))
            if saved is not None:
                restore_random_state()
                saved = None
            model.train()
            for s in range(state.position, len(steps)):
                step_losses = []
                for j in range(len(steps[s])):
                    with autocast(device, schedule.bf16):
                        loss = task.loss(next(items), epoch, offsets[s] + j)
                    (loss / schedule.grad_accum).backward()
                    step_losses.append(loss.item())
                sync_gradients(params, world)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(state.step, total_steps, warmup_steps, group["peak_lr"], group["min_lr"])
                if schedule.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, schedule.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.position = s + 1
                state.losses += step_losses
                if on_step is not None:
                    on_step(state.step - 1, step_losses)
                if schedule.max_steps and state.step >= schedule.max_steps:
                    break
                if stop_everywhere(stop.requested, world, device) and s + 1 < len(steps):
                    save_resume()
                    raise Preempted()
            _end_epoch(task, schedule, state, optimizer, world, device, time.perf_counter() - started)
            save_resume()
            if stop_everywhere(stop.requested, world, device):
                raise Preempted()
            if schedule.patience and state.bad_epochs >= schedule.patience:
                log.info("early stop: %s did not improve for %d epochs", schedule.monitor, schedule.patience)
                break
    best_state = state.best_state if state.best_state is not None else copy.deepcopy(model.state_dict())
    return FitResult(best_state, state.best_epoch, state.best_metrics, state.history, rank)


def _end_epoch(task: Task, schedule: Schedule, state: _LoopState, optimizer, world: int, device, seconds: float):
    """Validate, record the epoch, keep the best state; the next epoch starts at its first step."""
    model = task.model
    model.eval()
    with torch.no_grad():
        metrics = task.evaluate()
    model.train()
    total, count = float(np.sum(state.losses)), len(state.losses)
    if world > 1:  # the epoch's mean training loss over every rank's items
        import torch.distributed as dist

        both = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(both)
        total, count = both.tolist()
    values = _scalars(metrics or {})
    record = {"epoch": state.epoch, "train_loss": total / max(count, 1),
              **{f"val_{k}": v for k, v in values.items() if k != "n_slides"},
              "lr": optimizer.param_groups[-1]["lr"], "seconds": round(seconds, 2)}
    state.history.append(record)
    score = _score(schedule.monitor, values)
    improved = metrics is None or (not math.isnan(score) and score > state.best_score)
    log.info("epoch %d: train loss %.4f%s%s", state.epoch, record["train_loss"],
             "".join(f", val {k} {_fmt(v)}" for k, v in values.items() if k in ("loss", "auc", "iou")),
             " *" if improved else "")
    if improved:
        state.best_score = score if not math.isnan(score) else state.best_score
        state.best_epoch, state.bad_epochs = state.epoch, 0
        state.best_state = copy.deepcopy(model.state_dict())
        state.best_metrics = {k: v for k, v in (metrics or {}).items() if k not in ("confusion_matrix", "roc", "reliability")}
    else:
        state.bad_epochs += 1
    state.epoch, state.position, state.losses = state.epoch + 1, 0, []


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _load_resume(path: str | Path | None, fingerprint: dict) -> dict | None:
    """resume.pt when it exists, reads and was written for this task (same fingerprint); else
    None after a log line saying why the run starts over (an unreadable file is left to be
    overwritten by the first checkpoint of the new run)."""
    if path is None or not Path(path).exists():
        return None
    try:
        saved = torch_load(path, "resume checkpoint", allow_numpy=True)
    except MsamilError as exc:
        log.warning("%s; starting over", exc)
        return None
    missing = [k for k in _RESUME_KEYS if not isinstance(saved, dict) or k not in saved]
    if missing:
        log.warning("resume checkpoint %s: not a resume checkpoint of msamil (no %s); starting over",
                    path, ", ".join(missing))
        return None
    changes = fingerprint_changes(saved["fingerprint"], fingerprint)
    if changes:
        log.warning("resume checkpoint %s was written for another run (%s); starting over", path, "; ".join(changes))
        return None
    return saved


_RESUME_KEYS = ("engine", "state_dict", "optimizer", "rng_state", "task", "fingerprint")


def fingerprint_changes(saved: Any, now: dict, limit: int = 4) -> list[str]:
    """What differs between a resume checkpoint's fingerprint and the task's, one phrase per
    part (``config: lr 0.001 -> 0.0002``, ``train: 2 slides added, 1 removed``); [] when equal."""
    if not isinstance(saved, dict):
        return ["no fingerprint"]
    out = []
    for key in sorted(set(saved) | set(now), key=lambda k: list(now).index(k) if k in now else len(now)):
        old, new = saved.get(key), now.get(key)
        if old == new:
            continue
        if old is None or new is None:
            out.append(f"{key}: {'not recorded then' if old is None else 'not given now'}")
        elif isinstance(old, dict) and isinstance(new, dict):
            keys = [k for k in sorted(set(old) | set(new), key=str) if old.get(k) != new.get(k)]
            shown = ", ".join(f"{k} {_short(old.get(k))} -> {_short(new.get(k))}" for k in keys[:limit])
            out.append(f"{key}: {shown}{f' and {len(keys) - limit} more' if len(keys) > limit else ''}")
        elif _is_slide_list(old) and _is_slide_list(new):
            before, after = dict(map(tuple, old)), dict(map(tuple, new))
            parts = [f"{n} slide{'s' if n != 1 else ''} {what}" for n, what in (
                (len(after.keys() - before.keys()), "added"), (len(before.keys() - after.keys()), "removed"),
                (sum(before[s] != after[s] for s in before.keys() & after.keys()), "relabelled")) if n]
            out.append(f"{key}: {', '.join(parts) or 'slide order changed'}")
        else:
            out.append(f"{key}: {_short(old)} -> {_short(new)}")
    return out


def _is_slide_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, (list, tuple)) and len(v) == 2 for v in value)


def _short(value, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
