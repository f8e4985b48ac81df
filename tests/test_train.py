"""Training, evaluation and the report on bring-your-own bags; resume after SIGKILL/SIGTERM; DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from msamil_core.features.bags import Bag, save_bag
from msamil_core.cli import main
from msamil_core.errors import MsamilError
from msamil_core.runtime import claim_free
from msamil_core.training.engine import lr_at
from msamil_core.training.mil import epoch_order

DIM = 16


def make_cohort(root: Path, n: int = 24, dim: int = DIM, seed: int = 0) -> tuple[Path, Path]:
    """Bags whose label is carried by a few instances (a planted signal), and their sheet."""
    rng = np.random.default_rng(seed)
    rows = ["slide_id,path,label,patient_id"]
    for i in range(n):
        label = i % 2
        m = int(rng.integers(12, 30))
        feats = torch.from_numpy(rng.normal(size=(m, dim)).astype(np.float32))
        if label:
            feats[:4, :4] += 2.5
        save_bag(root / "bags" / f"s{i}.pt", Bag(
            features=feats, coords=torch.from_numpy(rng.integers(0, 4000, (m, 2))), scales=torch.from_numpy(rng.integers(0, 3, m)),
            patch_size_level0=torch.full((m,), 256), slide_id=f"s{i}", encoder="synthetic"))
        patient = f"p{i % 4}" if i < 4 else f"p{i}"  # two patients with two slides each
        rows.append(f"s{i},s{i}.svs,{'tumor' if label else 'normal'},{patient}")
    sheet = root / "sheet.csv"
    sheet.write_text("\n".join(rows) + "\n")
    return root / "bags", sheet


def msamil(*args, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "msamil_core", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def test_learning_rate_schedule():
    lrs = [lr_at(s, 100, 10, 1e-3, 1e-5) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))  # warm-up rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine falls
    assert lrs[-1] == pytest.approx(1e-5, abs=2e-6)


def test_balanced_sampling_evens_out_classes():
    labels = np.array([0] * 90 + [1] * 10)
    plain = epoch_order(labels, 0, 0, "loss")
    assert sorted(plain) == list(range(100))
    counts = np.bincount(labels[np.concatenate([epoch_order(labels, e, 0, "sampling") for e in range(20)])])
    assert 0.8 < counts[1] / counts[0] < 1.25


def test_train_evaluate_report_without_snakemake(tmp_path):
    bags, sheet = make_cohort(tmp_path)
    out = tmp_path / "models" / "abmil"
    assert main(["train", "--features", str(bags), "--sheet", str(sheet), "--out", str(out), "--n-folds", "3",
                 "--model", "abmil.base", "--epochs", "12", "--grad-accum", "2", "--lr", "1e-3", "--threads", "1"]) == 0
    assert (out / "folds.csv").exists()
    assert main(["evaluate", "--features", str(bags), "--sheet", str(sheet), "--folds", str(out / "folds.csv"),
                 "--models", str(out), "--threads", "1"]) == 0
    aucs = []
    for k in range(3):
        ckpt = torch.load(out / f"fold{k}" / "checkpoint.pt", weights_only=True)
        assert ckpt["classes"] == ["normal", "tumor"] and ckpt["model_name"] == "abmil.base"
        assert ckpt["model_args"]["in_dim"] == DIM and "optimizer" not in ckpt
        assert not (out / f"fold{k}" / "resume.pt").exists()
        metrics = json.loads((out / f"fold{k}" / "metrics.json").read_text())
        aucs.append(metrics["auc"])
        preds = (out / f"fold{k}" / "predictions.csv").read_text().splitlines()
        assert preds[0] == "slide_id,label,predicted,prob_normal,prob_tumor" and len(preds) == metrics["n_slides"] + 1
    assert np.mean(aucs) > 0.8  # the planted signal is learnt
    assert main(["report", "--experiment", f"abmil={out}", "--out-dir", str(tmp_path / "report")]) == 0
    html = (tmp_path / "report" / "index.html").read_text()
    assert "abmil" in html and "roc.png" in html
    assert (tmp_path / "report" / "summary.csv").read_text().startswith("experiment,metric,mean,sd,n_folds")

    # train --evaluate (the workflow's train_fold): the same predictions as the separate evaluate
    again = tmp_path / "models" / "abmil_again"
    assert main(["train", "--features", str(bags), "--sheet", str(sheet), "--out", str(again), "--folds",
                 str(out / "folds.csv"), "--fold", "1", "--model", "abmil.base", "--epochs", "12", "--grad-accum", "2",
                 "--lr", "1e-3", "--threads", "1", "--evaluate"]) == 0
    assert (again / "fold1" / "predictions.csv").read_text() == (out / "fold1" / "predictions.csv").read_text()
    metrics = json.loads((again / "fold1" / "metrics.json").read_text())
    assert metrics["auc"] == json.loads((out / "fold1" / "metrics.json").read_text())["auc"]
    assert metrics["inference_seconds"] > 0
    assert "inference_seconds" not in (tmp_path / "report" / "summary.csv").read_text()


def _resume_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["epoch"])
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1


def _train_args(bags, sheet, out, epochs):
    return ["train", "--features", bags, "--sheet", sheet, "--out", out, "--n-folds", "3", "--fold", "0",
            "--model", "abmil.base", "--epochs", epochs, "--patience", "0", "--grad-accum", "2", "--threads", "1"]


def _wait_for_epoch(proc, resume: Path, epoch: int, timeout: float = 120):
    start = time.time()
    while _resume_epoch(resume) < epoch:
        if proc.poll() is not None:
            pytest.fail(f"training ended before epoch {epoch} was saved: {proc.stderr.read()[-2000:]}")
        if time.time() - start > timeout:
            proc.kill()
            pytest.fail("no resume checkpoint appeared")
        time.sleep(0.02)


def test_sigkill_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path):
    bags, sheet = make_cohort(tmp_path, n=30)
    epochs = 60
    whole = msamil(*_train_args(bags, sheet, tmp_path / "whole", epochs))
    assert whole.wait(timeout=600) == 0, whole.stderr.read()
    killed = msamil(*_train_args(bags, sheet, tmp_path / "killed", epochs))
    resume = tmp_path / "killed" / "fold0" / "resume.pt"
    _wait_for_epoch(killed, resume, 2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    stopped_at = _resume_epoch(resume)
    assert 2 <= stopped_at < epochs and not (tmp_path / "killed" / "fold0" / "checkpoint.pt").exists()
    rerun = msamil(*_train_args(bags, sheet, tmp_path / "killed", epochs))
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    assert f"resuming from {resume} at epoch {stopped_at}" in err
    assert "epoch 0:" not in err  # it did not start over
    a = torch.load(tmp_path / "whole" / "fold0" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "fold0" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"]
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=1e-6)


def test_sigterm_writes_a_checkpoint_before_exiting(tmp_path):
    bags, sheet = make_cohort(tmp_path, n=30)
    proc = msamil(*_train_args(bags, sheet, tmp_path / "m", 200))
    resume = tmp_path / "m" / "fold0" / "resume.pt"
    _wait_for_epoch(proc, resume, 1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert "SIGTERM" in err
    saved = torch.load(resume, weights_only=True)
    assert saved["epoch"] >= 1 and "optimizer" in saved and "engine" in saved


def test_ddp_with_an_odd_number_of_bags_equals_one_process(tmp_path):
    """torchrun, gloo, 2 ranks, 7 bags, grad_accum 2, dsmil.base (with buffers), float64: training
    finishes, and its weights equal one process's with grad_accum 4 on the same bags in the same
    order (the ranks' shares of each step add up to that step)."""
    from ddp_mil import main as train

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    train(str(tmp_path / "one.pt"), 4)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          "29533", str(Path(__file__).with_name("ddp_mil.py")), str(tmp_path / "two.pt"), "2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt", weights_only=True), torch.load(tmp_path / "two.pt", weights_only=True)
    assert a["world"] == 1 and b["world"] == 2 and len(a["history"]) == len(b["history"]) == 3
    for name, weight in a["state_dict"].items():
        other = b["state_dict"][name]
        assert weight.dtype == torch.float64
        scale = max(float(weight.abs().max()), 1e-12)
        assert float((weight - other).abs().max()) <= 1e-5 * scale, name
    # training moved the weights (a model that never stepped would pass the comparison too), and
    # the epoch losses, gathered over both ranks, are the one process's
    assert a["history"][0]["train_loss"] != a["history"][-1]["train_loss"]
    for x, y in zip(a["history"], b["history"]):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-9)


