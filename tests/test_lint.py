"""Static checks of the workflow: `snakemake --lint`, the profiles and the conda environments."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import yaml

from conftest import REPO


def _snakemake(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def test_lint_reports_nothing():
    out = _snakemake("--lint")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Lints for" not in out.stdout + out.stderr, out.stdout + out.stderr
    assert "Congratulations, your workflow is in a good condition!" in out.stdout + out.stderr


def test_the_slurm_profile_sizes_every_rule_and_gives_gpu_rules_a_gpu(tmp_path):
    """Each rule of the demo's DAG has threads and resources in the SLURM profile, and asks
    there for a GPU exactly when the rule itself does (`gpu=1` where it uses one)."""
    dry = _snakemake("-n", "--forceall", "--cores", "2", "--directory", str(tmp_path))
    assert dry.returncode == 0, dry.stderr[-3000:]
    gpu = {}
    for rule, job in re.findall(r"^(?:local)?rule (\w+):\n(.*?)(?=^\S|\Z)", dry.stdout + dry.stderr, re.M | re.S):
        if rule != "all":
            gpu[rule] = "gpu=1" in job
    assert {"extract_features", "train_fold"} <= {r for r, g in gpu.items() if g}
    profile = yaml.safe_load((REPO / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    for rule, asks in gpu.items():
        assert rule in profile["set-threads"], rule
        resources = profile["set-resources"][rule]
        assert {"mem_mb", "runtime"} <= set(resources) and "attempt" in resources["mem_mb"], rule
        assert resources.get("gpu", 0) == int(asks), rule


def test_conda_env_pip_installs_this_checkout(tmp_path):
    """What `conda env create` does with the env file's pip section, where Snakemake builds it:
    the specs go to a requirements file beside the copy under .snakemake/conda/ and pip runs
    there; ${MSAMIL_SOURCE} (set by the Snakefile) must lead pip to this repository."""
    env = yaml.safe_load((REPO / "envs" / "msamil.yaml").read_text())
    pip_specs = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_dir = tmp_path / ".snakemake" / "conda"
    conda_dir.mkdir(parents=True)
    (conda_dir / "condaenv.requirements.txt").write_text("\n".join(pip_specs) + "\n")
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-build-isolation", "--quiet",
         "--report", str(report), "-r", "condaenv.requirements.txt"],
        capture_output=True, text=True, cwd=conda_dir, env=dict(os.environ, MSAMIL_SOURCE=str(REPO)), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    installs = json.loads(report.read_text())["install"]
    assert [i["metadata"]["name"] for i in installs] == ["msamil"]
    assert installs[0]["download_info"]["url"] == REPO.as_uri()
    # and the Snakefile sets the variable to its own folder
    assert "os.environ.update(MSAMIL_SOURCE=workflow.basedir)" in (REPO / "Snakefile").read_text()
