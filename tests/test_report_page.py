"""The report as a page to review slides from, built from small hand-made result folders: the
provenance header, the table of contents, the cohort per fold, the per-slide table (misclassified
first, linked to heatmap pages), labelled heatmap thumbnails, folded configs, readable headers,
intervals within the range of a difference, and every table in a box that keeps the page narrow."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from msamil_core.cli import main
from msamil_core.evaluation.metrics import classification_metrics, write_predictions
from msamil_core.reporting import provenance
from msamil_core.reporting.heatmaps import write_summary

CLASSES = ["bland_zonal", "atypical_zonal"]
SLIDES = [f"s{i:02d}" for i in range(12)]
LABELS = [i % 2 for i in range(12)]


def _experiment(root: Path, name: str, wrong: set[str], spread: float, manifest: bool) -> Path:
    """3 folds of 4 slides; the slides in ``wrong`` get the other class. ``spread`` makes the
    folds' scores differ (a wide t interval)."""
    directory = root / "models" / name
    for k in range(3):
        ids = SLIDES[4 * k:4 * k + 4]
        y = np.array(LABELS[4 * k:4 * k + 4])
        p_true = np.array([0.3 if s in wrong else 0.9 - spread * k for s in ids])
        probs = np.stack([np.where(y == 0, p_true, 1 - p_true), np.where(y == 1, p_true, 1 - p_true)], 1)
        fold = directory / f"fold{k}"
        fold.mkdir(parents=True)
        (fold / "metrics.json").write_text(json.dumps(classification_metrics(y, probs, CLASSES)))
        write_predictions(fold / "predictions.csv", ids, y, probs, CLASSES)
        torch.save({"model_name": "abmil.base", "classes": CLASSES, "config": {"name": name, "scales": ["20x"]}},
                   fold / "checkpoint.pt")
    if manifest:  # what msamil_core.manifest.write_manifest records, as far as the report reads it
        encoder = {"key": "resnet18_64", "id": "resnet18-0123456789",
                   "settings": {"name": "resnet18", "weights": None, "seed": 0}}
        (directory / "manifest.json").write_text(json.dumps({
            "format": 1, "msamil_version": "0.1.0", "experiment": name, "encoder": encoder, "model": "abmil.base",
            "model_args": {}, "scales": ["20x", "10x"], "classes": CLASSES, "patches": {"strategy": "tissue"},
            "task": None, "training": {"model": "abmil.base", "scales": ["20x", "10x"], "epochs": 3},
            "relations": {"ablation_of": None, "init_from": None, "e2e": None, "repeat_splits": True}}))
    return directory


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("results")
    exps = {"multi": _experiment(root, "multi", {"s05"}, 0.0, manifest=True),
            "single": _experiment(root, "single", {"s01", "s05", "s06"}, 0.15, manifest=False),
            "poor": _experiment(root, "poor", set(SLIDES[:4]), 0.0, manifest=False)}  # fold 0 all wrong
    folds = pd.DataFrame({"slide_id": SLIDES, "patient_id": [f"p{i // 2}" for i in range(12)],
                          "label": [CLASSES[y] for y in LABELS], "fold": [i // 4 for i in range(12)]})
    folds.to_csv(root / "folds.csv", index=False)
    heatmaps = root / "heatmaps" / "multi"
    infos = [{"slide_id": s, "predicted": CLASSES[1 - y] if s == "s05" else CLASSES[y], "lesion": None}
             for s, y in zip(SLIDES[:4] + ["s05"], LABELS[:4] + [LABELS[5]])]
    heatmaps.mkdir(parents=True)
    write_summary(heatmaps / "summary.csv", infos, {s: CLASSES[y] for s, y in zip(SLIDES, LABELS)})
    out = root / "report"
    assert main(["report", *[a for n, p in exps.items() for a in ("--experiment", f"{n}={p}")],
                 "--heatmaps", f"multi={heatmaps}", "--folds", str(root / "folds.csv"),
                 "--config-file", "config/config.yaml", "--out-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def report(report_dir) -> str:
    return (report_dir / "index.html").read_text()


def _section(html: str, anchor: str) -> str:
    return html.split(f'<h2 id="{anchor}">')[1].split("<h2 ")[0]


def test_provenance_header(report):
    head = report.split('<nav id="contents">')[0]
    assert re.search(r"<th>written</th><td>\d{4}-\d\d-\d\d \d\d:\d\d UTC</td>", head)
    commit = re.search(r"commit <code>([^<]+)</code>", head).group(1)
    assert re.fullmatch(r"[0-9a-f]{40}( \+ uncommitted changes)?", commit) or commit == "not a git checkout"
    assert "config/config.yaml" in head
    assert "resnet18-0123456789" in head and "none (random initialisation, seed 0)" in head
    assert "multi" in head  # the experiments that used the encoder


def test_commit_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "PACKAGE_ROOT", tmp_path)
    assert provenance.code_commit() == "not a git checkout"


def test_contents_link_every_section(report):
    contents = report.split('<nav id="contents">')[1].split("</nav>")[0]
    anchors = re.findall(r'<h2 id="([^"]+)">', report.split("</nav>")[1])
    assert anchors[:3] == ["summary", "cohort", "slides"] and "configs" in anchors
    assert re.findall(r'href="#([^"]+)"', contents) == anchors


def _rows(html: str) -> list[list[str]]:
    """The cells of each row of an HTML table (pandas.read_html would need lxml)."""
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", html, re.S)
    return [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S) for row in rows]


def test_cohort_per_fold(report):
    header, *rows = _rows(_section(report, "cohort"))
    assert header == ["fold", "slides", "patients", "atypical_zonal (slides)", "bland_zonal (slides)"]
    assert rows == [["0", "4", "2", "2", "2"], ["1", "4", "2", "2", "2"], ["2", "4", "2", "2", "2"],
                    ["all", "12", "6", "6", "6"]]


def test_slides_misclassified_first_with_heatmap_links(report):
    slides = _section(report, "slides")
    assert slides.count("<details") == 3 and "<details open>" in slides
    multi, single = slides.split("</details>")[:2]
    assert "1 of 12" in multi and "3 of 12" in single
    order = re.findall(r"<tr( class=\"wrong\")?><td>(s\d\d)</td>", single)
    assert [s for w, s in order[:3]] == ["s01", "s05", "s06"] and all(w for w, _ in order[:3])
    assert not any(w for w, _ in order[3:]) and len(order) == 12
    # links to heatmap pages, relative to the report, for the slides that have one
    assert '<a href="../heatmaps/multi/s05/index.html">heatmap</a>' in multi
    assert "../heatmaps/multi/s11" not in multi and "heatmaps/" not in single


def test_heatmap_thumbnails_are_labelled(report):
    thumbs = _section(report, "heatmaps")
    figures = re.findall(r"<figure( class=\"wrong\")?>.*?<figcaption>(.*?)</figcaption>", thumbs, re.S)
    assert len(figures) == 5 and figures[0][0]  # the misclassified slide first
    assert ">s05</a><br>true atypical_zonal, predicted bland_zonal" in figures[0][1]


def test_configs_folded_and_headers_readable(report):
    configs = _section(report, "configs")
    assert configs.count("<details><summary>") == 3 and configs.count("<pre>") == 3
    headers = re.findall(r"<th>([^<]*)</th>", report)
    assert not any("_" in h for h in headers if h not in ("n/a",) and "(slides)" not in h), headers
    assert "balanced accuracy" in headers and "macro F1" in headers
    assert "<td>balanced accuracy</td>" in _section(report, "metrics")


def test_calibration_section_pools_each_experiments_test_folds(report, report_dir):
    from sklearn.calibration import calibration_curve

    from msamil_core.evaluation.metrics import read_predictions

    header, *rows = _rows(_section(report, "calibration"))
    assert header == ["experiment", "test slides", "pooled ECE", "ECE per fold", "temperature"]
    assert [r[0] for r in rows] == ["multi", "single", "poor"]
    for name, row in zip(["multi", "single", "poor"], rows):
        parts = [read_predictions(report_dir.parent / "models" / name / f"fold{k}" / "predictions.csv")
                 for k in range(3)]
        y = np.concatenate([p[1] for p in parts])
        p1 = np.concatenate([p[2][:, 1] for p in parts])
        true, pred = calibration_curve(y, p1, n_bins=10)
        counts = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], p1), minlength=10)
        ece = np.sum(counts[counts > 0] * np.abs(true - pred)) / len(y)
        assert row[1] == "12" and float(row[2]) == pytest.approx(ece, abs=1e-4) and row[4] == "off"
        assert f'<img src="reliability_{name}.png"' in report and (report_dir / f"reliability_{name}.png").stat().st_size
    summary_header = _rows(_section(report, "summary"))[0]
    assert "ECE (lower is better)" in summary_header
    assert "<td>ECE (lower is better)</td>" in _section(report, "metrics")


