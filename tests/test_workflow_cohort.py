"""The whole workflow, slides to report, on a small synthetic cohort: lesion segmentation, the
three patch-selection strategies, training, evaluation and the report; then a slide is added,
and the experiments are edited. Most slides have ids a shell would misread (every value reaching
a command is quoted), and Snakemake runs without `msamil` on PATH, as `.venv/bin/snakemake`
does without activating the environment."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from conftest import REPO, shared_slide, workflow_failure, zero_tiles
from test_workflow import planned_jobs, snakemake

pytestmark = pytest.mark.slow

CONFIG = """
patches: {patch_size: 256, min_fraction: 0.7, strategy: lesion, random_n: 8}
encoders:
  tiny: {name: resnet18, input_size: 32}
features: {default_encoder: tiny, batch_size: 64, workers: 0}
segmentation: {epochs: 3, input_size: 128, crop_size: 64, batch_size: 4}
splits: {n_folds: 2, val_fraction: 0.25}
training: {epochs: 2, patience: 0}
heatmaps: {experiments: [lesion], top_k: 2}
screening: {max_left_out: 0.2}
experiments:
  - {name: lesion, model: abmil.base}
  - {name: tissue, model: abmil.base, strategy: tissue}
  - {name: random, model: abmil.base, strategy: random}
"""
N_SLIDES = 9
BROKEN = "broken (scan 2)"
ZEROED = "zeroed tiles"
# slide ids a shell would misread, and a non-ASCII one (the sheet accepts them all)
ODD_IDS = ["a b (1)", "it's", "x;y", "$(id)", "&", "naïve é"]
PER_SLIDE_RULES = {"preprocess_slide", "segment_lesions", "make_patch_coordinates", "extract_features"}


def snakemake_unactivated(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """Snakemake with the environment's folder (where `msamil` is) taken off PATH: the workflow
    must find `msamil` beside the Python that runs it."""
    folder = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p and p != folder)
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args],
        capture_output=True, text=True, env=dict(os.environ, PATH=path), cwd=workdir, timeout=900,
    )


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A 9-slide demo cohort; the workflow runs on the first 8, then the 9th is added. Beside
    them the sheet has an unreadable slide, and one slide's annotation is malformed: the
    screening leaves both out and the run goes on to the report. A tenth slide passes the
    screening but a third of its level-0 tiles are zeroed: its extraction fails (its sheet mpp
    makes 20x patches read level 0), and the run leaves it out and goes on."""
    wd = tmp_path_factory.mktemp("cohort")
    subprocess.run(
        [sys.executable, "-m", "msamil_core", "demo", "--out", str(wd / "data"), "--n-slides", str(N_SLIDES),
         "--patch-size", "256", "--threads", "2"],
        check=True, capture_output=True,
    )
    full = pd.read_csv(wd / "data" / "slides.csv")
    # the sheets sit in the project folder, their files relative to it (the project can move)
    for column in ("path", "annotation"):
        full[column] = [f"data/{p}" for p in full[column]]
    # two classes (the architecture), so that 2 folds find patients of each label among 8 slides
    full["label"] = full["label"].str.split("_").str[1]
    full["slide_id"] = ODD_IDS + list(full["slide_id"][len(ODD_IDS):])
    (wd / "bad.geojson").write_text('{"type": "FeatureCollection", "features": [{"type": "Feat')
    full.loc[1, "annotation"] = "bad.geojson"
    shutil.copyfile(shared_slide("unreadable.svs"), wd / "broken.svs")
    zero_tiles(Path(shutil.copyfile(wd / full.path.iloc[2], wd / "zeroed.tiff")), level=0)
    # 4x the demo's µm/px: a 256-px 20x patch is 64 level-0 px, read from level 0 for the 32-px input
    broken = pd.DataFrame([{"slide_id": BROKEN, "path": "broken.svs", "label": "zonal",
                            "patient_id": "patient_broken", "annotation": ""},
                           {"slide_id": ZEROED, "path": "zeroed.tiff", "label": full.label.iloc[2],
                            "patient_id": "patient_zeroed", "annotation": "", "mpp": 2.0}])
    pd.concat([full.iloc[: N_SLIDES - 1], broken]).to_csv(wd / "first.csv", index=False)
    pd.concat([full.iloc[: N_SLIDES - 1], broken, full.iloc[N_SLIDES - 1:]]).to_csv(wd / "all.csv", index=False)
    (wd / "config.yaml").write_text(CONFIG)
    run = snakemake_unactivated(wd, "--cores", "2", "--configfile", "config.yaml", "--config",
                                f"slides={wd / 'first.csv'}")
    assert run.returncode == 0, workflow_failure(run, wd)
    assert "command not found" not in run.stderr
    return wd, full


