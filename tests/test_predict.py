"""`msamil predict`: the whole chain on new slides with a tiny trained experiment, the fold
ensemble and votes, reuse of per-slide outputs, the experiment's manifest obeyed (a flag that
contradicts it refused), and bad input (encoder mismatch, bad slide)."""

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
# what the tiny experiment was trained with (its manifest says so; given, these are only checked)
ENCODER = ["--encoder", "resnet18", "--input-size", "32", "--seed", "0"]
PREPROCESS = ["--long-side", "512", "--patch-size", str(PATCH)]
RUNTIME = ["--batch-size", "64", "--workers", "0", "--threads", "1", "--no-progress"]
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
    """Four demo slides taken through the chain by `msamil_core.pipeline.prepare_slide`, and an
    ABMIL experiment of two folds trained for two epochs on their bags, with its manifest."""
    from msamil_core.features.encoders import EncoderSpec, encoder_id
    from msamil_core.manifest import settings_record, write_manifest
    from msamil_core.pipeline import ExtractOptions, SlideFiles, SlideSettings, prepare_slide
    from msamil_core.settings import (EncoderSettings, FeatureSettings, PatchSettings, SplitSettings,
                                      ThumbnailSettings, TissueSettings, TrainConfig)
    from msamil_core.training.mil import BagDataset, train_fold

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny")
    encoder = EncoderSettings(name="resnet18", input_size=32, seed=0)
    spec = EncoderSpec.from_settings(encoder)
    enc = encoder_id(spec)
    thumbnail, patches = ThumbnailSettings(long_side=512), PatchSettings(patch_size=PATCH, strategy="tissue")
    settings = SlideSettings(encoder=spec, thumbnail=thumbnail, patches=patches,
                             extract=ExtractOptions(FeatureSettings(batch_size=64, workers=0), "cpu", False))
    results, features = root / "results", root / "results" / "features" / "tiny"
    rows, bags = [], []
    for i, label in enumerate(LABELS):
        tiff, geojson = demo_slide(root / "slides", i, label)
        sid = f"s{i}"
        rows.append({"slide_id": sid, "path": str(tiff), "label": label, "patient_id": f"p{i}", "annotation": str(geojson)})
        bags.append(prepare_slide(tiff, sid, None, settings, SlideFiles.under(results, sid, feature_dir=features), encoder=enc))
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
    record = settings_record("tiny_abmil", thumbnail=thumbnail, tissue=TissueSettings(), patches=patches,
                             encoder_key="tiny", encoder=encoder, fp16=False, feature_folder="tiny",
                             splits=SplitSettings(), training=cfg)
    write_manifest(record, [str(models / f"fold{k}" / "checkpoint.pt") for k in (0, 1)], models / "manifest.json")
    return {"root": root, "results": results, "features": features, "sheet": sheet, "models": models, "rows": rows,
            "classes": classes, "encoder": enc}


def _predict(exp, out: Path, *args: str, results: Path | None = None) -> int:
    """`msamil predict` reusing the tiny experiment's results (or another results folder)."""
    results = results or exp["results"]
    return main(["predict", "--models", str(exp["models"]), "--out", str(out), "--results", str(results),
                 "--features", str(results / "features" / "tiny"), *RUNTIME, *args])