def test_torchrun_ddp_on_cpu(tmp_path):
    bags, sheet = make_cohort(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517", "-m", "msamil_core",
         *map(str, _train_args(bags, sheet, out, 6))], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "fold0" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] >= 0 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_bad_inputs_fail_before_training(tmp_path):
    bags, sheet = make_cohort(tmp_path)
    base = ["train", "--features", str(bags), "--sheet", str(sheet), "--out", str(tmp_path / "o"), "--n-folds", "3", "--epochs", "1"]
    with pytest.raises(MsamilError, match="not among the configured classes"):
        from msamil_core.cli import train as train_cmd
        from msamil_core.cli import build_parser

        train_cmd.run(build_parser("train").parse_args(base + ["--classes", "normal", "other"]))
    # one bag with another feature width
    save_bag(bags / "s5.pt", Bag(features=torch.zeros(3, DIM + 1), coords=torch.zeros(3, 2, dtype=torch.long),
                                 scales=torch.zeros(3, dtype=torch.long), patch_size_level0=torch.full((3,), 256),
                                 slide_id="s5", encoder="other"))
    proc = msamil(*base, "--fold", "0")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "s5.pt" in err and f"{DIM + 1} features" in err
    assert not (tmp_path / "o" / "fold0" / "checkpoint.pt").exists()