def test_tables_scroll_in_their_box(report):
    # every table but the short provenance lines sits in a .wide box (overflow-x: auto)
    body = report.split('<nav id="contents">')[1]
    assert body.count("<table") == body.count('<div class="wide"><table')
    assert ".wide { max-width: 100%; overflow-x: auto; }" in report


def test_intervals_within_the_range_of_a_difference(report):
    cells = re.findall(r"<td>([+-]\d\.\d{3}) \[([+-]\d\.\d{3})(†?), ([+-]\d\.\d{3})(†?)\]</td>", report)
    assert cells
    for mean, low, _, high, _ in cells:
        assert -1 <= float(low) <= float(mean) <= float(high) <= 1
    # multi - poor in balanced accuracy: +1, -0.25, 0 over 3 runs; the t interval is cut, and the page says so
    assert "<td>+0.250 [-1.000†, +1.000†]</td>" in report
    assert report.count("it is cut there (few runs") == 1



def test_page_fits_1400_px_in_chromium(report, tmp_path):
    """The page in headless Chromium (bench/report_screenshot.py) is no wider than the window."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        from report_screenshot import WIDTH, find_chromium, measure
    finally:
        sys.path.pop(0)
    browser = find_chromium()
    if browser is None:
        pytest.skip("no headless Chromium on PATH")
    page = tmp_path / "index.html"
    page.write_text(report)
    figures = measure(browser, page, WIDTH)
    assert figures["scroll_width"] <= WIDTH and not figures["past_window"], figures
