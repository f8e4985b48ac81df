"""The Snakemake workflow, run for real on small cohorts of real slides."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from conftest import REPO, shared_slide, workflow_failure

pytestmark = pytest.mark.slow


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=workdir,
        timeout=900,
    )


def write_sheet(path: Path, rows: list[tuple]) -> Path:
    lines = ["slide_id,path,label,patient_id,mpp"] + [",".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def planned_jobs(stdout: str) -> dict[str, int]:
    """Job counts per rule from a dry-run's 'Job stats' table."""
    counts = {}
    table = stdout.split("Job stats:")[-1]
    for line in table.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m and m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


GOOD = [
    ("cmu", shared_slide("CMU-1-Small-Region.svs"), "a", "p1", ""),
    ("dapi (387)", shared_slide("test3-DAPI-2-(387).ndpi"), "b", "p2", ""),
]


@pytest.fixture(scope="module")
def cohort_run(tmp_path_factory):
    """The preprocessing stages run on two real slides plus every kind of bad slide."""
    wd = tmp_path_factory.mktemp("wf")
    blank = wd / "blank.tiff"
    from conftest import write_pyramid_tiff
    import numpy as np

    write_pyramid_tiff(blank, np.full((1024, 1024, 3), 241, np.uint8))
    slides_dir = shared_slide("small.svs").parent
    bad = [
        ("boxes", slides_dir / "boxes.tiff", "a", "p3", ""),
        ("unopenable", slides_dir / "unopenable.tiff", "b", "p4", ""),
        ("unreadable", slides_dir / "unreadable.svs", "a", "p5", ""),
        ("missing", slides_dir / "missing.svs", "b", "p6", ""),
        ("blank", blank, "a", "p7", ""),
    ]
    sheet = write_sheet(wd / "sheet.csv", GOOD + bad)
    (wd / "small.yaml").write_text(
        "patches:\n  patch_size: 256\n  min_fraction: 0.4\n  strategy: tissue\nexport_geojson: false\nexperiments: []\n"
        "screening:\n  max_left_out: 0.8\n"
    )
    dry = snakemake(wd, "--cores", "2", "-n", "--configfile", "small.yaml", "--config", f"slides={sheet}")
    run = snakemake(wd, "--cores", "2", "--keep-going", "--configfile", "small.yaml", "--config", f"slides={sheet}")
    return wd, dry, run


def test_dry_run_plans_every_stage_per_slide(cohort_run):
    _, dry, _ = cohort_run
    assert dry.returncode == 0, dry.stderr
    jobs = planned_jobs(dry.stdout)
    # before the screening has run, a dry run forecasts every slide
    assert jobs == {"screen_slides": 1, "preprocess_slide": 7, "list_left_out": 1, "all": 1}


def test_good_slides_complete_and_bad_ones_are_left_out_with_reasons(cohort_run):
    wd, _, run = cohort_run
    assert run.returncode == 0, workflow_failure(run, wd)  # the bad slides are left out, no job fails
    for slide in ("cmu", "dapi (387)"):
        for name in ("thumbnail.png", "meta.json", "tissue_mask.png"):
            assert (wd / "results" / "slides" / slide / name).exists(), (slide, name)
        for scale in ("20x", "10x", "5x"):
            with h5py.File(wd / "results" / "coords" / scale / f"{slide}.h5") as f:
                assert f["coords"].attrs["name"] == slide
                assert f["coords"].attrs["target_magnification"] == int(scale[:-1])
    expected = {
        "boxes": "`mpp` column",
        "unopenable": "OpenSlide cannot open",
        "unreadable": "fail to decode",
        "missing": "file not found",
        "blank": "no tissue found",
    }
    import pandas as pd

    left_out = pd.read_csv(wd / "results" / "cohort" / "left_out.csv").set_index("slide_id")
    assert sorted(left_out.index) == sorted(expected)
    for slide, words in expected.items():
        reason = left_out.at[slide, "reason"]
        assert f"slide '{slide}'" in reason and words in reason and "\n" not in reason, reason
        assert not (wd / "results" / "slides" / slide).exists()  # no per-slide job ran for it
    screened = pd.read_csv(wd / "results" / "cohort" / "slides.csv")
    assert list(screened.slide_id) == ["cmu", "dapi (387)"]
    # the console says how many and where the list is
    assert "the screening left out 5 of 7 slide(s); the reasons are in results/cohort/screening_left_out.csv" in run.stderr
    leftovers = [p for p in (wd / "results").rglob(".*") if p.is_file()]
    assert leftovers == []  # no temporary files


def test_ndpi_coordinates_follow_its_mpp(cohort_run):
    wd = cohort_run[0]
    with h5py.File(wd / "results" / "coords" / "20x" / "dapi (387).h5") as f:
        attrs = dict(f["coords"].attrs)
        coords = f["coords"][()]
    assert attrs["patch_size_level0"] == round(256 * 0.5 / attrs["mpp"])
    assert len(coords) > 0 and (coords % attrs["patch_size_level0"] == 0).all()


def test_adding_a_slide_plans_only_its_jobs(cohort_run):
    wd = cohort_run[0]
    sheet = write_sheet(wd / "sheet2.csv", GOOD + [("boxes_mpp", shared_slide("boxes.tiff"), "a", "p9", "0.5")])
    dry = snakemake(wd, "--cores", "2", "-n", "--configfile", "small.yaml", "--config", f"slides={sheet}")
    assert dry.returncode == 0, dry.stderr
    assert planned_jobs(dry.stdout) == {"screen_slides": 1, "preprocess_slide": 1, "list_left_out": 1, "all": 1}
    assert "slide=boxes_mpp" in dry.stdout and "slide=cmu" not in dry.stdout


