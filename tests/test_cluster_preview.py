"""msamil cluster-preview: the sbatch options of every job of a SLURM run, from a dry run (the
demo config's 30 forecast slides, nothing made). tests/test_slurm.py checks them against what a
real SLURM run asked for."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

SLIDES = 30  # the demo cohort's


def _preview(workdir: Path, *args: str) -> list[tuple[int, str, str]]:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "msamil"), "cluster-preview", "--profile",
         str(REPO / "workflow" / "profiles" / "slurm"), "--", "-s", str(REPO / "Snakefile"), *args],
        cwd=workdir, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("jobs") and re.match(r"\d+ sbatch jobs", lines[-1]), out.stdout
    return [(int(n), what, options) for n, what, options in
            (re.match(r"^\s*(\d+)  (.+?)  +(-.*)$", line).groups() for line in lines[1:-1])]


def test_slide_steps_go_in_batches_and_only_extraction_holds_a_gpu(tmp_path):
    rows = _preview(tmp_path)
    groups: dict[str, int] = {}
    for n, what, options in rows:
        m = re.match(r"group (\w+): (.*)", what)
        if not m:
            continue
        group, steps = m.groups()
        groups[group] = groups.get(group, 0) + n
        assert ("--gpus=1" in options) == (group == "slide_features"), (what, options)
        if steps == "extract_features x8":  # 8 slides one after another on one GPU: 8 x 60 min
            assert "-t 480" in options, options
        elif group != "slide_features":  # at most 8 slides side by side: 8 x 4000 MB
            assert "--mem 32000" in options, (what, options)
    # the demo trains its lesion model: preprocessing, then the lesion masks and coordinates, then
    # the extraction, each in batches (32, 32 and 8 slides a job)
    assert groups == {"slide_masks": math.ceil(SLIDES / 32), "slide_prep": math.ceil(SLIDES / 32),
                      "slide_features": math.ceil(SLIDES / 8)}
    cohort = {what: options for n, what, options in rows if not what.startswith("group ")}
    assert "--gpus=1" in cohort["train_fold"] and "--gpus" not in cohort["screen_slides"]
    assert "index_bags" not in cohort  # a local rule: no sbatch
