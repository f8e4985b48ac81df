"""The workflow through `--executor slurm` on a real one-node SLURM cluster that the test starts
(munged, slurmctld and slurmd on localhost, Debian's slurm-wlm and munge), compared with the same
workflow run on the workstation profile. `.ci/run` installs the Debian packages."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO

pytestmark = pytest.mark.slow

SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol")
GPU_RULES = {"extract_features", "train_fold"}
# the per-slide rules of the tiny config and their groups: one SLURM job per SLIDES_PER_JOB[group]
# slides; only the extraction's asks for a GPU
SLIDE_GROUPS = {"slide_prep": {"preprocess_slide"}, "slide_features": {"extract_features"}}
SLIDE_RULES = set().union(*SLIDE_GROUPS.values())
# the test profile's: the 4 slides in one job per group, as the shipped profile's 32 and 8 would
# put them; smaller batches would only queue for a small node's CPUs, one after another
# (tests/test_cluster_preview.py checks the batching of 30 slides)
SLIDES_PER_JOB = {"slide_prep": 4, "slide_features": 4}
LOCAL_RULES = {"index_bags", "index_thumbnails", "write_manifest", "list_left_out"}  # run where Snakemake runs, not through sbatch
FAKE_GPUS = ["/dev/null", "/dev/zero"]  # gres "gpu" devices: SLURM counts them, torch sees no CUDA


def _why_no_slurm() -> str | None:
    missing = [p for p in SLURM_PROGRAMS if shutil.which(p) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing; .ci/run apt-installs slurm-wlm and munge)"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("MemTotal:"))


class Cluster:
    """munged + slurmctld + slurmd on localhost, with their config, state and logs in `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count()
        self.memory_mb = _memory_mb()
        self.jobcomp = root / "jobcomp.txt"  # SLURM's record of every finished job
        # Jobs run `srun` with the SLURM_* variables removed (snakemake-executor-plugin-slurm-jobstep
        # keeps only the job's identity), SLURM_CONF among them: on a cluster srun then reads
        # /etc/slurm/slurm.conf; here an srun first on PATH hands it this cluster's config.
        bin_dir = root / "bin"
        bin_dir.mkdir()
        (bin_dir / "srun").write_text(f'#!/bin/sh\nSLURM_CONF={root / "slurm.conf"} exec {shutil.which("srun")} "$@"\n')
        (bin_dir / "srun").chmod(0o755)
        self.env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        self.procs: list[subprocess.Popen] = []

    def _start(self, name: str, argv: list[str]) -> None:
        with open(self.root / f"{name}.out", "w") as out:
            self.procs.append(subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT))

    def start(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(mode=0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = munge / "munge.socket"
        self._start("munged", ["munged", "--foreground", "--force", f"--socket={socket_path}", f"--key-file={key}",
                               f"--log-file={munge / 'munged.log'}", f"--pid-file={munge / 'munged.pid'}",
                               f"--seed-file={munge / 'munged.seed'}"])
        for sub in ("state", "spool"):
            (self.root / sub).mkdir()
        r = self.root
        (r / "slurm.conf").write_text(f"""\
ClusterName=msamiltest
SlurmctldHost={self.host}(127.0.0.1)
AuthType=auth/munge
AuthInfo=socket={socket_path}
CredType=cred/munge
SlurmUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MinJobAge=3600
ReturnToService=2
MpiDefault=none
GresTypes=gpu
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} Gres=gpu:{len(FAKE_GPUS)} State=UNKNOWN
PartitionName=msamil Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        (r / "gres.conf").write_text("".join(f"NodeName={self.host} Name=gpu File={d}\n" for d in FAKE_GPUS))
        time.sleep(0.5)  # munged's socket
        self._start("slurmctld", ["slurmctld", "-D", "-i"])
        self._start("slurmd", ["slurmd", "-D", "-N", self.host])
        for _ in range(60):
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited; see {r}/*.out and {r}/*.log")
            try:
                state = self.run("sinfo", "-h", "-o", "%t")
            except subprocess.TimeoutExpired:
                state = "no answer"
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the test's SLURM node did not come up (state {state!r}); see {r}/*.log")

    def run(self, *argv: str) -> str:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=15).stdout.strip()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def finished_jobs(self) -> dict[str, dict[str, str]]:
        """SLURM's job completion records: job id -> fields (JobState, Name, ...)."""
        records = {}
        for line in self.jobcomp.read_text().splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            records[fields["JobId"]] = fields
        return records

    def job(self, job_id: str) -> dict[str, str]:
        """slurmctld's view of a job (kept MinJobAge seconds after it ends): TresPerJob, ..."""
        return dict(re.findall(r"(\w+)=(\S*)", self.run("scontrol", "-o", "show", "job", job_id)))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = _why_no_slurm()
    if reason:
        pytest.skip(reason)
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _demo_cohort(root: Path) -> Path:
    """Four demo slides of four patients written with the demo's writer, labelled by the demo's
    architecture (two per class: the fewest that two label-stratified folds accept)."""
    from msamil_core.cohort import demo

    table = demo.cohort_table(12, seed=0, out_dir=root / "demo_data").drop_duplicates("patient_id")
    table["label"] = table["label"].str.split("_").str[1]
    table = table.groupby("label").head(2)
    demo.generate_cohort(root / "demo_data", n_slides=12, seed=0, patch_size=128, threads=2,
                         slide_ids=list(table["slide_id"]))
    sheet = root / "slides.csv"
    table[["slide_id", "path", "label", "patient_id"]].to_csv(sheet, index=False)
    return sheet


CONFIG = """\
slides: {sheet}
patches: {{patch_size: 128, strategy: tissue}}
export_geojson: false
encoders: {{tiny: {{name: resnet18, input_size: 32}}}}
features: {{default_encoder: tiny, batch_size: 64, workers: 0}}
splits: {{n_folds: 2}}
training: {{epochs: 2, patience: 0}}
experiments: [{{name: abmil, model: abmil.base, scales: [20x, 10x, 5x]}}]
"""


def _start_snakemake(workdir: Path, env: dict, *args: str) -> subprocess.Popen:
    """Snakemake on the tiny config in `workdir`, its output going to workdir/snakemake.out."""
    env = dict(env, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", OMP_NUM_THREADS="1")
    with open(workdir / "snakemake.out", "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
             "--configfile", "tiny.yaml", *args],
            stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=workdir,
        )


def _test_profile(path: Path, memory_mb: int, cpus: int) -> Path:
    """The shipped SLURM profile, with memory requests capped so that this small node runs as
    many jobs side by side as it has CPUs, and a slide job's steps side by side no more than it
    has CPUs (a job that asks for more than the node has would wait for ever)."""
    profile = yaml.safe_load((REPO / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    for resources in [profile["default-resources"], *profile["set-resources"].values()]:
        if "mem_mb" in resources:
            resources["mem_mb"] = f"min({resources['mem_mb']}, {memory_mb})"
    assert {"slide_prep=32", "slide_features=8", "slide_masks=32"} <= set(profile["group-components"])
    profile["group-components"] = [f"{group}={n}" for group, n in SLIDES_PER_JOB.items()] + ["slide_masks=32"]
    assert "slide_slots=8" in profile["resources"]
    profile["resources"] = [f"slide_slots={min(8, cpus)}" if r.startswith("slide_slots=") else r for r in profile["resources"]]
    path.mkdir()
    (path / "config.yaml").write_text(yaml.safe_dump(profile))
    return path


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """The same tiny workflow through SLURM and on the workstation profile, side by side (the
    SLURM run mostly waits between status checks): name -> (workdir, exit status, output)."""
    root = tmp_path_factory.mktemp("cohort")
    sheet = _demo_cohort(root)
    for name in ("slurm", "local"):
        (root / name).mkdir()
        (root / name / "tiny.yaml").write_text(CONFIG.format(sheet=sheet))
    profile = _test_profile(root / "profile", cluster.memory_mb // cluster.cpus, cluster.cpus)
    start = time.monotonic()
    procs = {
        "slurm": _start_snakemake(root / "slurm", cluster.env, "--workflow-profile", str(profile),
                                  "--max-threads", str(cluster.cpus), "--slurm-init-seconds-before-status-checks", "1",
                                  "--slurm-status-command", "squeue", "--slurm-keep-successful-logs",
                                  "--latency-wait", "5"),
        "local": _start_snakemake(root / "local", os.environ, "--cores", "2",
                                  "--workflow-profile", str(REPO / "workflow" / "profiles" / "default")),
    }
    out = {}
    for name, proc in procs.items():
        try:
            proc.wait(timeout=900)
        finally:
            proc.kill()
        out[name] = (root / name, proc.returncode, (root / name / "snakemake.out").read_text())
        print(f"{name} run: {time.monotonic() - start:.0f} s")
    return out


def _submissions(output: str) -> dict[str, str]:
    """SLURM job id -> rule (or `group_<id>_<rules>` for a group job, its log folder), from the
    executor's 'submitted with SLURM jobid' lines."""
    found = re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/(rule_\w+|group_[\w-]+)/", output)
    return {job: name.removeprefix("rule_") for job, name in found}


def _rule_counts(output: str) -> dict[str, int]:
    """Jobs per rule that the run announced (a rule's block and its jobid; a group's jobs are
    indented). Not the 'Job stats' table: it is printed once, before the screening checkpoint
    has decided which slides the per-slide jobs are for."""
    jobs, rule = set(), None
    for line in output.splitlines():
        m = re.match(r"^\s*(?:local)?(?:rule|checkpoint) (\w+):$", line)
        if m:
            rule = m.group(1)
            continue
        m = re.match(r"^\s*jobid: (\d+)$", line)
        if m and rule:
            jobs.add((rule, m.group(1)))
            rule = None
    counts = {}
    for rule, _ in jobs:
        if rule != "all":
            counts[rule] = counts.get(rule, 0) + 1
    return counts


def test_every_job_goes_through_sbatch_and_slides_are_batched_per_job(cluster, runs):
    wd, status, output = runs["slurm"]
    assert status == 0, output[-4000:]
    submitted = _submissions(output)
    planned = _rule_counts(output)
    slides = planned["preprocess_slide"]
    assert set(planned) >= SLIDE_RULES | {"index_bags"} and all(planned[r] == slides for r in SLIDE_RULES)
    # one sbatch per SLIDES_PER_JOB[group] slides for their per-slide steps, one per job of every
    # other rule, none for local rules
    groups = {job: name for job, name in submitted.items() if name.startswith("group_")}
    group_of = {job: next(g for g in SLIDE_GROUPS if name.startswith(f"group_{g}_")) for job, name in groups.items()}
    assert slides == 4 and sorted(group_of.values()) == sorted(g for g, n in SLIDES_PER_JOB.items() for _ in range(slides // n))
    cohort = {r: n for r, n in planned.items() if r not in SLIDE_RULES | LOCAL_RULES}
    assert len(submitted) == len(groups) + sum(cohort.values()) and cohort.keys() >= {"make_splits", "train_fold"}
    assert {r: list(submitted.values()).count(r) for r in cohort} == cohort
    # each slide job ran its group's per-slide steps of its slides, and no other slide's; an
    # extraction job's slides shared one feature server (the first started it, the others found
    # it: this cluster's proctrack/linuxproc lets it outlive the srun step of its slide, see
    # README: Throughput)
    per_job = {}
    for job, name in groups.items():
        group = group_of[job]
        (log,) = (wd / "logs" / "slurm" / name).rglob(f"{job}.log")
        text = log.read_text()
        steps = set(re.findall(r"^(?:local)?rule (\w+):", text, re.M))
        ids = set(re.findall(r"slide=([^,\s]+)", text))
        assert steps == SLIDE_GROUPS[group] and len(ids) == SLIDES_PER_JOB[group], (job, steps, ids)
        if group == "slide_features":
            starts = [slide for slide in ids if "started feature server" in
                      next((wd / "logs" / "extract_features").glob(f"*/{slide}.log")).read_text()]
            assert len(starts) == 1, (job, starts)
        per_job.update({(group, slide): job for slide in ids})
    assert len(per_job) == slides * len(SLIDE_GROUPS)
    # and SLURM itself ran each one to completion, under this run's job name
    records = cluster.finished_jobs()
    names = {records[job]["Name"] for job in submitted}
    assert len(names) == 1 and all(records[job]["JobState"] == "COMPLETED" for job in submitted)
    # GPU rules asked SLURM for a GPU (sbatch --gpus=1), the others for none; of the slide jobs
    # only the extraction's holds one
    asked = {job: cluster.job(job) for job in submitted}
    for job, name in submitted.items():
        tres = asked[job].get("TresPerJob", "")
        assert ("gpu:1" in tres) == (name in GPU_RULES or group_of.get(job) == "slide_features"), (name, tres)
    # `msamil cluster-preview` (a dry run of the same workflow) foretold what each slide job asked for
    preview = _preview(wd, wd.parent / "profile", cluster)
    foretold = sorted((g, _requested(o)) for g, o in preview if g in SLIDE_GROUPS)
    assert foretold == sorted((group_of[job], _granted(asked[job])) for job in groups), preview
    # each job's SLURM log is where the profile says
    for job, name in submitted.items():
        folder = name if job in groups else f"rule_{name}"
        assert list((wd / "logs" / "slurm" / folder).rglob(f"{job}.log")), (name, job)


def _preview(wd: Path, profile: Path, cluster) -> list[tuple[str, str]]:
    """`msamil cluster-preview` of the finished run planned again (--forceall): (group or rule,
    sbatch options) per sbatch job."""
    out = subprocess.run(
        [str(Path(sys.executable).parent / "msamil"), "cluster-preview", "--profile", str(profile), "--",
         "-s", str(REPO / "Snakefile"), "--directory", str(wd), "--configfile", "tiny.yaml", "--forceall",
         "--max-threads", str(cluster.cpus)],
        cwd=wd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = []
    for line in out.stdout.splitlines()[1:-1]:
        n, what, options = re.match(r"^\s*(\d+)  (.+?)  +(-.*)$", line).groups()
        m = re.match(r"group (\w+):", what)
        rows += [(m.group(1) if m else what, options)] * int(n)
    return rows


def _requested(options: str) -> tuple[int, int, int, int]:
    """(CPUs, memory MB, minutes, GPUs) of sbatch options."""
    o = dict(re.findall(r"(--cpus-per-task|--mem|-t|--gpus)[= ](\d+)", options))
    return int(o["--cpus-per-task"]), int(o["--mem"]), int(o["-t"]), int(o.get("--gpus", 0))


def _granted(job: dict[str, str]) -> tuple[int, int, int, int]:
    """(CPUs, memory MB, minutes, GPUs) of a job as slurmctld records it."""
    days, _, clock = job["TimeLimit"].rpartition("-")
    h, m, s = ([0, 0] + [int(x) for x in clock.split(":")])[-3:]
    memory = job["MinMemoryNode"]
    mb = int(float(memory[:-1]) * {"M": 1, "G": 1024, "T": 1024 * 1024}[memory[-1]])
    gpus = re.search(r"gpu:(\d+)", job.get("TresPerJob", ""))
    return int(job["NumCPUs"]), mb, int(days or 0) * 1440 + h * 60 + m + (s > 0), int(gpus.group(1)) if gpus else 0


def _shape(path: Path):
    """What a result file holds, without its values."""
    if path.suffix == ".h5":
        with h5py.File(path) as f:
            return {k: f[k].shape for k in f}
    if path.suffix == ".pt":
        obj = torch.load(path, weights_only=True)
        return {k: tuple(v.shape) if torch.is_tensor(v) else
                {n: tuple(t.shape) for n, t in v.items()} if k == "state_dict" else type(v).__name__ for k, v in obj.items()}
    if path.suffix == ".png":
        return Image.open(path).size
    if path.suffix == ".csv":
        table = pd.read_csv(path)
        return list(table.columns), len(table)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return sorted(data) if isinstance(data, dict) else [sorted(d) if isinstance(d, dict) else d for d in data]
    return path.stat().st_size > 0


def test_slurm_outputs_match_a_local_run(runs):
    (slurm_wd, slurm, slurm_out), (local_wd, local, local_out) = runs["slurm"], runs["local"]
    assert slurm == 0 and local == 0, (slurm_out[-2000:], local_out[-2000:])
    files = sorted(p.relative_to(local_wd / "results") for p in (local_wd / "results").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(slurm_wd / "results") for p in (slurm_wd / "results").rglob("*") if p.is_file())
    assert any(f.name == "checkpoint.pt" for f in files) and Path("report/index.html") in files
    for f in files:
        assert _shape(slurm_wd / "results" / f) == _shape(local_wd / "results" / f), f
