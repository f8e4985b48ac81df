"""Every shell command the workflow plans survives slide ids and config values a shell would misread."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

# a space, brackets, a quote, `;`, `$` and non-ASCII: all a file name can hold
ODD = "cmu (1) [a] 'x';$y é"
PER_SLIDE_RULES = {"preprocess_slide", "segment_lesions", "make_patch_coordinates", "extract_features",
                   "extract_e2e_features"}
# options whose value is a file of the slide being processed (or NAME=file)
SLIDE_FILE_OPTIONS = {"--slide", "--meta", "--tissue-mask", "--lesion-mask", "--thumbnail", "--coords", "--out",
                      "--strategy-out", "--bag", "--bag-coords", "--geojson"}

CONFIG = """
patches: {strategy: lesion, patch_size: 256}
splits: {n_folds: 2}
export_geojson: true
encoders:
  enc: {name: resnet18, input_size: 32, weights: "my weights/r18 (v2).pth"}
features: {default_encoder: enc, workers: 0}
experiments:
  - {name: on_lesion, model: abmil.base}
  - {name: on_tissue, model: abmil.base, strategy: tissue}
  - {name: on_random, model: abmil.base, strategy: random}
e2e:
  - {name: r1, encoder: enc, experiments: [on_lesion], folds: [0], k: 4, k_study: [2, 4], k_study_steps: 2}
heatmaps: {experiments: [on_lesion]}
predict: {slides: "new slides.csv", experiment: on_lesion}
"""


def planned_commands(stdout: str) -> list[tuple[str, str, str]]:
    """(rule, wildcards, shell command) of each job a `snakemake -n -p` run plans."""
    jobs = []
    for block in re.split(r"\n(?=\s*(?:local)?rule \w+:)", stdout):  # a group's jobs are indented
        rule = re.match(r"\s*(?:local)?rule (\w+):", block)
        command = re.search(r"^Shell command: (.*)$", block, re.M)
        if rule and command and command.group(1) != "None":
            wildcards = re.search(r"^\s*wildcards: (.*)$", block, re.M)
            jobs.append((rule.group(1), wildcards.group(1) if wildcards else "", command.group(1)))
    return jobs


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> list[tuple[str, str, str]]:
    wd = tmp_path_factory.mktemp("quoting")
    (wd / "annotations").mkdir()
    (wd / "my weights").mkdir()  # the encoder's weights file is an input of extraction: it must exist
    (wd / "my weights" / "r18 (v2).pth").write_bytes(b"")
    (wd / "annotations" / f"{ODD}.geojson").write_text("{}")
    (wd / "sheet.csv").write_text(
        "slide_id,path,label,patient_id,annotation\n"
        f"{ODD},slides/{ODD}.svs,a,p1,annotations/{ODD}.geojson\n"
        "plain,slides/plain.svs,b,p2,\n"
        "other,slides/other.svs,a,p3,\n"
        "fourth,slides/fourth.svs,b,p4,\n",
        encoding="utf-8",
    )
    (wd / "new slides.csv").write_text(f"slide_id,path\n{ODD} new,slides/new.svs\n", encoding="utf-8")
    (wd / "odd.yaml").write_text(CONFIG)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(wd), "-n", "-p",
         "--cores", "1", "--configfile", "odd.yaml", "--config", "slides=sheet.csv"],
        capture_output=True, text=True, env=env, cwd=wd, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    return planned_commands(out.stdout)


def test_every_per_slide_rule_is_planned_for_the_odd_slide(dry_run):
    planned = {rule for rule, wildcards, _ in dry_run if ODD in wildcards}
    assert planned == PER_SLIDE_RULES


def test_every_command_is_valid_shell(dry_run):
    assert len(dry_run) > 20
    for rule, wildcards, command in dry_run:
        check = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert check.returncode == 0, (rule, wildcards, command, check.stderr)


def test_the_slide_id_reaches_each_command_as_one_argument(dry_run):
    for rule, wildcards, command in dry_run:
        if ODD not in wildcards:
            continue
        args = shlex.split(command)
        # no argument holds a piece of the id without the whole of it
        assert all(ODD in arg for arg in args if "cmu" in arg), (rule, args)
        assert args[args.index("2>") + 1].endswith(f"{ODD}.log"), (rule, args)
        if "--slide-id" in args:
            assert args[args.index("--slide-id") + 1] == ODD, (rule, args)
        files = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in SLIDE_FILE_OPTIONS]
        assert files and all(ODD in path for path in files), (rule, args)
        if rule == "preprocess_slide":  # lesion patches: it stops at the tissue mask
            assert args[args.index("--tissue-mask") + 1] == f"results/slides/{ODD}/tissue_mask.png"
            assert "--strategy-out" not in args
        if rule == "make_patch_coordinates":
            assert f"random:5x=results/coords/random/5x/{ODD}.h5" in args
            assert args[args.index("--tissue-mask") + 1] == f"results/slides/{ODD}/tissue_mask.png"
            assert args[args.index("--lesion-mask") + 1] == f"results/slides/{ODD}/lesion_mask.png"
            assert args[args.index("--geojson") + 1] == f"results/slides/{ODD}/patches.geojson"
            assert args[args.index("--geojson-strategy") + 1] == "lesion"
        if rule == "extract_features":
            assert args[args.index("--weights") + 1] == "my weights/r18 (v2).pth"
            assert len([a for a in args if a.startswith("tissue=") and a.endswith(f"/{ODD}.h5")]) == 3


def test_cohort_commands_keep_paths_whole(dry_run):
    by_rule = {rule: shlex.split(command) for rule, _, command in dry_run}
    annotation = [a for a in by_rule["train_segmentation"] if a.endswith(".geojson")]
    assert by_rule["train_segmentation"][by_rule["train_segmentation"].index("--thumbnails") + 1] == \
        f"results/slides/{ODD}/thumbnail.png"
    assert annotation == []  # annotations come from the sheet, not the command line
    predict = by_rule["predict_slides"]
    assert predict[predict.index("--sheet") + 1] == "new slides.csv"
    assert "--strategy" not in predict and "--encoder" not in predict  # the manifest's
    manifest = by_rule["write_manifest"]
    settings = json.loads(manifest[manifest.index("--settings") + 1])
    assert settings["encoder"]["weights"] == "my weights/r18 (v2).pth"
    assert settings["patches"]["strategy"] == "lesion"