def _coords(path):
    with h5py.File(path) as f:
        return {tuple(c) for c in f["coords"][()]}, dict(f["coords"].attrs)


def test_every_stage_ran_and_the_report_compares_strategies(cohort):
    wd, full = cohort
    results = wd / "results"
    seg = json.loads((results / "segmentation" / "metrics.json").read_text())
    assert seg["holdout"]["n_slides"] >= 1 and 0.0 <= seg["holdout"]["iou"] <= 1.0
    for slide in full.slide_id[: N_SLIDES - 1]:
        mask = results / "slides" / slide / "lesion_mask.png"
        assert mask.exists()
        features = json.loads((results / "slides" / slide / "patches.geojson").read_text())["features"]
        assert features and all(f["geometry"]["type"] in ("Polygon", "MultiPolygon") for f in features)
    page = (results / "report" / "index.html").read_text()
    assert "Patch-selection strategies" in page and "Lesion segmentation" in page
    # the screening left out the unreadable slide and the malformed annotation, the report says why
    left = page.split('<h2 id="left-out">Slides left out</h2>')[1].split("<h2")[0]
    assert BROKEN in left and "fail to decode" in left and "bad.geojson" in left
    assert not (results / "slides" / BROKEN).exists()
    segmented = sorted(s for part in seg["splits"].values() for s in part)
    assert segmented == sorted(set(full.slide_id[: N_SLIDES - 1]) - {full.slide_id[1]})  # the 7 good annotations
    for name in ("lesion", "tissue", "random"):
        assert f"<td>{name}</td>" in page
        for k in (0, 1):
            assert json.loads((results / "models" / name / f"fold{k}" / "metrics.json").read_text())["inference_seconds"] > 0
    # the strategy table's times: each slide's extraction job measured, split by patches
    from msamil_core.reporting.tables import bag_counts, extraction_seconds

    folders = {p.name.rsplit("-", 1)[1]: p for p in (results / "features").iterdir()}
    job = wd / "benchmarks" / "extract_features" / folders["lesion"].name.rsplit("-", 1)[0]
    shares = {name: extraction_seconds(bag_counts(folder), job) for name, folder in folders.items()}
    assert 0 < shares["random"] < shares["lesion"] < shares["tissue"]
    # (the slide whose extraction failed has empty bags: no share of its time)
    total = sum(float(p.read_text().splitlines()[1].split("\t")[0]) for p in job.glob("*.tsv") if p.stem != ZEROED)
    assert shares["tissue"] == pytest.approx(total)  # tissue holds every encoded patch
    assert (results / "heatmaps" / "lesion" / "fold0" / "summary.csv").exists()