def test_partial_run_targets_and_until_before_the_screening(cohort_run, tmp_path):
    """`snakemake preprocess` / `features` / `features_<key>` (make preprocess, make features) stop
    after those stages; `--until` a rule after the screening before it has run says what to run first."""
    wd = cohort_run[0]
    args = ("--cores", "2", "-n", "--configfile", "small.yaml", "--config", f"slides={wd / 'sheet.csv'}")
    done = snakemake(wd, "preprocess", *args)
    assert done.returncode == 0 and "Nothing to be done" in done.stdout + done.stderr, done.stderr[-2000:]
    for target in ("features", "features_resnet18_64"):  # the default encoder: no experiment names one
        dry = snakemake(wd, target, *args)
        assert dry.returncode == 0, dry.stderr[-2000:]
        assert planned_jobs(dry.stdout) == {"extract_features": 2, target: 1}
    assert "results/features/folders.tsv" in snakemake(wd, "features", *args).stdout
    fresh = snakemake(tmp_path, "--cores", "2", "--until", "make_splits", "--configfile", str(wd / "small.yaml"),
                      "--config", f"slides={wd / 'sheet.csv'}")
    assert fresh.returncode != 0
    assert "the screening has not run for this sheet and config yet" in fresh.stderr
    assert "snakemake --until screen_slides" in fresh.stderr and not (tmp_path / "results").exists()


def test_config_with_an_unknown_key_fails_before_any_job(tmp_path):
    sheet = write_sheet(tmp_path / "s.csv", GOOD[:1])
    (tmp_path / "typo.yaml").write_text("patches:\n  patch_sise: 256\n")
    out = snakemake(tmp_path, "--cores", "1", "-n", "--configfile", "typo.yaml", "--config", f"slides={sheet}")
    assert out.returncode != 0
    assert "patch_sise" in out.stderr + out.stdout
    assert not (tmp_path / "results").exists()


def test_a_users_sheet_without_annotations_runs_its_own_labels_on_tissue_patches(tmp_path):
    """The default config on a sheet of one's own: no demo experiment or task, the sheet's labels,
    tissue patches (auto: no annotations), and the run says so."""
    sheet = write_sheet(tmp_path / "s.csv", GOOD)
    out = snakemake(tmp_path, "--cores", "1", "-n", "--config", f"slides={sheet}")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "patches.strategy auto: tissue patches" in text and "on the sheet's own labels (a, b)" in text
    jobs = planned_jobs(out.stdout)
    assert jobs["screen_slides"] == 1 and "architecture" not in text and "segment_lesions" not in jobs


def test_bad_sheet_fails_before_any_job(tmp_path):
    sheet = write_sheet(tmp_path / "s.csv", GOOD + [("cmu", shared_slide("small.svs"), "a", "p3", "")])
    out = snakemake(tmp_path, "--cores", "1", "-n", "--config", f"slides={sheet}")
    assert out.returncode != 0
    assert "duplicate slide_id 'cmu'" in out.stderr + out.stdout


def test_lesion_strategy_without_annotations_fails_before_any_job(tmp_path):
    sheet = write_sheet(tmp_path / "s.csv", GOOD)
    (tmp_path / "lesion.yaml").write_text("patches: {strategy: lesion}\nexperiments: []\n")
    out = snakemake(tmp_path, "--cores", "1", "-n", "--configfile", "lesion.yaml", "--config", f"slides={sheet}")
    assert out.returncode != 0
    assert "lesion patch strategy needs lesion annotations" in out.stderr + out.stdout
    assert "patches.strategy: tissue" in out.stderr + out.stdout
    assert not (tmp_path / "results").exists()


def test_changing_the_encoder_reextracts_features_only(cohort_run):
    wd = cohort_run[0]
    sheet = write_sheet(wd / "sheet_good.csv", GOOD)

    def config(size):
        path = wd / f"enc{size}.yaml"
        path.write_text(
            # one experiment puts the features in the DAG; --until stops before splits and training
            "patches:\n  patch_size: 256\n  min_fraction: 0.4\n  strategy: tissue\nexport_geojson: false\n"
            "experiments:\n  - {name: e, model: abmil.base}\n"
            f"encoders:\n  tiny:\n    name: resnet18\n    input_size: {size}\n"
            "features:\n  default_encoder: tiny\n  batch_size: 16\n  workers: 0\n"
        )
        return path.name

    # --until sees the per-slide jobs once the screening (a checkpoint) has run for this sheet
    screen = snakemake(wd, "--cores", "2", "--until", "screen_slides", "--configfile", config(32), "--config", f"slides={sheet}")
    assert screen.returncode == 0, workflow_failure(screen, wd)
    run = snakemake(wd, "--cores", "2", "--until", "extract_features", "--configfile", config(32), "--config", f"slides={sheet}")
    assert run.returncode == 0, workflow_failure(run, wd)
    first = sorted((wd / "results" / "features").glob("tiny-*"))
    assert len(first) == 1 and sorted(p.name for p in first[0].iterdir()) == ["cmu.pt", "dapi (387).pt"]
    dry = snakemake(wd, "--cores", "2", "-n", "--until", "extract_features", "--configfile", config(48), "--config", f"slides={sheet}")
    assert dry.returncode == 0, dry.stderr
    assert planned_jobs(dry.stdout) == {"extract_features": 2}  # no thumbnail, mask or coordinates job
    assert f"results/features/{first[0].name}/" not in dry.stdout  # a new folder
