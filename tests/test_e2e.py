"""End-to-end training: K-patch sampling, exact multi-process gradients (gloo, 2 ranks), fold
checkpoints whose tuned encoder re-extracts features, exact resume after SIGTERM, the K study."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, write_pyramid_tiff
from msamil_core.features.bags import load_bag
from msamil_core.cli import main
from msamil_core.wsi.coords import make_grids, write_coords
from msamil_core.training.e2e import sample_patches, share
from msamil_core.errors import MsamilError
from msamil_core.wsi.slide import open_slide

ENCODER = ["--encoder", "resnet18", "--input-size", "32"]
FAST = ["--k", "6", "--epochs", "2", "--chunk-size", "4", "--lr", "1e-3", "--encoder-lr", "1e-3", "--threads", "1"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, Path]:
    """Nine small slides (three patients per class; class b has dark nuclei-like dots), their
    20x/10x/5x coordinates under coords/ and the sheet."""
    root = tmp_path_factory.mktemp("e2e")
    rng = np.random.default_rng(0)
    rows = ["slide_id,path,label,patient_id"]
    for i in range(9):
        label = "ab"[i % 2]
        image = np.clip(rng.normal(225, 12, (512, 512, 3)), 0, 255).astype(np.uint8)
        image[..., 1] -= 40  # pink
        if label == "b":
            for x, y in rng.integers(0, 508, (600, 2)):
                image[y : y + 4, x : x + 4] = (60, 30, 110)
        path = write_pyramid_tiff(root / f"s{i}.tiff", image)
        with open_slide(path, f"s{i}") as slide:
            grids = make_grids(np.ones((16, 16), bool), slide.dimensions, slide.mpp, patch_size=64, name=f"s{i}")
        for scale, grid in grids.items():
            write_coords(root / "coords" / scale / f"s{i}.h5", grid.coords, grid.attrs)
        rows.append(f"s{i},s{i}.tiff,{label},p{i}")
    (root / "sheet.csv").write_text("\n".join(rows) + "\n")
    return root / "sheet.csv", root / "coords"


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory) -> Path:
    """Fold 1 trained for 3 epochs, uninterrupted: the run directory."""
    sheet, coords = cohort
    out = tmp_path_factory.mktemp("trained") / "r18"
    assert main(e2e_args(sheet, coords, out, "--fold", "1", "--epochs", "3")) == 0
    return out


def e2e_args(sheet, coords, out, *extra) -> list[str]:
    return ["e2e", "--sheet", str(sheet), "--coords-dir", str(coords), "--out", str(out), "--n-folds", "3",
            *ENCODER, *FAST, *map(str, extra)]


def msamil(*args) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "msamil_core", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_k_patches_are_a_pure_function_of_seed_epoch_and_slide():
    a = sample_patches(500, 200, seed=0, epoch=0, index=3)
    assert len(a) == 200 == len(set(a.tolist())) and (np.diff(a) > 0).all()
    assert (a == sample_patches(500, 200, seed=0, epoch=0, index=3)).all()
    assert (a != sample_patches(500, 200, seed=0, epoch=1, index=3)).any()  # resampled each epoch
    assert (sample_patches(50, 200, 0, 0, 0) == np.arange(50)).all()  # all of a small slide
    # the ranks' shares tile the K patches in order, also when K does not divide
    for k, w in ((200, 2), (11, 2), (7, 3), (1, 4)):
        shares = [share(k, r, w) for r in range(w)]
        assert shares[0][0] == 0 and shares[-1][1] == k and all(a[1] == b[0] for a, b in zip(shares, shares[1:]))


def test_two_process_gradients_equal_one_process(tmp_path):
    """torchrun, gloo, 2 ranks, K = 11 split 6 + 5: every parameter's gradient (msfem with
    BatchNorm and a Transformer, msamil.base with dropout) equals the one-process gradient."""
    from e2e_gradients import main as gradients

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    script = str(REPO / "tests" / "e2e_gradients.py")
    gradients(str(tmp_path / "one.pt"), "float64")  # one process: this one
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          "29541", script, tmp_path / "two.pt"], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt", weights_only=True), torch.load(tmp_path / "two.pt", weights_only=True)
    assert b["world"] == 2 and a["world"] == 1
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-12, atol=0)
    scale = max(g.abs().max() for g in a["grads"].values())
    encoder_grads = [n for n, g in a["grads"].items() if n.startswith("encoder.") and g.abs().max() > 0]
    assert len(encoder_grads) > 50  # the gradient reaches the encoder's parameters
    for name, g in a["grads"].items():
        # a parameter's own scale, floored: some gradients are zero in exact arithmetic (key
        # biases under softmax) and hold only rounding noise
        own = max(float(g.abs().max()), 1e-6 * float(scale))
        assert float((g - b["grads"][name]).abs().max()) <= 1e-5 * own, name


def test_fold_training_writes_a_checkpoint_whose_encoder_extracts_features(cohort, trained, tmp_path):
    sheet, coords = cohort
    fold = trained / "fold1"
    ckpt = torch.load(fold / "checkpoint.pt", weights_only=True)
    assert ckpt["model_name"] == "msamil.base" and ckpt["classes"] == ["a", "b"]
    assert ckpt["encoder_spec"]["name"] == "resnet18" and ckpt["encoder_spec"]["input_size"] == 32
    assert len(ckpt["history"]) == 3 and "optimizer" not in ckpt and not (fold / "resume.pt").exists()
    assert not (trained / "fold0").exists()  # only the fold asked for
    # the MIL part is an ordinary checkpoint
    from msamil_core.training.mil import load_checkpoint

    model, _ = load_checkpoint(fold / "checkpoint.pt")
    assert model.model_args["in_dim"] == 512
    # re-extraction with the tuned encoder gives other features than the initial encoder
    slide = sheet.parent / "s0.tiff"
    files = [coords / s / "s0.h5" for s in ("20x", "10x", "5x")]
    common = ["extract", "--slide", str(slide), "--coords", *map(str, files), "--workers", "0", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "frozen.pt"), *ENCODER]) == 0
    assert main([*common, "--out", str(tmp_path / "tuned.pt"), "--encoder-checkpoint", str(fold / "checkpoint.pt")]) == 0
    frozen, tuned = load_bag(tmp_path / "frozen.pt"), load_bag(tmp_path / "tuned.pt")
    assert tuned.features.shape == frozen.features.shape and (tuned.coords == frozen.coords).all()
    assert not torch.allclose(tuned.features, frozen.features, atol=1e-4)
    assert tuned.encoder != frozen.encoder and tuned.encoder.startswith("resnet18-")
    # the same tuned encoder, rebuilt in this process, gives the extracted features
    from msamil_core.training.e2e import encoder_spec_from_checkpoint
    from msamil_core.features.encoders import build_encoder

    encoder, _ = build_encoder(encoder_spec_from_checkpoint(fold / "checkpoint.pt"))
    with open_slide(slide, "s0") as s:
        x, y = tuned.coords[0].tolist()
        patch = torch.from_numpy(np.ascontiguousarray(s.read_patch(x, y, int(tuned.patch_size_level0[0]), 32)))
    with torch.no_grad():
        torch.testing.assert_close(encoder(patch.permute(2, 0, 1)[None])[0], tuned.features[0], rtol=1e-4, atol=1e-4)


def _resume_state(path: Path) -> tuple[int, int]:
    try:
        saved = torch.load(path, weights_only=True)
        return saved["engine"]["epoch"], saved["engine"]["position"]
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return -1, -1


def test_sigterm_mid_epoch_then_rerun_equals_an_uninterrupted_run(cohort, trained, tmp_path, caplog):
    sheet, coords = cohort
    args = e2e_args(sheet, coords, tmp_path / "cut", "--fold", "1", "--epochs", "3")  # as `trained`
    proc = msamil(*args)
    resume = tmp_path / "cut" / "fold1" / "resume.pt"
    start = time.time()
    while _resume_state(resume)[0] < 1:  # first epoch done: now in the second
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() - start < 300, "no resume checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "SIGTERM" in err
    epoch, position = _resume_state(resume)
    assert not (tmp_path / "cut" / "fold1" / "checkpoint.pt").exists()
    caplog.set_level(logging.INFO, logger="msamil_core.training.engine")
    assert main(args) == 0
    assert position > 0  # stopped mid-epoch
    assert f"resuming from {resume} at epoch {epoch}, step {position}" in caplog.text
    a = torch.load(trained / "fold1" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "fold1" / "checkpoint.pt", weights_only=True)
    def numbers(history):  # wall times differ between runs
        return [{k: v for k, v in record.items() if k != "seconds"} for record in history]

    assert a["epoch"] == b["epoch"] and numbers(a["history"]) == numbers(b["history"])
    for part in ("state_dict", "encoder_state_dict"):
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=0, atol=1e-6)


def test_k_study_writes_loss_curves(cohort, tmp_path):
    sheet, coords = cohort
    out = tmp_path / "study"
    assert main(e2e_args(sheet, coords, out, "--k-study", "2", "8", "--k-study-steps", "4", "--no-progress")) == 0
    import pandas as pd

    rows = pd.read_csv(out / "k_study.csv")
    assert sorted(rows["k"].unique()) == [2, 8] and (rows.groupby("k")["step"].count() == 4).all()
    assert np.isfinite(rows["loss"]).all()
    summary = pd.read_csv(out / "k_study_summary.csv")
    assert list(summary["k"]) == [2, 8] and (out / "k_study.png").stat().st_size > 1000
    assert np.isfinite(summary[["end_loss", "end_loss_kmax"]].to_numpy()).all()
    # at K = 8 both end losses score the same model on the same patches
    assert summary.loc[summary.k == 8, "end_loss"].item() == pytest.approx(summary.loc[summary.k == 8, "end_loss_kmax"].item())


def test_missing_coordinates_fail_before_training(cohort, tmp_path):
    sheet, coords = cohort
    with pytest.raises(MsamilError, match="coordinates file not found"):
        from msamil_core.cli import build_parser
        from msamil_core.cli import e2e as e2e_cmd

        e2e_cmd.run(build_parser("e2e").parse_args(e2e_args(sheet, tmp_path / "nowhere", tmp_path / "o", "--fold", "0")))
    with pytest.raises(MsamilError, match="not an e2e checkpoint"):
        from msamil_core.training.e2e import encoder_spec_from_checkpoint

        torch.save({"state_dict": {}}, tmp_path / "plain.pt")
        encoder_spec_from_checkpoint(tmp_path / "plain.pt")


def test_workflow_plans_e2e_per_fold_and_compares_on_the_same_folds(tmp_path):
    """Dry run of the e2e demo overlay (fold 0) and of the same run on folds 0 and 2: one e2e
    job per listed fold, re-extraction of every slide per fold into its own folder, the twin
    experiment only on those folds."""
    from test_workflow import planned_jobs, snakemake

    import yaml

    overlay = yaml.safe_load((REPO / "config" / "e2e-demo.yaml").read_text())
    assert overlay["e2e"][0]["folds"] == [0]
    overlay["e2e"][0]["folds"] = [0, 2]
    (tmp_path / "two_folds.yaml").write_text(yaml.safe_dump(overlay))
    dry = snakemake(tmp_path, "--cores", "2", "-n", "--configfile", str(tmp_path / "two_folds.yaml"))
    assert dry.returncode == 0, dry.stderr[-3000:]
    jobs = planned_jobs(dry.stdout)
    n_slides = jobs["preprocess_slide"]
    assert jobs["train_e2e"] == 2 and jobs["run_k_study"] == 1
    assert jobs["extract_e2e_features"] == 2 * n_slides
    repeats = overlay["training"]["repeats"]
    # each repeat: the frozen experiment on all folds, its e2e twin on folds 0 and 2
    assert jobs["train_fold"] == repeats * (5 + 2)
    for k in (0, 2):
        assert f"results/features/e2e-r18-fold{k}/demo_000.pt" in dry.stdout
        assert f"results/models/msamil_multiscale_e2e_r18/fold{k}/checkpoint.pt" in dry.stdout
    assert "e2e-r18-fold1" not in dry.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("e2e:\n  - {name: x, encoder: nope}\n")
    failed = snakemake(tmp_path, "--cores", "1", "-n", "--configfile", str(bad))
    assert failed.returncode != 0 and "encoder 'nope'" in failed.stderr + failed.stdout
