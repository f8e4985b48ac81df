"""Resume only what was saved for the same run: a resume.pt written for other slides, folds,
classes or config, or one that is truncated, makes the run start over with a log line saying why."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from msamil_core.features.bags import Bag, save_bag
from msamil_core.training.engine import Schedule, fit
from msamil_core.settings import TrainConfig
from msamil_core.training.mil import BagDataset, MILTask

SCALES = ["20x", "10x", "5x"]
IDS = [f"s{i}" for i in range(8)]


@pytest.fixture(scope="module")
def bags(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bags")
    rng = np.random.default_rng(0)
    paths = {}
    for i, sid in enumerate(IDS + ["extra"]):
        m = int(rng.integers(6, 14))
        feats = torch.from_numpy(rng.normal(size=(m, 8)).astype(np.float32))
        feats[:2, :2] += 2.0 * (i % 2)
        paths[sid] = root / f"{sid}.pt"
        save_bag(paths[sid], Bag(features=feats, coords=torch.from_numpy(rng.integers(0, 4000, (m, 2))),
                                 scales=torch.from_numpy(rng.integers(0, 3, m)), patch_size_level0=torch.full((m,), 512),
                                 slide_id=sid, encoder="synthetic"))
    return paths


def make_task(bags, train=IDS[:6], val=IDS[6:], classes=("normal", "tumor"), **options) -> MILTask:
    cfg = TrainConfig.from_dict({"model": "abmil.base", "epochs": 4, "lr": 1e-3, "patience": 0, "grad_accum": 2,
                                 "standardize": False, "max_instances": 0, **options})
    label = {sid: i % 2 for i, sid in enumerate(IDS)} | {"extra": 1}
    train_set = BagDataset([bags[s] for s in train], list(train), [label[s] for s in train], cfg.scales, train=True)
    val_set = BagDataset([bags[s] for s in val], list(val), [label[s] for s in val], cfg.scales)
    return MILTask(cfg, train_set, val_set, list(classes), 8, torch.device("cpu"))


def interrupted(bags, resume: Path) -> None:
    """A run of the baseline task stopped after 3 optimizer steps (its first epoch), its resume.pt kept."""
    task = make_task(bags)
    fit(task, Schedule.of(task.cfg, max_steps=3), resume)
    assert resume.exists()


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_unchanged_run_resumes(bags, tmp_path, caplog):
    resume = tmp_path / "resume.pt"
    interrupted(bags, resume)
    with caplog.at_level(logging.INFO, logger="msamil_core.training.engine"):
        resumed = fit(make_task(bags), Schedule.of(make_task(bags).cfg), resume)
    assert f"resuming from {resume} at epoch 1 (optimizer step 3)" in caplog.text and "starting over" not in caplog.text
    whole = fit(make_task(bags), Schedule.of(make_task(bags).cfg), None)
    assert same_weights(resumed.best_state, whole.best_state)


CHANGES = {
    "slides": (dict(train=IDS[:6] + ["extra"]), "train: 1 slide added"),
    "folds": (dict(train=IDS[:5], val=IDS[5:]), "train: 1 slide removed; val: 1 slide added"),
    "validation slides": (dict(val=IDS[6:7]), "val: 1 slide removed"),
    "classes": (dict(classes=("benign", "tumor")), "classes: ['normal', 'tumor'] -> ['benign', 'tumor']"),
    "config": (dict(lr=5e-4), "config: lr 0.001 -> 0.0005"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_run_starts_over_and_says_why(bags, tmp_path, caplog, change):
    options, reason = CHANGES[change]
    resume = tmp_path / "resume.pt"
    interrupted(bags, resume)
    task = make_task(bags, **options)
    with caplog.at_level(logging.INFO, logger="msamil_core.training.engine"):
        rerun = fit(task, Schedule.of(task.cfg), resume)
    assert f"resume checkpoint {resume} was written for another run ({reason}); starting over" in caplog.text
    assert "resuming from" not in caplog.text
    fresh = make_task(bags, **options)
    assert same_weights(rerun.best_state, fit(fresh, Schedule.of(fresh.cfg), None).best_state)
    assert [h["epoch"] for h in rerun.history] == [0, 1, 2, 3]


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_a_truncated_resume_checkpoint_starts_over(bags, tmp_path, caplog, keep):
    resume = tmp_path / "resume.pt"
    interrupted(bags, resume)
    data = resume.read_bytes()
    resume.write_bytes(data[: int(len(data) * keep)])
    with caplog.at_level(logging.INFO, logger="msamil_core.training.engine"):
        rerun = fit(make_task(bags), Schedule.of(make_task(bags).cfg), resume)
    lines = [r.getMessage() for r in caplog.records if "starting over" in r.getMessage()]
    assert len(lines) == 1 and str(resume) in lines[0] and "truncated" in lines[0] and "\n" not in lines[0]
    assert same_weights(rerun.best_state, fit(make_task(bags), Schedule.of(make_task(bags).cfg), None).best_state)
    assert torch.load(resume, weights_only=True)["epoch"] == 4  # overwritten by the new run's checkpoint