def test_a_slide_whose_tiles_fail_after_the_screening_is_left_out_and_the_run_completes(cohort):
    wd, _ = cohort
    results = wd / "results"
    screened = pd.read_csv(results / "cohort" / "slides.csv")
    assert ZEROED in set(screened.slide_id)  # the screening reads a coarser level: it passes
    assert ZEROED not in set(pd.read_csv(results / "cohort" / "screening_left_out.csv").slide_id)
    left = pd.read_csv(results / "cohort" / "left_out.csv").set_index("slide_id")
    assert left.at[ZEROED, "what"] == "slide" and BROKEN in left.index
    reason = left.at[ZEROED, "reason"]
    assert reason.startswith("after the screening: ") and "fail to decode" in reason and "\n" not in reason
    import torch

    for folder in (results / "features").iterdir():  # every strategy's bag: empty, saying why
        bag = torch.load(folder / f"{ZEROED}.pt", weights_only=True)
        assert bag["features"].shape[0] == 0 and "fail to decode" in bag["left_out"]
    # training, evaluation and the report went on without it; a test fold says why it is missing
    tested = [json.loads((results / "models" / "tissue" / f"fold{k}" / "metrics.json").read_text()) for k in (0, 1)]
    assert sum(ZEROED in m.get("left_out", {}) for m in tested) == 1
    for k in (0, 1):
        assert ZEROED not in set(pd.read_csv(results / "models" / "tissue" / f"fold{k}" / "predictions.csv").slide_id)
    page = (results / "report" / "index.html").read_text()
    assert ZEROED in page.split('<h2 id="left-out">Slides left out</h2>')[1].split("<h2")[0]


def test_lesion_and_random_patches_are_subsets_of_the_tissue_grid(cohort):
    wd, full = cohort
    fewer = 0
    for slide in full.slide_id[: N_SLIDES - 1]:
        for scale, n_random in (("20x", 8), ("10x", 2), ("5x", 1)):
            tissue, attrs = _coords(wd / "results" / "coords" / "tissue" / scale / f"{slide}.h5")
            lesion, lesion_attrs = _coords(wd / "results" / "coords" / scale / f"{slide}.h5")
            random, random_attrs = _coords(wd / "results" / "coords" / "random" / scale / f"{slide}.h5")
            assert lesion <= tissue and random <= tissue
            assert len(random) == min(n_random, len(tissue))
            assert (lesion_attrs["selection"], attrs["selection"], random_attrs["selection"]) == (
                "lesion", "tissue", "random tissue")
            fewer += len(lesion) < len(tissue)
        # a bag holds exactly its strategy's patches
        bags = {p.name.rsplit("-", 1)[1]: p for p in (wd / "results" / "features").iterdir()}
        import torch

        bag = torch.load(bags["lesion"] / f"{slide}.pt", weights_only=True)
        lesion_all = set()
        for scale in ("20x", "10x", "5x"):
            lesion_all |= _coords(wd / "results" / "coords" / scale / f"{slide}.h5")[0]
        assert {tuple(c) for c in bag["coords"].tolist()} == lesion_all
        # one extraction job encoded the three strategies' patches once: their union is the tissue grid
        tissue_bag = torch.load(bags["tissue"] / f"{slide}.pt", weights_only=True)
        for name in ("lesion", "tissue", "random"):
            encoded = torch.load(bags[name] / f"{slide}.pt", weights_only=True)["patches_encoded"]
            assert encoded == len(tissue_bag["coords"])
        # a patch is its scale and position: a 10x and a 20x patch may share a top-left corner
        shared = {(s, *c): i for i, (s, c) in enumerate(zip(tissue_bag["scales"].tolist(), tissue_bag["coords"].tolist()))}
        rows = [shared[(s, *c)] for s, c in zip(bag["scales"].tolist(), bag["coords"].tolist())]
        assert torch.equal(bag["features"], tissue_bag["features"][rows])
    assert fewer > 0  # the lesion is smaller than the tissue on these slides


def test_adding_a_slide_plans_only_its_jobs_and_the_cohort_steps(cohort):
    wd, full = cohort
    new = full.slide_id.iloc[-1]
    dry = snakemake(wd, "--cores", "2", "-n", "--configfile", "config.yaml", "--config", f"slides={wd / 'all.csv'}")
    assert dry.returncode == 0, dry.stderr[-3000:]
    jobs = planned_jobs(dry.stdout)
    per_slide = {"preprocess_slide": 1, "segment_lesions": 1, "make_patch_coordinates": 1, "extract_features": 1}
    cohort_steps = {"screen_slides": 1, "index_thumbnails": 1, "index_bags": 3, "train_segmentation": 1,
                    "make_splits": 1, "train_fold": 6, "write_manifest": 3,
                    "draw_heatmaps": 1, "list_left_out": 1, "make_report": 1, "all": 1}
    assert jobs == {**per_slide, **cohort_steps}
    # every per-slide job is the new slide's; no other slide is recomputed
    slides_in_plan = set(np.unique(re.findall(r"slide=([^\n]+)", dry.stdout)))
    assert slides_in_plan == {new}


