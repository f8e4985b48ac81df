"""`msamil heatmap`: PNG sizes, QuPath GeoJSON, lesion figures, the report section, and the
message for a model without attention."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from msamil_core.cli import main
from test_predict import tiny_experiment  # noqa: F401  (session fixture: a trained tiny experiment)


def _heatmap(exp, out, *extra) -> int:
    return main(["heatmap", "--models", str(exp["models"]), "--fold", "0", "--features", str(exp["features"]),
                 "--sheet", str(exp["sheet"]), "--slides-dir", str(exp["results"] / "slides"), "--out-dir", str(out),
                 "--top-k", "3", "--threads", "1", *extra])


def test_heatmaps_of_a_slide(tiny_experiment, tmp_path):
    from msamil_core.reporting.heatmaps import MARGIN_RIGHT, TITLE_H
    from msamil_core.reporting.report import heatmap_links

    exp = tiny_experiment
    out = tmp_path / "hm"
    assert _heatmap(exp, out, "--slide-ids", "s0", "s1") == 0
    bag = torch.load(exp["features"] / "s0.pt", weights_only=True)
    meta = json.loads((exp["results"] / "slides" / "s0" / "meta.json").read_text())
    w, h = meta["thumbnail"]["width"], meta["thumbnail"]["height"]
    for name in ("20x", "10x", "5x", "combined"):
        with Image.open(out / "s0" / f"attention_{name}.png") as img:
            assert img.size == (w + MARGIN_RIGHT, h + TITLE_H) and img.mode in ("RGB", "RGBA")
    with Image.open(out / "s0" / "top_bottom.png") as img:
        assert img.width > 3 * 128 and img.height > 2 * 128

    gj = json.loads((out / "s0" / "attention.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(bag["features"])
    sizes = {0: PATCH_20X, 1: 2 * PATCH_20X, 2: 4 * PATCH_20X}
    got = set()
    total = 0.0
    for f in gj["features"]:
        ring = f["geometry"]["coordinates"][0]
        props = f["properties"]
        m = props["measurements"]
        s = sizes[int(m["scale index"])]
        x, y = ring[0]
        assert f["geometry"]["type"] == "Polygon" and ring == [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        assert props["objectType"] == "detection" and props["classification"]["name"] in ("20x", "10x", "5x")
        assert m["attention"] >= 0 and 0 <= m["lesion fraction"] <= 1
        total += m["attention"]
        got.add((x, y, int(m["scale index"])))
    assert total == pytest.approx(1.0, abs=1e-4)
    assert got == {(int(x), int(y), int(s)) for (x, y), s in zip(bag["coords"].tolist(), bag["scales"].tolist())}

    info = json.loads((out / "s0" / "slide.json").read_text())
    assert info["predicted"] in exp["classes"] and sum(info["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    lesion = {r["scope"]: r for r in info["lesion"]}
    assert set(lesion) == {"all", "20x", "10x", "5x"}
    assert lesion["all"]["n_inside"] > 0 and lesion["all"]["n_outside"] > 0
    assert sum(lesion[s]["n_inside"] + lesion[s]["n_outside"] for s in ("20x", "10x", "5x")) == len(bag["features"])
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert {(r["slide_id"], r["scope"]) for r in rows} == {(s, sc) for s in ("s0", "s1") for sc in lesion}
    assert rows[0]["label"] == exp["rows"][0]["label"]

    page = (out / "s0" / "index.html").read_text()  # the slide's page, with every image beside it
    for name in ("attention_combined.png", "attention_20x.png", "attention_5x.png", "top_bottom.png", "attention.geojson"):
        assert f'"{name}"' in page and (out / "s0" / name).exists()
    assert "inside against outside" in page and info["predicted"] in page
    (entry,) = heatmap_links({"tiny": out}, tmp_path / "report")
    first = entry["slides"][0]
    assert (first["slide_id"], first["page"], first["image"]) == ("s0", "../hm/s0/index.html",
                                                                  "../hm/s0/attention_combined.png")
    assert first["predicted"] == info["predicted"] and first["correct"] == (first["label"] == info["predicted"])
    assert "inside / outside" in entry["pooled"].columns and set(entry["pooled"]["scope"]) == set(lesion)


PATCH_20X = 64


def test_fold_test_slides_come_from_folds_csv(tiny_experiment, tmp_path):
    exp = tiny_experiment
    folds = tmp_path / "folds.csv"
    folds.write_text("slide_id,patient_id,label,fold\n" + "".join(
        f"{r['slide_id']},{r['patient_id']},{r['label']},{i % 2}\n" for i, r in enumerate(exp["rows"])))
    assert _heatmap(exp, tmp_path / "hm", "--folds", str(folds)) == 0
    assert sorted(p.name for p in (tmp_path / "hm").iterdir() if p.is_dir()) == ["s0", "s2"]


def test_a_model_without_attention_gets_a_clear_message(tiny_experiment, tmp_path, monkeypatch, capsys):
    from msamil_core.fileio import save_torch
    from msamil_core.mil import _registry
    from msamil_core.mil.base import MILModel, build_model, masked_mean

    class MeanNoAttention(MILModel):
        def __init__(self, in_dim=512, num_classes=2, embed_dim=512):
            super().__init__(in_dim, embed_dim, num_classes)
            self._build_head(num_classes)

        def _forward_features(self, h, mask, coords, scales, return_attention):
            return masked_mean(h, mask), {}  # ignores return_attention

    monkeypatch.setitem(_registry._entrypoints, "noattn.test",
                        lambda **kw: build_model(MeanNoAttention, {"embed_dim": 512}, kw))
    exp = tiny_experiment
    ckpt = torch.load(exp["models"] / "fold0" / "checkpoint.pt", weights_only=True)
    model = _registry.create_model("noattn.test", in_dim=512, num_classes=len(exp["classes"]))
    ckpt.update(model_name="noattn.test", model_args=model.model_args, state_dict=model.state_dict())
    save_torch(tmp_path / "models" / "fold0" / "checkpoint.pt", ckpt)
    code = main(["heatmap", "--models", str(tmp_path / "models"), "--features", str(exp["features"]), "--sheet",
                 str(exp["sheet"]), "--slide-ids", "s0", "--slides-dir", str(exp["results"] / "slides"),
                 "--out-dir", str(tmp_path / "hm")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "'noattn.test' returns no per-instance attention" in err[0] and "'s0'" in err[0]
    assert not (tmp_path / "hm").exists() or not any((tmp_path / "hm").iterdir())


def test_lesion_attention_and_colormap():
    from msamil_core.reporting.heatmaps import SlideAttention, colormap, lesion_attention, paint

    att = SlideAttention("x", np.zeros((4, 2), np.int64), np.array([0, 0, 0, 1]), np.array([8, 8, 8, 16]),
                         np.array([0.4, 0.4, 0.1, 0.1]), np.array([0.3, 0.7]), ["a", "b"])
    rows = {r["scope"]: r for r in lesion_attention(att, np.array([1.0, 0.6, 0.0, 0.2]))}
    assert rows["all"]["n_inside"] == 2 and rows["all"]["mean_inside"] == pytest.approx(1.6)  # 0.4 x 4
    assert rows["all"]["mean_outside"] == pytest.approx(0.4) and rows["all"]["attention_share_inside"] == pytest.approx(0.8)
    assert rows["10x"]["n_inside"] == 0 and np.isnan(rows["10x"]["mean_inside"])
    assert colormap(np.array([0.0]))[0].tolist() == [68, 1, 84] and colormap(np.array([2.0]))[0].tolist() == [253, 231, 37]
    values, covered = paint((4, 4), np.array([[0, 0, 2, 2], [0, 0, 4, 4]], float), np.array([1.0, 0.5]))
    assert values[0, 0] == 1.5 and values[3, 3] == 0.5 and covered.all()



def test_a_long_title_fits_a_narrow_map():
    from msamil_core.reporting.heatmaps import fit_title
    from msamil_core.reporting.plots import pyplot

    fig = pyplot().figure(figsize=(2.5, 2.0), dpi=100)
    title = "msamil_multiscale  demo_003  all scales  ->  bland_alternating 0.12, atypical_alternating 0.30"
    text = fig.text(0.02, 0.95, title, fontsize=9)
    fit_title(fig, text, 240)
    assert text.get_window_extent(fig.canvas.get_renderer()).width <= 240
    assert "atypical_alternating 0.30" in text.get_text().replace("\n", " ")  # wrapped, not cut
    short = fig.text(0.02, 0.5, "demo_003  20x", fontsize=9)
    fit_title(fig, short, 240)
    assert short.get_fontsize() == 9 and short.get_text() == "demo_003  20x"
    pyplot().close(fig)