def _files(directory: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


def test_predict_reuses_outputs_and_ensembles_the_folds(tiny_experiment, tmp_path):
    from msamil_core.training.mil import BagDataset, load_checkpoint, predict

    exp = tiny_experiment
    sheet = write_sheet(tmp_path / "new.csv", [{"slide_id": r["slide_id"], "path": r["path"]} for r in exp["rows"][:2]])
    before = _files(exp["results"])
    assert _predict(exp, tmp_path / "out", "--sheet", str(sheet)) == 0
    assert _files(exp["results"]) == before  # thumbnails, masks, coords and bags reused, none rewritten
    assert sorted(p.name for p in _files(tmp_path / "out")) == ["predictions.csv", "predictions.json"]  # none remade

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
    before = _files(exp["results"])
    out = tmp_path / "out"
    assert _predict(exp, out, "--slide", str(tiff), "--slide-id", "new one") == 0
    assert _files(exp["results"]) == before  # the cohort's folders are only read
    made = sorted(str(p.relative_to(out)) for p in _files(out))
    assert made == ["coords/10x/new one.h5", "coords/20x/new one.h5", "coords/5x/new one.h5", "features/new one.pt",
                    "predictions.csv", "predictions.json", "slides/new one/meta.json",
                    "slides/new one/thumbnail.png", "slides/new one/tissue_mask.png"]
    bag = torch.load(out / "features" / "new one.pt", weights_only=True)
    assert bag["encoder"] == exp["encoder"] and set(bag["scales"].tolist()) == {0, 1, 2}
    report = json.loads((out / "predictions.json").read_text())
    assert report["slides"][0]["slide_id"] == "new one" and len(report["slides"][0]["folds"]) == 2
    # a rerun reuses everything it made, from its own folder
    made_at = _files(out)
    assert _predict(exp, out, "--slide", str(tiff), "--slide-id", "new one") == 0
    assert {p: t for p, t in _files(out).items() if "predictions" not in p.name} == {
        p: t for p, t in made_at.items() if "predictions" not in p.name}


def test_another_file_under_a_cohort_slide_id_gets_its_own_features(tiny_experiment, tmp_path):
    """The sheet names cohort slide s0 but points at another file: it gets its own thumbnail,
    coordinates, bag and prediction (those of that file), never the cohort slide's; cohort
    slide s1, listed with its own file, is still reused."""
    from msamil_core.wsi.thumbnail import file_identity

    exp = tiny_experiment
    other, _ = demo_slide(tmp_path / "slides", 7, "bland_zonal")
    sheet = write_sheet(tmp_path / "new.csv", [{"slide_id": "s0", "path": str(other)},
                                               {"slide_id": "s1", "path": exp["rows"][1]["path"]}])
    before = _files(exp["results"])
    out = tmp_path / "out"
    assert _predict(exp, out, "--sheet", str(sheet), "--heatmaps", "--top-k", "2") == 0
    assert _files(exp["results"]) == before
    for sid in ("s0", "s1"):  # drawn on the thumbnail of each slide's own file
        assert (out / "heatmaps" / sid / "attention_combined.png").is_file()
    own, cohort = (torch.load(d / "s0.pt", weights_only=True) for d in (out / "features", exp["features"]))
    assert own["slide_digest"] == file_identity(other)["digest"] != cohort["slide_digest"]
    assert json.loads((out / "slides" / "s0" / "meta.json").read_text())["source"]["path"] == str(other.resolve())
    assert not (out / "features" / "s1.pt").exists() and not (out / "slides" / "s1").exists()  # s1 reused
    # s0's prediction is that file's, as predicted under an id of its own
    assert _predict(exp, tmp_path / "alone", "--slide", str(other), "--slide-id", "s7") == 0
    got = json.loads((out / "predictions.json").read_text())["slides"][0]["probabilities"]
    alone = json.loads((tmp_path / "alone" / "predictions.json").read_text())["slides"][0]["probabilities"]
    assert got == pytest.approx(alone, abs=1e-6)
    theirs = cohort["features"]
    assert theirs.shape != own["features"].shape or not torch.allclose(theirs, own["features"])


def test_flags_that_agree_with_the_manifest_change_nothing_and_others_are_refused(tiny_experiment, cmu_slide,
                                                                                 tmp_path, capsys):
    """The manifest decides every setting: on CMU-1-Small-Region, the same flags as it states give
    the same prediction as none; a flag that contradicts it (the input size the encoder id does not
    cover, the patch size, the strategy, ...) stops the run in one line naming both values."""
    exp = tiny_experiment
    tiff = str(cmu_slide)
    assert _predict(exp, tmp_path / "bare", "--slide", tiff, results=tmp_path / "none") == 0
    assert _predict(exp, tmp_path / "flags", "--slide", tiff, *PREPROCESS, *ENCODER, "--strategy", "tissue",
                    results=tmp_path / "none") == 0
    bare, flags = (json.loads((tmp_path / d / "predictions.json").read_text())["slides"][0] for d in ("bare", "flags"))
    assert bare["probabilities"] == flags["probabilities"]
    for flag, value, stated in (("--input-size", "224", "input_size 32"), ("--patch-size", "128", f"patch_size {PATCH}"),
                                ("--seed", "1", "encoder seed"), ("--strategy", "lesion", "strategy tissue"),
                                ("--long-side", "1024", "long_side 512"), ("--no-remove-pen", None, "remove_pen true")):
        capsys.readouterr()
        out = tmp_path / f"refused{flag}"
        code = _predict(exp, out, "--slide", tiff, flag, *([value] if value else []), results=tmp_path / "none")
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1, (flag, err)
        assert flag in err[0] and stated in err[0] and "manifest.json" in err[0], err[0]
        assert not out.exists()


def test_without_a_manifest_the_flags_are_used_with_a_warning(tiny_experiment, tmp_path, caplog):
    import shutil

    exp = tiny_experiment
    models = tmp_path / "models"
    shutil.copytree(exp["models"], models)
    (models / "manifest.json").unlink()
    tiff = exp["rows"][2]["path"]
    code = main(["predict", "--models", str(models), "--out", str(tmp_path / "out"), "--slide", tiff, *RUNTIME,
                 *PREPROCESS, *ENCODER])
    assert code == 0 and "has no manifest.json" in caplog.text
    assert _predict(exp, tmp_path / "with", "--slide", tiff, results=tmp_path / "none") == 0
    got, manifest = (json.loads((tmp_path / d / "predictions.json").read_text())["slides"][0]["probabilities"]
                     for d in ("out", "with"))
    assert got == manifest


def test_encoder_mismatch_names_both_and_writes_nothing(tiny_experiment, tmp_path, capsys):
    exp = tiny_experiment
    tiff = exp["rows"][0]["path"]

    # a reused bag of another encoder (what a wrong --features gives) is refused too
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    bag = torch.load(exp["features"] / "s0.pt", weights_only=True)
    bag["encoder"] = "uni-0123456789"
    torch.save(bag, foreign / "s0.pt")
    code = main(["predict", "--models", str(exp["models"]), "--out", str(tmp_path / "out"), "--slide", tiff,
                 "--slide-id", "s0", "--results", str(exp["results"]), "--features", str(foreign), *RUNTIME])
    err = capsys.readouterr().err
    assert code == 1 and "uni-0123456789" in err and exp["encoder"] in err and "checkpoint.pt" in err
    # its row says why; no file of the slide is written
    (row,) = csv.DictReader(open(tmp_path / "out" / "predictions.csv"))
    assert row["predicted"] == "" and "uni-0123456789" in row["note"]
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["predictions.csv", "predictions.json"]


def test_a_slide_that_fails_gets_its_reason_and_the_others_their_predictions(tiny_experiment, blank_slide, tmp_path,
                                                                              capsys, caplog):
    exp = tiny_experiment
    tiff, _ = demo_slide(tmp_path / "slides", 5, "bland_zonal")
    sheet = write_sheet(tmp_path / "new.csv", [{"slide_id": "glass", "path": str(blank_slide)},
                                               {"slide_id": "good", "path": str(tiff)}])
    out = tmp_path / "out"
    # every bag is "small" here: the good slide is classified and flagged
    assert _predict(exp, out, "--sheet", str(sheet), "--min-patches", "100000") == 0
    err = caplog.text
    assert "'glass'" in err and "no tissue" in err and str(exp["models"] / "fold0" / "checkpoint.pt") in err
    table = {row["slide_id"]: row for row in csv.DictReader(open(out / "predictions.csv"))}
    assert list(table) == ["glass", "good"]
    assert table["glass"]["predicted"] == "" and "no tissue" in table["glass"]["note"]
    assert table["good"]["predicted"] in exp["classes"] and int(table["good"]["patches"]) > 0
    assert "fewer than 100000" in table["good"]["note"] and "fewer than 100000" in err
    report = json.loads((out / "predictions.json").read_text())
    assert [s["predicted"] is None for s in report["slides"]] == [True, False]
    leftovers = [str(p.relative_to(out)) for p in out.rglob("*") if "glass" in p.name or p.name.startswith(".")]
    assert leftovers == []  # no file of the failed slide, no staging folder
    # no slide classified at all: the tables are written and the command fails in one line
    only = write_sheet(tmp_path / "glass.csv", [{"slide_id": "glass", "path": str(blank_slide)}])
    assert _predict(exp, tmp_path / "none", "--sheet", str(only)) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("msamil predict: error: no slide could be classified") and "'glass'" in last
    assert (tmp_path / "none" / "predictions.csv").exists()


def test_the_manifest_records_each_folds_temperature_and_its_scaling_setting(tiny_experiment):
    from msamil_core.errors import MsamilError
    from msamil_core.manifest import write_manifest

    models = tiny_experiment["models"]
    data = json.loads((models / "manifest.json").read_text())
    assert [r["temperature"] for r in data["runs"]] == [1.0, 1.0] and data["training"]["temperature_scaling"] is False
    # settings that say temperature scaling do not describe checkpoints trained without it
    settings = {k: data[k] for k in ("experiment", "thumbnail", "tissue", "patches", "features", "splits", "task",
                                     "relations")}
    settings["encoder"] = {"key": data["encoder"]["key"], **data["encoder"]["settings"]}
    settings["training"] = {**data["training"], "temperature_scaling": True}
    with pytest.raises(MsamilError, match="temperature_scaling False differs"):
        write_manifest(settings, [str(models / f"fold{k}" / "checkpoint.pt") for k in (0, 1)], models / "other.json")
    assert not (models / "other.json").exists()