def _dry_run(workdir: Path, snakefile: Path, *config: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(workdir),
                           "--cores", "2", "-n", "--configfile", "config.yaml", *config, "--config", "slides=first.csv"],
                          capture_output=True, text=True, env=env, cwd=workdir, timeout=900)


def test_a_moved_project_or_copied_results_plan_nothing_and_an_added_experiment_only_itself(cohort, tmp_path):
    """Params and records hold paths relative to the project or the sheet: the project folder moved
    (every file with its modification time, .snakemake/ included), or its results copied into
    another clone of the workflow (no .snakemake/), plans no job; an experiment added after either
    plans its training, its manifest and the report."""
    wd, _ = cohort
    moved = tmp_path / "moved project"
    shutil.copytree(wd, moved, symlinks=True)  # what `mv` leaves: the same files and times elsewhere
    clone = tmp_path / "clone"
    clone.mkdir()
    for part in ("Snakefile", "rules", "config", "workflow", "envs"):  # another checkout of the workflow
        copy = shutil.copytree if (REPO / part).is_dir() else shutil.copy2
        copy(REPO / part, clone / part)
    for part in ("results", "data", "broken.svs", "zeroed.tiff", "bad.geojson", "first.csv", "config.yaml"):  # `cp -a`
        copy = shutil.copytree if (wd / part).is_dir() else shutil.copy2
        copy(wd / part, clone / part)
    # the experiments of the run, and one more
    added = "experiments:\n" + CONFIG.split("experiments:\n")[1] + "  - {name: more, model: abmil.base, scales: [20x]}\n"
    for workdir, snakefile in ((moved, REPO / "Snakefile"), (clone, clone / "Snakefile")):
        dry = _dry_run(workdir, snakefile)
        assert dry.returncode == 0, dry.stderr[-3000:]
        assert "Nothing to be done" in dry.stdout + dry.stderr, (workdir, planned_jobs(dry.stdout), dry.stdout[-3000:])
        (workdir / "added.yaml").write_text(added)
        dry = _dry_run(workdir, snakefile, "added.yaml")
        assert dry.returncode == 0, dry.stderr[-3000:]
        assert planned_jobs(dry.stdout) == {"train_fold": 2, "write_manifest": 1, "make_report": 1, "all": 1}, \
            (workdir, dry.stdout[-3000:])


def test_predict_needs_only_the_experiments_folder_and_checks_its_lesion_model(cohort, tmp_path, capsys):
    """`msamil predict --models DIR --slide S` on the workflow's lesion experiment: the manifest
    gives every setting, the lesion model included (the slide gets a lesion mask), and a lesion
    model other than the manifest's is refused."""
    wd, full = cohort
    models = wd / "results" / "models" / "lesion"
    manifest = json.loads((models / "manifest.json").read_text())
    assert manifest["patches"]["strategy"] == "lesion" and manifest["segmentation"]["checkpoint_sha256"]
    assert [(r["repeat"], r["fold"]) for r in manifest["runs"]] == [(0, 0), (0, 1)]
    from msamil_core.cli import main

    new = wd / full.path.iloc[-1]  # the slide the first run has not seen
    out = tmp_path / "out"
    assert main(["predict", "--models", str(models), "--slide", str(new), "--out", str(out), "--threads", "1",
                 "--no-progress"]) == 0
    assert (out / "slides" / new.stem / "lesion_mask.png").is_file()
    record = json.loads((out / "predictions.json").read_text())
    assert record["classes"] == manifest["classes"] and len(record["slides"][0]["folds"]) == 2
    other = tmp_path / "other.pt"
    other.write_bytes((wd / "results" / "segmentation" / "checkpoint.pt").read_bytes() + b"\0")
    assert main(["predict", "--models", str(models), "--slide", str(new), "--out", str(tmp_path / "refused"),
                 "--segmentation-checkpoint", str(other)]) == 1
    assert "is not the one the experiment was trained with" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_odd_slide_ids_went_through_every_step_to_the_report(cohort):
    wd, full = cohort
    results = wd / "results"
    for slide in ODD_IDS:
        for name in ("thumbnail.png", "tissue_mask.png", "lesion_mask.png", "patches.geojson"):
            assert (results / "slides" / slide / name).stat().st_size > 0, (slide, name)
        assert len(list(results.glob(f"features/*/{slide}.pt"))) == 3, slide
    # fold 0's test slides have heatmaps, the odd ids among them; the report lists every slide
    summary = pd.read_csv(results / "heatmaps" / "lesion" / "fold0" / "summary.csv", dtype=str, keep_default_na=False)
    assert set(summary["slide_id"]) & set(ODD_IDS)
    predictions = pd.concat(pd.read_csv(results / "models" / "lesion" / f"fold{k}" / "predictions.csv",
                                        dtype=str, keep_default_na=False) for k in (0, 1))
    assert set(ODD_IDS) <= set(predictions["slide_id"])


