"""Lesion segmentation: synthetic annotated thumbnails -> segment-train -> checkpoint -> segment."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from msamil_core.wsi.annotations import fill_polygons
from msamil_core.errors import MsamilError
from msamil_core.fileio import write_json
from msamil_core.features.weights import load_weights
from msamil_core.segmentation.model import build_model, load_segmentation_checkpoint
from msamil_core.segmentation.postprocess import postprocess
from msamil_core.settings import PostProcessSettings, SegmentationSettings
from msamil_core.segmentation.training import dice_bce_loss, mask_scores, split_patients
from msamil_core.wsi.masks import load_mask, save_mask, save_rgb_png

DS = 32  # level-0 px per thumbnail px
W, H = 64, 48  # thumbnail px, also the network input: no resampling blur on these small lesions
# Small and fast on a CPU: the synthetic lesions differ from the tissue by colour.
EPOCHS = 15
TRAIN_ARGS = [
    "--encoder",
    "resnet18",
    "--encoder-depth",
    "3",
    "--decoder-channels",
    "32",
    "16",
    "8",
    "--input-size",
    "64",
    "--crop-size",
    "0",
    "--epochs",
    str(EPOCHS),
    "--batch-size",
    "2",
    "--lr",
    "1e-2",
    "--holdout-fraction",
    "0.2",
    "--val-fraction",
    "0.2",
    "--threads",
    "1",
]


def blob(rng, centre, radius, n=20):
    """Closed wobbly outline [n, 2] around ``centre`` (thumbnail px)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = radius * (1 + 0.15 * np.sin(3 * t + rng.uniform(0, 6)))
    return np.stack([centre[0] + r * np.cos(t), centre[1] + r * np.sin(t)], 1)


def make_slide(rng, slide_dir, slide_id, annotation_path=None):
    """Thumbnail (pink tissue on white, purple lesions), meta.json, tissue mask; returns the true lesion."""
    yy, xx = np.mgrid[:H, :W] + 0.5
    cx, cy = W / 2 + rng.uniform(-4, 4), H / 2 + rng.uniform(-3, 3)
    tissue = ((xx - cx) / (0.42 * W)) ** 2 + ((yy - cy) / (0.42 * H)) ** 2 < 1
    rgb = rng.normal(242, 3, (H, W, 3))
    rgb[tissue] = np.array([225, 140, 185]) + rng.normal(0, 10, (tissue.sum(), 3))
    polygons = []
    for k in range(rng.integers(1, 3)):
        centre = (cx + rng.uniform(-10, 10), cy + rng.uniform(-6, 6))
        rings = [blob(rng, centre, rng.uniform(6, 9))]
        if k == 0 and rng.random() < 0.5:
            rings.append(blob(rng, centre, 2.5)[::-1])  # a hole of stroma inside the lesion
        polygons.append(rings)
    lesion = fill_polygons(polygons, (W, H)) & tissue
    rgb[lesion] = np.array([120, 50, 150]) + rng.normal(0, 10, (lesion.sum(), 3))
    slide_dir.mkdir(parents=True, exist_ok=True)
    save_rgb_png(slide_dir / "thumbnail.png", np.clip(rgb, 0, 255).astype(np.uint8))
    save_mask(slide_dir / "tissue_mask.png", tissue)
    write_json(
        slide_dir / "meta.json",
        {"slide_id": slide_id, "width": W * DS, "height": H * DS, "thumbnail": {"width": W, "height": H}},
    )
    if annotation_path is not None:
        features = [
            {
                "type": "Feature",
                "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
                "geometry": {"type": "Polygon", "coordinates": [(np.vstack([r, r[:1]]) * DS).tolist() for r in rings]},
            }
            for rings in polygons
        ]
        write_json(annotation_path, {"type": "FeatureCollection", "features": features})
    return lesion, tissue


def run_command(name, argv):
    """Run ``msamil <name>`` in-process, single-threaded (small tensors: threads only contend)."""
    import importlib

    if name == "segment":
        argv = [*argv, "--threads", "1"]

    module = importlib.import_module(f"msamil_core.cli.{name}")
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    module.run(parser.parse_args(argv))


