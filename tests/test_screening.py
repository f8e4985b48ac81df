"""Screening: unreadable, unopenable, missing and blank slides and malformed annotations are left
out with a one-line reason; the good ones go on; the share limit; a fixed file comes back in."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import shared_slide, write_pyramid_tiff
from msamil_core.cohort.screening import ScreenSettings, keep_usable, read_left_out, screen_cohort
from msamil_core.cohort.sheet import load_sheet
from msamil_core.errors import MsamilError
from msamil_core.settings import ScreeningSettings, ThumbnailSettings

SETTINGS = ScreenSettings(ThumbnailSettings(long_side=256))


@pytest.fixture
def cohort(tmp_path):
    """Two good slides (one with a good annotation, one with a malformed one) and four bad ones."""
    rng = np.random.default_rng(0)
    glass = np.clip(242 + rng.normal(0, 2, size=(512, 768, 3)), 0, 255).astype(np.uint8)
    tissue = glass.copy()
    tissue[100:400, 150:600] = (180, 90, 160)  # an eosin-pink block
    write_pyramid_tiff(tmp_path / "good.tiff", tissue)
    write_pyramid_tiff(tmp_path / "blank.tiff", glass)
    good_ann = {"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"classification": {"name": "Tumor"}},
        "geometry": {"type": "Polygon", "coordinates": [[[200, 150], [500, 150], [500, 350], [200, 350], [200, 150]]]}}]}
    (tmp_path / "good.geojson").write_text(json.dumps(good_ann))
    (tmp_path / "broken.geojson").write_text('{"type": "FeatureCollection", "features": [')
    rows = [
        ("cmu (1)", shared_slide("CMU-1-Small-Region.svs"), "a", "p1", ""),
        ("good", tmp_path / "good.tiff", "b", "p2", tmp_path / "good.geojson"),
        ("good broken annotation", tmp_path / "good.tiff", "b", "p3", tmp_path / "broken.geojson"),
        ("unreadable", shared_slide("unreadable.svs"), "a", "p4", ""),
        ("unopenable", shared_slide("unopenable.tiff"), "b", "p5", ""),
        ("missing", tmp_path / "missing.svs", "a", "p6", ""),
        ("blank", tmp_path / "blank.tiff", "b", "p7", ""),
    ]
    frame = pd.DataFrame(rows, columns=["slide_id", "path", "label", "patient_id", "annotation"])
    frame.to_csv(tmp_path / "sheet.csv", index=False)
    return tmp_path


def test_bad_slides_and_annotations_are_left_out_with_one_line_reasons(cohort):
    sheet = load_sheet(cohort / "sheet.csv")
    verdicts = screen_cohort(sheet, SETTINGS, cohort / "cache.json")
    kept, left_out = keep_usable(sheet, verdicts, ScreeningSettings(max_left_out=0.6))
    assert list(kept.index) == ["cmu (1)", "good", "good broken annotation"]
    assert kept.at["good broken annotation", "annotation"] == ""  # the slide stays, its annotation goes
    assert kept.at["good", "annotation"].endswith("good.geojson")
    reasons = dict(zip(left_out.slide_id + "/" + left_out.what, left_out.reason))
    assert set(reasons) == {"unreadable/slide", "unopenable/slide", "missing/slide", "blank/slide",
                            "good broken annotation/annotation"}
    for key, reason in reasons.items():
        assert "\n" not in reason and reason
        assert key.split("/")[0] in reason or "broken.geojson" in reason, reason
    assert "no tissue" in reasons["blank/slide"]
    assert "broken.geojson" in reasons["good broken annotation/annotation"]


def test_the_share_limit_and_no_leaving_out_stop_the_run_naming_reasons(cohort):
    sheet = load_sheet(cohort / "sheet.csv")
    verdicts = screen_cohort(sheet, SETTINGS)
    with pytest.raises(MsamilError, match=r"4 of 7 slides \(57%\).*max_left_out \(50%\).*unreadable"):
        keep_usable(sheet, verdicts, ScreeningSettings(max_left_out=0.5))
    with pytest.raises(MsamilError, match="4 of 7 slides cannot be used.*leave_out: true"):
        keep_usable(sheet, verdicts, ScreeningSettings(leave_out=False))


def test_a_rerun_screens_only_changed_files_and_a_fixed_slide_comes_back(cohort, caplog):
    sheet = load_sheet(cohort / "sheet.csv")
    screen_cohort(sheet, SETTINGS, cohort / "cache.json")
    caplog.set_level(logging.INFO, logger="msamil_core.cohort.screening")
    caplog.clear()
    again = screen_cohort(sheet, SETTINGS, cohort / "cache.json")
    assert "screening 0 slides (7 unchanged" in caplog.text
    assert again["missing"]["slide"]
    shutil.copy(cohort / "good.tiff", cohort / "missing.svs")  # the file turns up
    caplog.clear()
    fixed = screen_cohort(sheet, SETTINGS, cohort / "cache.json")
    assert "screening 1 slides (6 unchanged" in caplog.text
    assert fixed["missing"] == {"slide": None, "annotation": None}
    kept, _ = keep_usable(sheet, fixed, ScreeningSettings(max_left_out=0.5))
    assert "missing" in kept.index


def test_screen_command_writes_the_screened_sheet_or_nothing(cohort):
    out, left = cohort / "out" / "slides.csv", cohort / "out" / "left_out.csv"
    argv = [sys.executable, "-m", "msamil_core", "screen", "--sheet", str(cohort / "sheet.csv"), "--out", str(out),
            "--left-out", str(left), "--long-side", "256", "--threads", "2"]
    failed = subprocess.run(argv, capture_output=True, text=True)
    assert failed.returncode == 1 and not out.exists() and not left.exists()
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("msamil screen: error:") and "max_left_out (10%)" in last
    done = subprocess.run(argv + ["--max-left-out", "0.6"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    screened = load_sheet(out)  # a valid sheet: later steps read it
    assert list(screened.slide_id) == ["cmu (1)", "good", "good broken annotation"]
    assert sorted(read_left_out(left).slide_id) == ["blank", "good broken annotation", "missing", "unopenable",
                                                    "unreadable"]


def test_slides_left_out_after_the_screening_join_the_list_under_its_policy(tmp_path, capsys):
    """msamil left-out: a kept slide whose bags are all empty (its tiles failed to decode, or no
    patch was kept) is a `slide` row, one with only some empty bags a `bags` row; the screening's
    share limit counts both lists, and a refused run writes nothing."""
    import torch

    from msamil_core.cli import main
    from msamil_core.features.bags import Bag, save_bag

    def bag(folder: str, sid: str, n: int, why: str | None = None) -> str:
        rows = torch.zeros(n, dtype=torch.int64)
        path = tmp_path / folder / f"{sid}.pt"
        path.parent.mkdir(exist_ok=True)
        save_bag(path, Bag(features=torch.ones(n, 4), coords=torch.zeros(n, 2, dtype=torch.int64), scales=rows,
                           patch_size_level0=rows + 256, slide_id=sid, encoder="e", left_out=why))
        return str(path)

    sheet = pd.DataFrame({"slide_id": ["a", "b", "c", "d"], "path": ["a.svs", "b.svs", "c.svs", "d.svs"],
                          "label": ["x", "y", "x", "y"], "patient_id": ["p1", "p2", "p3", "p4"]})
    sheet.to_csv(tmp_path / "slides.csv", index=False)
    pd.DataFrame([("gone", "p0", "x", "slide", "slide 'gone': file not found")],
                 columns=["slide_id", "patient_id", "label", "what", "reason"]).to_csv(tmp_path / "screened.csv", index=False)
    indexes = []
    for folder in ("tissue", "lesion"):
        paths = [bag(folder, "a", 3), bag(folder, "b", 0, "slide 'b' (b.svs): tiles fail to decode (x)"),
                 bag(folder, "c", 2), bag(folder, "d", 0 if folder == "lesion" else 5)]
        index = tmp_path / folder / "bags.tsv"
        index.write_text("slide_id\tbag\n" + "".join(f"{s}\t{p}\n" for s, p in zip("abcd", paths)))
        indexes.append(str(index))
    args = ["left-out", "--sheet", str(tmp_path / "slides.csv"), "--screening", str(tmp_path / "screened.csv"),
            "--bag-index", *indexes, "--out", str(tmp_path / "left_out.csv")]
    assert main([*args, "--max-left-out", "0.5"]) == 0
    left = read_left_out(tmp_path / "left_out.csv").set_index("slide_id")
    assert list(left.index) == ["gone", "b", "d"]
    assert left.at["b", "what"] == "slide" and "tiles fail to decode" in left.at["b", "reason"]
    assert left.at["b", "reason"].startswith("after the screening: ") and "bags: tissue, lesion" in left.at["b", "reason"]
    assert left.at["d", "what"] == "bags" and left.at["d", "reason"] == "after the screening: no patch kept at any scale (bags: lesion)"
    # 2 of 5 slides gone in all: over a 30 % limit, under 50 %
    (tmp_path / "left_out.csv").unlink()
    assert main([*args, "--max-left-out", "0.3"]) == 1
    assert "2 of 5 slides (40%) are left out" in capsys.readouterr().err
    assert not (tmp_path / "left_out.csv").exists()
    assert main([*args, "--no-leave-out"]) == 1
    assert "1 slide(s) cannot be used after the screening (b: slide 'b' (b.svs): tiles fail" in capsys.readouterr().err