def _replan(wd, config: str) -> dict[str, int]:
    (wd / "edited.yaml").write_text(config)
    dry = snakemake(wd, "--cores", "2", "-n", "--configfile", "config.yaml", "edited.yaml",
                    "--config", f"slides={wd / 'first.csv'}")
    assert dry.returncode == 0, dry.stderr[-3000:]
    return planned_jobs(dry.stdout)


def test_editing_experiments_heatmaps_or_report_reruns_no_per_slide_step(cohort):
    wd, _ = cohort
    # a subset of the experiments (the lesion one only), other heatmap settings
    jobs = _replan(wd, "heatmaps: {experiments: [lesion], top_k: 3}\n"
                       "experiments:\n  - {name: lesion, model: abmil.base}\n")
    assert not PER_SLIDE_RULES & set(jobs), jobs
    assert jobs.get("draw_heatmaps") == 1
    # an experiment added on existing bags trains only itself
    jobs = _replan(wd, "experiments:\n  - {name: lesion, model: abmil.base}\n  - {name: tissue, model: abmil.base, strategy: tissue}\n"
                       "  - {name: random, model: abmil.base, strategy: random}\n  - {name: more, model: abmil.base, scales: [20x]}\n")
    assert not PER_SLIDE_RULES & set(jobs), jobs
    assert jobs["train_fold"] == 2
    # an e2e run (as config/e2e-demo.yaml adds) re-extracts with its own encoder only
    jobs = _replan(wd, (REPO / "config" / "e2e-demo.yaml").read_text()
                   .replace("resnet18_64", "tiny").replace("k_study: [4, 16, 64]", "k_study: [2]")
                   .replace("msamil_multiscale", "lesion").replace("model: msamil.base", "model: abmil.base"))
    assert not PER_SLIDE_RULES & set(jobs), jobs
    assert jobs["extract_e2e_features"] > 0 and jobs["train_e2e"] == 1


# last: it changes the cohort the tests above read
def test_a_fixed_slide_comes_back_in(cohort):
    wd, full = cohort
    shutil.copyfile(wd / full.path.iloc[0], wd / "broken.svs")  # the scan is redone
    screen = snakemake(wd, "--cores", "2", "--until", "screen_slides", "--configfile", "config.yaml",
                       "--config", f"slides={wd / 'first.csv'}")
    assert screen.returncode == 0, workflow_failure(screen, wd)
    kept = pd.read_csv(wd / "results" / "cohort" / "slides.csv")
    left = pd.read_csv(wd / "results" / "cohort" / "screening_left_out.csv")
    assert BROKEN in set(kept.slide_id) and list(left.what) == ["annotation"]
    dry = snakemake(wd, "--cores", "2", "-n", "--configfile", "config.yaml", "--config", f"slides={wd / 'first.csv'}")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert f"slide={BROKEN}" in dry.stdout and planned_jobs(dry.stdout)["extract_features"] == 1