def segment(ckpt, slide_dir, out, *extra):
    """``msamil segment`` on the thumbnail and tissue mask in ``slide_dir``."""
    argv = ["--checkpoint", str(ckpt), "--thumbnail", str(slide_dir / "thumbnail.png")]
    run_command("segment", [*argv, "--tissue-mask", str(slide_dir / "tissue_mask.png"), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Ten annotated synthetic slides (eight patients), trained once for the tests below."""
    root = tmp_path_factory.mktemp("seg")
    rng = np.random.default_rng(0)
    rows = ["slide_id,path,label,patient_id,annotation"]
    truth = {}
    for i in range(10):
        sid = f"s{i:02d}"
        truth[sid] = make_slide(rng, root / "slides" / sid, sid, root / "ann" / f"{sid}.geojson")
        rows.append(f"{sid},{sid}.tiff,a,p{min(i, 7)},ann/{sid}.geojson")  # p7 has three slides
    (root / "sheet.csv").write_text("\n".join(rows) + "\n")
    ckpt = root / "model" / "checkpoint.pt"
    run_command(
        "segment_train",
        ["--sheet", str(root / "sheet.csv"), "--slides-dir", str(root / "slides"), "--out", str(ckpt), *TRAIN_ARGS,
         "--probabilities-dir", str(root / "probabilities")],
    )
    return root, ckpt, truth, rng


def test_training_reaches_a_good_held_out_iou(trained):
    root, ckpt, truth, _ = trained
    metrics = json.loads((ckpt.parent / "metrics.json").read_text())
    held = metrics["splits"]["holdout"]
    assert held and not set(held) & set(metrics["splits"]["train"])
    # Chance level: calling all tissue lesion.
    chance = np.mean([mask_scores(truth[s][1], truth[s][0])[0] for s in held])
    assert metrics["holdout"]["iou"] > max(0.6, chance + 0.3), (metrics["holdout"], chance)
    assert metrics["val"]["iou"] is not None and 1 <= metrics["best_epoch"] <= EPOCHS
    assert len(metrics["history"]) == EPOCHS


def test_checkpoint_round_trip_reproduces_the_held_out_iou(trained):
    root, ckpt, truth, _ = trained
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    keys = {"arch", "encoder", "input_size", "normalization", "state_dict", "val_iou", "holdout_iou", "epoch", "config"}
    assert keys <= set(raw)
    assert raw["input_size"] == 64 and raw["config"]["encoder_depth"] == 3
    metrics = json.loads((ckpt.parent / "metrics.json").read_text())
    assert raw["holdout_iou"] == pytest.approx(metrics["holdout"]["iou"])
    for sid, reported in metrics["holdout"]["per_slide"].items():
        out = root / "out" / sid / "lesion_mask.png"
        segment(ckpt, root / "slides" / sid, out)
        lesion, _ = truth[sid]
        assert mask_scores(load_mask(out), lesion)[0] == pytest.approx(reported, abs=1e-4)


def _segment_in_subprocess(ckpt, slide_dir, out, *extra) -> bool:
    """``msamil segment`` in a fresh interpreter; returns whether it imported torch."""
    import subprocess
    import sys

    argv = ["segment", "--checkpoint", str(ckpt), "--thumbnail", str(slide_dir / "thumbnail.png"), "--tissue-mask",
            str(slide_dir / "tissue_mask.png"), "--out", str(out), "--threads", "1", *extra]
    code = f"import sys; from msamil_core.cli import main; rc = main({argv!r}); print('torch' in sys.modules); sys.exit(rc)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().endswith("True")


def test_segment_reuses_the_probabilities_segment_train_stored(trained, tmp_path):
    root, ckpt, _, _ = trained
    stored = root / "probabilities"
    assert sorted(p.stem for p in stored.glob("*.npz")) == sorted(p.name for p in (root / "slides").iterdir())
    sid = "s01"
    fresh, reused = tmp_path / "fresh.png", tmp_path / "reused.png"
    assert _segment_in_subprocess(ckpt, root / "slides" / sid, fresh)  # the network, so torch
    assert not _segment_in_subprocess(ckpt, root / "slides" / sid, reused, "--slide-id", sid, "--reuse", str(stored))
    assert np.array_equal(load_mask(fresh), load_mask(reused))
    # settings still apply to stored probabilities
    strict = tmp_path / "strict.png"
    assert not _segment_in_subprocess(ckpt, root / "slides" / sid, strict, "--slide-id", sid, "--reuse", str(stored),
                                      "--threshold", "0.999")
    assert load_mask(strict).sum() < load_mask(reused).sum()
    # probabilities of another checkpoint, or of other thumbnail pixels, are not taken
    other = tmp_path / "other.pt"
    other.write_bytes(ckpt.read_bytes() + b"\0")  # same weights, another file: another digest
    again = tmp_path / "again.png"
    assert _segment_in_subprocess(other, root / "slides" / sid, again, "--slide-id", sid, "--reuse", str(stored))
    assert np.array_equal(load_mask(again), load_mask(fresh))
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("thumbnail.png", "tissue_mask.png"):
        (moved / name).write_bytes((root / "slides" / "s02" / name).read_bytes())
    # s02's pixels under s01's name: the digest differs, the network runs, the mask is s02's
    assert _segment_in_subprocess(ckpt, moved, tmp_path / "s02.png", "--slide-id", sid, "--reuse", str(stored))


def test_segment_an_unannotated_slide(trained, tmp_path):
    _, ckpt, _, rng = trained
    lesion, tissue = make_slide(rng, tmp_path / "new", "new")
    out, prob = tmp_path / "new" / "lesion_mask.png", tmp_path / "new" / "prob.png"
    segment(ckpt, tmp_path / "new", out, "--probabilities", str(prob))
    values = np.asarray(Image.open(out))
    assert values.shape == (H, W) and set(np.unique(values)) <= {0, 255}
    written = values == 255
    assert not (written & ~tissue).any()  # restricted to tissue
    assert mask_scores(written, lesion)[0] > 0.5
    assert np.asarray(Image.open(prob)).shape == (H, W)
    # --threshold overrides the checkpoint's: a threshold near 1 leaves less lesion.
    strict = tmp_path / "strict.png"
    segment(ckpt, tmp_path / "new", strict, "--threshold", "0.999")
    assert load_mask(strict).sum() < written.sum()
    fallback = tmp_path / "fallback.png"
    segment(ckpt, tmp_path / "new", fallback, "--threshold", "0.999999", "--fallback-below", "0.99")
    assert np.array_equal(load_mask(fallback), tissue)


def test_segment_train_names_a_bad_annotation_and_its_slide(tmp_path):
    rng = np.random.default_rng(1)
    make_slide(rng, tmp_path / "slides" / "good", "good", tmp_path / "good.geojson")
    make_slide(rng, tmp_path / "slides" / "bad one", "bad one", tmp_path / "bad.geojson")
    data = json.loads((tmp_path / "bad.geojson").read_text())
    data["features"][0]["geometry"]["coordinates"][0][0] = [10 * W * DS, 0]  # far right of the slide
    write_json(tmp_path / "bad.geojson", data)
    (tmp_path / "sheet.csv").write_text(
        "slide_id,path,label,patient_id,annotation\ngood,g.tiff,a,p1,good.geojson\nbad one,b.tiff,a,p2,bad.geojson\n"
    )
    with pytest.raises(MsamilError) as err:
        run_command(
            "segment_train",
            [
                "--sheet",
                str(tmp_path / "sheet.csv"),
                "--slides-dir",
                str(tmp_path / "slides"),
                "--out",
                str(tmp_path / "c.pt"),
                *TRAIN_ARGS,
            ],
        )
    assert "'bad one'" in str(err.value) and "bad.geojson" in str(err.value) and "outside the slide" in str(err.value)
    assert not (tmp_path / "c.pt").exists()
    with pytest.raises(MsamilError, match="not found; train one"):
        load_segmentation_checkpoint(tmp_path / "c.pt")


def test_segment_refuses_a_file_that_is_no_segmentation_checkpoint(tmp_path):
    torch.save({"model_name": "abmil.base", "state_dict": {}}, tmp_path / "mil.pt")
    with pytest.raises(MsamilError, match="not a UNet"):
        load_segmentation_checkpoint(tmp_path / "mil.pt")


def test_patient_split_is_seeded_and_keeps_patients_whole():
    patients = [f"p{i}" for i in range(20)]
    a = split_patients(patients, 0.2, 0.2, seed=1)
    assert a == split_patients(list(reversed(patients)), 0.2, 0.2, seed=1)
    assert a != split_patients(patients, 0.2, 0.2, seed=2)
    counts = {part: sum(v == part for v in a.values()) for part in ("train", "val", "holdout")}
    assert counts == {"train": 12, "val": 4, "holdout": 4}
    tiny = split_patients(["p0", "p1"], 0.2, 0.2, seed=0)  # one to train on, one held out
    assert sorted(tiny.values()) == ["holdout", "train"]
    with pytest.raises(MsamilError, match="no annotated slides"):
        split_patients([], 0.2, 0.2, seed=0)


def test_loss_ignores_padding_and_prefers_the_truth():
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:5, 2:5] = 1
    valid = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    valid[..., :6, :6] = True
    good = (target * 2 - 1) * 6
    assert dice_bce_loss(good, target, valid) < dice_bce_loss(-good, target, valid)
    padded = good.clone()
    padded[..., 6:, :] = 9.0  # confident lesion on the padding
    assert dice_bce_loss(padded, target, valid) == pytest.approx(float(dice_bce_loss(good, target, valid)))


def test_postprocess_threshold_tissue_and_specks():
    prob = np.zeros((60, 80), np.float32)
    prob[10:40, 10:50] = 0.9
    prob[50, 70] = 0.9  # a speck
    tissue = np.ones((60, 80), bool)
    tissue[:, 45:] = False
    mask = postprocess(prob, tissue, PostProcessSettings(threshold=0.5, min_object_fraction=0.001))
    assert mask[10:40, 10:45].all() and mask.sum() == 30 * 35  # clipped to tissue, speck dropped
    assert not postprocess(prob, tissue, PostProcessSettings(threshold=0.95)).any()


def test_local_encoder_weights_load_strictly(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)  # ImageNet layout, with its fc head
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    model = build_model("resnet18", 3, [32, 16, 8], encoder_weights=tmp_path / "resnet18.pth")
    assert torch.equal(model.encoder.conv1.weight, reference.conv1.weight)
    torch.save({"conv1.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pth")
    with pytest.raises(MsamilError, match="do not fit"):
        load_weights(build_model("resnet18", 3, [32, 16, 8]).encoder, tmp_path / "wrong.pth", "segmentation encoder")


def test_config_and_encoder_errors_are_explained():
    with pytest.raises(MsamilError, match="decoder_channels"):
        SegmentationSettings(encoder_depth=3)
    with pytest.raises(MsamilError, match="no_such_encoder"):
        build_model("no_such_encoder")


def test_sigterm_then_rerun_equals_an_uninterrupted_run(trained, tmp_path):
    """segment-train runs on the training engine: SIGTERM saves resume.pt (mid-epoch at the next
    step), and a rerun continues to the very weights of the uninterrupted run (`trained`)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root, ckpt, _, _ = trained
    out = tmp_path / "cut" / "checkpoint.pt"
    argv = ["--sheet", str(root / "sheet.csv"), "--slides-dir", str(root / "slides"), "--out", str(out), *TRAIN_ARGS]
    proc = subprocess.Popen([sys.executable, "-m", "msamil_core", "segment-train", *argv], stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    resume, start = out.parent / "resume.pt", time.time()
    while not resume.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() - start < 120, "no resume checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "SIGTERM" in err and not out.exists()
    stopped = torch.load(resume, weights_only=True)["engine"]
    assert stopped["epoch"] < EPOCHS
    run_command("segment_train", argv)
    assert not resume.exists()
    a, b = torch.load(ckpt, weights_only=True), torch.load(out, weights_only=True)
    assert a["epoch"] == b["epoch"] and a["metrics"]["holdout"] == b["metrics"]["holdout"]
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(value, b["state_dict"][key], rtol=0, atol=0)
