"""`msamil predict`: the whole chain on new slides with a tiny trained experiment, the fold
ensemble and votes, reuse of per-slide outputs, and bad input (encoder mismatch, bad slide)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_pyramid_tiff
from msamil_core.cli import main

PATCH = 64  # level-0 px of a 20x patch: demo slides of 32 x 24 patches = 2048 x 1536 px
ENCODER = ["--encoder", "resnet18", "--input-size", "32", "--seed", "0"]
PREPROCESS = ["--long-side", "512", "--patch-size", str(PATCH), "--batch-size", "64", "--workers", "0",
              "--threads", "1", "--no-progress"]
LABELS = ["bland_zonal", "atypical_alternating", "bland_zonal", "atypical_alternating"]


def demo_slide(directory: Path, index: int, label: str) -> tuple[Path, Path]:
    """A demo slide (pyramid TIFF) and its lesion annotation (GeoJSON)."""
    from msamil_core.cohort.demo import lesion_geojson, render_slide

    slide = render_slide(index, label, seed=0, patch_size=PATCH)
    tiff = write_pyramid_tiff(directory / f"s{index}.tiff", slide.rgb)
    geojson = directory / f"s{index}.geojson"
    geojson.write_text(json.dumps(lesion_geojson(slide.lesion_polygons)))
    return tiff, geojson


def write_sheet(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tiny_experiment(tmp_path_factory):
    """Four demo slides taken through the chain by `msamil_core.inference.prepare_slide`, and an
    ABMIL experiment of two folds trained for two epochs on their bags."""
    from msamil_core.features.encoders import EncoderSpec, encoder_id
    from msamil_core.inference import Preprocess, SlideFiles, prepare_slide
    from msamil_core.training.mil import BagDataset, TrainConfig, train_fold

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny")
    spec = EncoderSpec("resnet18", input_size=32, seed=0)
    enc = encoder_id(spec)
    settings = Preprocess(encoder=spec, long_side=512, patch_size=PATCH, batch_size=64, workers=0, device="cpu",
                          progress=False)
    results, features = root / "results", root / "results" / "features" / "tiny"
    rows, bags = [], []
    for i, label in enumerate(LABELS):
        tiff, geojson = demo_slide(root / "slides", i, label)
        sid = f"s{i}"
        rows.append({"slide_id": sid, "path": str(tiff), "label": label, "patient_id": f"p{i}", "annotation": str(geojson)})
        bags.append(prepare_slide(tiff, sid, None, settings, SlideFiles.under(results, features, sid), enc))
    sheet = write_sheet(root / "sheet.csv", rows)
    classes = sorted(set(LABELS))
    y = [classes.index(label) for label in LABELS]
    cfg = TrainConfig(model="abmil.base", model_args={"embed_dim": 32, "attn_dim": 16}, epochs=2, grad_accum=1,
                      patience=0, lr=1e-3)
    models = root / "models" / "tiny_abmil"
    for k, train in enumerate(([0, 1, 2], [1, 2, 3])):
        ids = [f"s{i}" for i in train]
        train_set = BagDataset([bags[i] for i in train], ids, [y[i] for i in train], cfg.scales, train=True)
        val_set = BagDataset([bags[i] for i in train], ids, [y[i] for i in train], cfg.scales)
        train_fold(cfg, train_set, val_set, classes, 512, models / f"fold{k}", torch.device("cpu"), encoder=enc,
                   run_config={"name": "tiny_abmil", "model": cfg.model, "scales": cfg.scales})
    return {"root": root, "results": results, "features": features, "sheet": sheet, "models": models, "rows": rows,
            "classes": classes, "encoder": enc}


def _predict(exp, out: Path, *args: str, results: Path | None = None) -> int:
    return main(["predict", "--models", str(exp["models"]), "--out", str(out), "--results", str(results or exp["results"]),
                 "--features", str((results / "features" / "tiny") if results else exp["features"]),
                 *PREPROCESS, *ENCODER, *args])


def _files(directory: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


def test_predict_reuses_outputs_and_ensembles_the_folds(tiny_experiment, tmp_path):
    from msamil_core.training.mil import BagDataset, load_checkpoint, predict

    exp = tiny_experiment
    sheet = write_sheet(tmp_path / "new.csv", [{"slide_id": r["slide_id"], "path": r["path"]} for r in exp["rows"][:2]])
    before = _files(exp["results"])
    assert _predict(exp, tmp_path / "out", "--sheet", str(sheet)) == 0
    assert _files(exp["results"]) == before  # thumbnails, masks, coords and bags reused, none rewritten

    report = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert report["classes"] == exp["classes"] and report["encoder"] == exp["encoder"]
    assert [s["slide_id"] for s in report["slides"]] == ["s0", "s1"]
    table = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    for record, row in zip(report["slides"], table):
        per_fold = np.array([[f["probabilities"][c] for c in exp["classes"]] for f in record["folds"]])
        mean = per_fold.mean(0)
        np.testing.assert_allclose([record["probabilities"][c] for c in exp["classes"]], mean, atol=1e-9)
        assert record["predicted"] == exp["classes"][int(mean.argmax())] == row["predicted"]
        votes = [exp["classes"][i] for i in per_fold.argmax(1)]
        assert [f["vote"] for f in record["folds"]] == votes == [row["fold0"], row["fold1"]]
        assert sum(record["votes"].values()) == 2 and record["votes"][votes[0]] >= 1
        np.testing.assert_allclose([float(row[f"prob_{c}"]) for c in exp["classes"]], mean, atol=1e-5)
        # each fold's probabilities are those `msamil evaluate`'s code path gives
        for k, fold in enumerate(record["folds"]):
            model, ckpt = load_checkpoint(exp["models"] / f"fold{k}" / "checkpoint.pt")
            ds = BagDataset([exp["features"] / f"{record['slide_id']}.pt"], [record["slide_id"]], [0], ckpt["config"]["scales"],
                            norm=ckpt["feature_norm"])
            probs, _ = predict(model, ds, torch.device("cpu"))
            np.testing.assert_allclose(probs[0], [fold["probabilities"][c] for c in exp["classes"]], atol=1e-6)


def test_predict_runs_the_whole_chain_on_a_new_slide(tiny_experiment, tmp_path):
    exp = tiny_experiment
    tiff, _ = demo_slide(tmp_path / "slides", 7, "bland_zonal")
    results = tmp_path / "results"
    assert _predict(exp, tmp_path / "out", "--slide", str(tiff), "--slide-id", "new one", results=results) == 0
    made = sorted(str(p.relative_to(results)) for p in _files(results))
    assert made == ["coords/10x/new one.h5", "coords/20x/new one.h5", "coords/5x/new one.h5", "features/tiny/new one.pt",
                    "slides/new one/meta.json", "slides/new one/thumbnail.png", "slides/new one/tissue_mask.png"]
    bag = torch.load(results / "features" / "tiny" / "new one.pt", weights_only=True)
    assert bag["encoder"] == exp["encoder"] and set(bag["scales"].tolist()) == {0, 1, 2}
    report = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert report["slides"][0]["slide_id"] == "new one" and len(report["slides"][0]["folds"]) == 2


def test_encoder_mismatch_names_both_and_writes_nothing(tiny_experiment, tmp_path, capsys):
    exp = tiny_experiment
    tiff = exp["rows"][0]["path"]
    other = ["--encoder", "resnet18", "--input-size", "32", "--seed", "1"]
    code = main(["predict", "--models", str(exp["models"]), "--out", str(tmp_path / "out"), "--slide", tiff,
                 "--results", str(tmp_path / "results"), *PREPROCESS, *other])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "encoder mismatch" in err[0]
    assert exp["encoder"] in err[0] and "resnet18-" in err[0].replace(exp["encoder"], "")
    assert not (tmp_path / "out").exists() and not (tmp_path / "results").exists()

    # a reused bag of another encoder (what a wrong --features gives) is refused too
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    bag = torch.load(exp["features"] / "s0.pt", weights_only=True)
    bag["encoder"] = "uni-0123456789"
    torch.save(bag, foreign / "s0.pt")
    code = main(["predict", "--models", str(exp["models"]), "--out", str(tmp_path / "out"), "--slide", tiff,
                 "--slide-id", "s0", "--results", str(exp["results"]), "--features", str(foreign), *PREPROCESS, *ENCODER])
    err = capsys.readouterr().err
    assert code == 1 and "uni-0123456789" in err and exp["encoder"] in err and "checkpoint.pt" in err
    assert not (tmp_path / "out").exists()


def test_a_slide_that_fails_names_slide_and_checkpoint_and_leaves_nothing(tiny_experiment, blank_slide, tmp_path, capsys):
    exp = tiny_experiment
    sheet = write_sheet(tmp_path / "new.csv", [{"slide_id": "s0", "path": exp["rows"][0]["path"]},
                                               {"slide_id": "glass", "path": str(blank_slide)}])
    results = tmp_path / "results"
    code = _predict(exp, tmp_path / "out", "--sheet", str(sheet), results=results)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "'glass'" in err[0] and "no tissue" in err[0] and str(exp["models"] / "fold0" / "checkpoint.pt") in err[0]
    assert not (tmp_path / "out").exists()
    leftovers = [str(p.relative_to(results)) for p in results.rglob("*") if "glass" in p.name or p.name.startswith(".")]
    assert leftovers == []  # no file of the failed slide, no staging folder
    assert (results / "features" / "tiny" / "s0.pt").exists()  # the good slide before it is kept