def test_each_process_claims_its_own_gpu_until_it_exits(tmp_path):
    """resolve_device's GPU claim: N jobs on N GPUs get N different ones, and a killed job's
    GPU is free again."""
    keys = ["gpu-a", "gpu-b"]
    claim = f"from msamil_core.runtime import claim_free; print(claim_free({keys!r}, {str(tmp_path)!r}), flush=True)"

    def other_process() -> str:
        return subprocess.run([sys.executable, "-c", claim], capture_output=True, text=True, check=True).stdout.strip()

    assert claim_free(keys, tmp_path) == 0
    assert claim_free(keys, tmp_path) == 0  # a process keeps its GPU
    holder = subprocess.Popen([sys.executable, "-c", claim + "; import time; time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "1"
        assert other_process() == "None"  # both taken
    finally:
        holder.kill()
        holder.wait()
    assert other_process() == "1"  # released by SIGKILL


def test_a_bag_without_patches_is_left_out_of_training_and_listed_in_evaluation(tmp_path, caplog):
    bags, sheet = make_cohort(tmp_path, n=12)
    empty = torch.zeros((0, DIM))
    for sid in ("s1", "s6"):  # a slide whose lesion kept no patch: an empty bag
        save_bag(bags / f"{sid}.pt", Bag(features=empty, coords=torch.zeros((0, 2), dtype=torch.int64),
                                         scales=torch.zeros(0, dtype=torch.int64),
                                         patch_size_level0=torch.zeros(0, dtype=torch.int64), slide_id=sid,
                                         encoder="synthetic"))
    out = tmp_path / "models"
    assert main(["train", "--features", str(bags), "--sheet", str(sheet), "--out", str(out), "--n-folds", "3",
                 "--model", "abmil.base", "--epochs", "2", "--threads", "1", "--evaluate"]) == 0
    left = {}
    for k in range(3):
        metrics = json.loads((out / f"fold{k}" / "metrics.json").read_text())
        left.update(metrics.get("left_out", {}))
        preds = (out / f"fold{k}" / "predictions.csv").read_text()
        assert "s1," not in preds and "s6," not in preds
    assert sorted(left) == ["s1", "s6"] and all("no patch at 20x+10x+5x" in r for r in left.values())


def test_classifier_is_kept_only_for_the_same_classes(tmp_path):
    from msamil_core.training.mil import transfers_classifier

    torch.save({"model_name": "abmil.base", "classes": ["bland", "atypical"], "state_dict": {}}, tmp_path / "c.pt")
    assert transfers_classifier(tmp_path / "c.pt", ["bland", "atypical"]) is True
    assert transfers_classifier(tmp_path / "c.pt", ["alternating", "zonal"]) is False  # same count, other task
    torch.save({"weight": torch.zeros(2)}, tmp_path / "w.pt")  # a plain weights file: its shapes decide
    assert transfers_classifier(tmp_path / "w.pt", ["a", "b"]) is True


def test_fit_temperature_recovers_a_known_temperature():
    from msamil_core.training.calibration import fit_temperature, probabilities

    gen = torch.Generator().manual_seed(0)
    true_logits = 2.0 * torch.randn(5000, 3, generator=gen, dtype=torch.float64)
    labels = torch.multinomial(true_logits.softmax(-1), 1, generator=gen)[:, 0]
    for t in (0.5, 2.5):  # under- and overconfident models: their logits are the true ones times T
        assert fit_temperature(true_logits * t, labels) == pytest.approx(t, rel=0.05)
    z = torch.randn(4, 3, generator=gen)
    assert torch.allclose(probabilities(z, 2.0), (z / 2.0).softmax(-1))
    assert torch.equal(probabilities(z), z.softmax(-1))


def test_temperature_scaling_is_fitted_stored_and_used_by_evaluation_and_predict(tmp_path):
    from msamil_core.manifest import Manifest
    from msamil_core.prediction import check_manifest_models, fold_probabilities, load_fold_models
    from msamil_core.training.calibration import checkpoint_temperature

    bags, sheet = make_cohort(tmp_path)
    models = tmp_path / "models"
    base = ["train", "--features", bags, "--sheet", sheet, "--fold", "0", "--model", "abmil.base",
            "--epochs", "6", "--grad-accum", "2", "--lr", "1e-3", "--threads", "1", "--evaluate"]
    assert main([*map(str, base), "--out", str(models / "plain"), "--n-folds", "3"]) == 0
    assert main([*map(str, base), "--out", str(models / "scaled"), "--folds", str(models / "plain" / "folds.csv"),
                 "--temperature-scaling"]) == 0
    plain, scaled = (torch.load(models / n / "fold0" / "checkpoint.pt", weights_only=True) for n in ("plain", "scaled"))
    assert plain["temperature"] == 1.0 and scaled["config"]["temperature_scaling"] is True
    t = scaled["temperature"]
    assert t > 0 and t != 1.0
    assert all(torch.equal(plain["state_dict"][k], scaled["state_dict"][k]) for k in plain["state_dict"])

    # evaluation: softmax(logits / T) of the same model; predicted classes, accuracy and AUC unchanged
    m_plain, m_scaled = (json.loads((models / n / "fold0" / "metrics.json").read_text()) for n in ("plain", "scaled"))
    assert m_scaled["temperature"] == t and "temperature" not in m_plain
    for key in ("auc", "accuracy", "balanced_accuracy"):
        assert m_scaled[key] == pytest.approx(m_plain[key])
    assert m_scaled["ece"] != m_plain["ece"] and m_scaled["loss"] != m_plain["loss"]
    import pandas as pd

    p_plain, p_scaled = (pd.read_csv(models / n / "fold0" / "predictions.csv") for n in ("plain", "scaled"))
    assert p_plain["predicted"].tolist() == p_scaled["predicted"].tolist()
    logits = torch.logit(torch.tensor(p_plain["prob_tumor"].to_numpy()))  # binary: logit(p1) = z1 - z0
    np.testing.assert_allclose(p_scaled["prob_tumor"], torch.sigmoid(logits / t).numpy(), atol=1e-5)

    # predict: each fold's probabilities at its temperature, and a manifest stating another one stops it
    (fold,) = load_fold_models(models / "scaled", "cpu", [0])
    (unscaled,) = load_fold_models(models / "plain", "cpu", [0])
    assert fold.temperature == t and unscaled.temperature == 1.0
    bag = bags / f"{p_plain['slide_id'][0]}.pt"
    z = torch.logit(torch.tensor(fold_probabilities([unscaled], bag, "s", "cpu")[0, 1]), eps=None)
    assert fold_probabilities([fold], bag, "s", "cpu")[0, 1] == pytest.approx(float(torch.sigmoid(z / t)), abs=1e-6)
    manifest = Manifest(models / "scaled" / "manifest.json", {
        "classes": ["normal", "tumor"], "encoder": {"id": "synthetic"},
        "runs": [{"repeat": 0, "fold": 0, "temperature": 1.0}]})
    with pytest.raises(MsamilError, match="temperature"):
        check_manifest_models(manifest, [fold])
    manifest.data["runs"][0]["temperature"] = t
    check_manifest_models(manifest, [fold])
    with pytest.raises(MsamilError, match="holds no temperature"):
        checkpoint_temperature({k: v for k, v in scaled.items() if k != "temperature"}, "fold0")
