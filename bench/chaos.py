"""Chaos bench: kill running jobs at random moments, rerun until done, compare with a clean run.

    python bench/chaos.py                       # 20 kills on an 8-slide demo cohort
    python bench/chaos.py --kills 3 --quick     # the short version tests/test_chaos.py runs
    python bench/chaos.py --workdir /tmp/chaos --keep

Two copies of one small demo cohort are run through the real workflow (`snakemake` on this
checkout's Snakefile) with the same config:

* clean: one uninterrupted run;
* chaos: runs in which, at random moments (seeded), randomly chosen running jobs are killed
  (spread over the workflow's steps, see :func:`chaos_run`):
  SIGKILL for any `msamil` command and for the feature servers that extraction jobs talk to, SIGTERM or SIGKILL for the training commands (`train`,
  `e2e`, `segment-train`, which save `resume.pt` on SIGTERM), and now and then the whole run
  (Snakemake and every job, as when a node or a login session dies). Each run that ends with
  kills still to make, or with failed jobs, is followed by another (`--rerun-incomplete
  --keep-going`) until one completes and a dry run plans nothing.

Then every file under the two `results/` folders is compared: HDF5 files (coordinates) by every
dataset and attribute bit for bit, torch files (bags, checkpoints) by every tensor bit for bit and
every other value, JSON and CSV by their values, images by their pixels, anything else by its
bytes. Values that measure time (keys or columns naming seconds, time, date, duration) and the
report's HTML pages and plots of times are not compared; they are counted as skipped. Hidden
files left under `results/` after the last run (an interrupted writer's temporary) are listed.

Printed: kills made (by signal and command), runs, files compared, skipped, differences (each
named) and leftovers. Exit status 1 when a difference or a leftover was found.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAINING_COMMANDS = {"train", "e2e", "segment-train"}
# Keys and CSV columns whose values are clock readings, not results.
TIME_WORDS = ("second", "time", "date", "duration", "elapsed", "started", "finished", "host",
              # the digest of a checkpoint file, whose training history holds seconds per epoch
              "checkpoint_sha256")
# Files that show clock readings by design: the report's pages and its time plots.
TIME_FILES = (".html", ".log")

CONFIG = """\
patches: {patch_size: 256, min_fraction: 0.7, strategy: lesion, random_n: 8}
encoders:
  tiny: {name: resnet18, input_size: 32}
features: {default_encoder: tiny, batch_size: 16, workers: 0}
segmentation: {epochs: 3, input_size: 128, crop_size: 64, batch_size: 4}
splits: {n_folds: 2, val_fraction: 0.25}
training: {epochs: 3, patience: 0}
heatmaps: {experiments: [lesion], top_k: 2}
experiments:
  - {name: lesion, model: abmil.base}
"""
# the full bench also trains a multi-scale model; --quick (the test) only the one above
MORE_EXPERIMENTS = """\
  - {name: multiscale, model: msamil.base, model_args: {embed_dim: 64, mlp_ratio: 2}, scales: [20x, 10x, 5x]}
"""


def log(*parts) -> None:
    print(*parts, flush=True)


# -- the cohort and the workflow ----------------------------------------------------------------
def make_cohort(root: Path, n_slides: int, quick: bool = False) -> Path:
    """A demo cohort of ``n_slides`` with two labels (so 2 folds find both), and the config."""
    import pandas as pd

    data = root / "data"
    if not (data / "slides.csv").exists():
        subprocess.run(
            [sys.executable, "-m", "msamil_core", "demo", "--out", str(data), "--n-slides", str(n_slides),
             "--patch-size", "256", "--threads", "2"],
            check=True, capture_output=True,
        )
    sheet = pd.read_csv(data / "slides.csv")
    sheet["label"] = sheet["label"].str.split("_").str[1]  # the architecture: two classes
    sheet["path"] = [str((data / p).resolve()) for p in sheet["path"]]
    if "annotation" in sheet:
        sheet["annotation"] = [str((data / a).resolve()) if isinstance(a, str) else a for a in sheet["annotation"]]
    sheet.to_csv(root / "slides.csv", index=False)
    (root / "config.yaml").write_text(CONFIG + ("" if quick else MORE_EXPERIMENTS))
    return root / "slides.csv"


def snakemake_argv(workdir: Path, sheet: Path, cores: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--cores", str(cores), "--configfile", str(workdir.parent / "config.yaml"),
            "--config", f"slides={sheet}", *extra]


# The feature servers of the bench's runs live here (XDG_RUNTIME_DIR of the runs, made by main),
# apart from the user's own: the bench kills them too, and stops those left at the end.
SERVERS = Path(tempfile.gettempdir())


def environment() -> dict[str, str]:
    # the jobs' `msamil` is this interpreter's
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                XDG_RUNTIME_DIR=str(SERVERS))


def nothing_to_do(workdir: Path, sheet: Path) -> bool:
    out = subprocess.run(snakemake_argv(workdir, sheet, 1, "-n"), capture_output=True, text=True,
                         env=environment(), cwd=workdir)
    return out.returncode == 0 and "Nothing to be done" in out.stdout + out.stderr


# -- jobs and kills -----------------------------------------------------------------------------
def msamil_command(proc) -> str | None:
    """The `msamil` subcommand a process runs (``msamil extract ...`` -> ``extract``), or None."""
    try:
        argv = proc.cmdline()
    except Exception:  # gone, or a zombie
        return None
    for i, arg in enumerate(argv[:3]):
        if Path(arg).name == "msamil" and i + 1 < len(argv):
            return argv[i + 1]
        if arg == "msamil_core" and i > 0 and argv[i - 1] == "-m" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def feature_servers() -> list[tuple[object, str]]:
    """(process, "feature-server") of each feature server the runs started (they outlive their
    jobs, outside the run's process tree)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if "msamil_core.feature_server" in argv and any(a.startswith(str(SERVERS)) for a in argv):
            found.append((proc, "feature-server"))
    return found


def running_jobs(run_pid: int) -> list[tuple[object, str]]:
    """(process, command) of each `msamil` command the run has started and that is still running;
    reader processes of a command (its own children) are not jobs."""
    import psutil

    try:
        children = psutil.Process(run_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    jobs = {p.pid: (p, msamil_command(p)) for p in children}
    found = []
    for pid, (proc, command) in jobs.items():
        if command is None or command == "demo":
            continue
        try:
            parent = proc.ppid()
        except psutil.NoSuchProcess:
            continue
        if parent in jobs and jobs[parent][1] is not None:
            continue
        found.append((proc, command))
    return sorted(found, key=lambda job: job[0].pid)


def chaos_run(workdir: Path, sheet: Path, cores: int, rng: random.Random, kills_left: int,
              delay: tuple[float, float], whole_run_share: float, kills: Counter) -> tuple[int, int]:
    """One Snakemake run with kills at random moments: (exit status, kills made).

    Each job that starts draws an age (uniform in ``delay`` seconds) at which it may be killed;
    when it reaches it, it is killed with probability 1 / (1 + 3 n), n the kills its command has
    had so far, else spared for good. So the kills spread over the workflow's steps (the many
    short per-slide jobs of the first steps would otherwise take them all) and land at random
    moments inside jobs, mid-write included."""
    argv = snakemake_argv(workdir, sheet, cores, "--rerun-incomplete", "--keep-going")
    out = open(workdir / "chaos.log", "a")
    run = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=environment(), cwd=workdir,
                           start_new_session=True)
    made = 0
    due: dict[int, float] = {}  # pid -> age (s) at which the job may be killed; inf once spared
    per_command: Counter = Counter(k.split(" ")[0] for k in kills.elements())
    while run.poll() is None:
        time.sleep(0.1)
        if made >= kills_left:
            continue
        for proc, command in running_jobs(run.pid) + feature_servers():
            try:
                age = time.time() - proc.create_time()
            except Exception:  # it ended in between
                continue
            if age < due.setdefault(proc.pid, rng.uniform(*delay)):
                continue
            if rng.random() >= 1.0 / (1 + 3 * per_command[command]):
                due[proc.pid] = float("inf")
                continue
            if rng.random() < whole_run_share:
                os.killpg(run.pid, signal.SIGKILL)
                kills["whole run (SIGKILL)"] += 1
                made += 1
                log(f"  kill {sum(kills.values())}: the whole run, during msamil {command}")
                break
            sig = rng.choice([signal.SIGTERM, signal.SIGKILL]) if command in TRAINING_COMMANDS else signal.SIGKILL
            try:
                proc.send_signal(sig)
            except Exception:  # it ended in between
                continue
            kills[f"{command} ({sig.name})"] += 1
            per_command[command] += 1
            made += 1
            log(f"  kill {sum(kills.values())}: {sig.name} to msamil {command} (pid {proc.pid}, {age:.1f} s old)")
            break
    status = run.wait()
    out.close()
    if status != 0 and made and kills.get("whole run (SIGKILL)"):
        # a killed Snakemake leaves its lock behind
        subprocess.run(snakemake_argv(workdir, sheet, 1, "--unlock"), capture_output=True, env=environment(),
                       cwd=workdir)
    return status, made


# -- comparison ---------------------------------------------------------------------------------
def is_time_key(key) -> bool:
    key = str(key).lower()
    return any(word in key for word in TIME_WORDS)


def same_value(a, b, where: str, skipped: list[str]) -> list[str]:
    """Differences between two loaded values (nested dicts, lists, tensors, arrays, numbers)."""
    import numpy as np
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(map(str, set(a) ^ set(b)))[:4]} in one only"]
        diffs = []
        for k in a:
            if is_time_key(k):
                skipped.append(f"{where}.{k}")
                continue
            diffs += same_value(a[k], b[k], f"{where}.{k}", skipped)
        return diffs
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same_value(x, y, f"{where}[{i}]", skipped)]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        def raw(t):  # the tensor's bytes: NaNs compare equal, -0.0 and 0.0 do not
            return t.detach().cpu().reshape(-1).contiguous().view(torch.uint8)

        equal = a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw(a), raw(b))
        return [] if equal else [f"{where}: tensors differ"]
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        equal = a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        return [] if equal else [f"{where}: arrays differ"]
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:  # both NaN
        return []
    return [] if type(a) is type(b) and a == b else [f"{where}: {a!r:.60} vs {b!r:.60}"]


def load_h5(path: Path) -> dict:
    import h5py

    out: dict = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            attrs = {f"@{k}": v for k, v in obj.attrs.items()}
            out[name] = {"attrs": attrs, **({"data": obj[()]} if isinstance(obj, h5py.Dataset) else {})}
        f.visititems(visit)
        out["/"] = {"attrs": {f"@{k}": v for k, v in f.attrs.items()}}
    return out


def load_csv(path: Path) -> dict:
    import pandas as pd

    frame = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
    return {c: list(frame[c]) for c in frame.columns}


def load_image(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def compare_file(a: Path, b: Path, rel: str, skipped: list[str]) -> list[str]:
    import torch

    suffix = a.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        return same_value(load_h5(a), load_h5(b), rel, skipped)
    if suffix == ".pt":
        return same_value(torch.load(a, weights_only=True, map_location="cpu"),
                          torch.load(b, weights_only=True, map_location="cpu"), rel, skipped)
    if suffix in (".json", ".geojson"):
        return same_value(json.loads(a.read_text()), json.loads(b.read_text()), rel, skipped)
    if suffix == ".npz":
        import numpy as np

        with np.load(a) as x, np.load(b) as y:
            return same_value(dict(x), dict(y), rel, skipped)
    if suffix in (".csv", ".tsv"):
        return same_value(load_csv(a), load_csv(b), rel, skipped)
    if suffix in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        return same_value(load_image(a), load_image(b), rel, skipped)
    return [] if a.read_bytes() == b.read_bytes() else [f"{rel}: bytes differ"]


def compare_results(clean: Path, chaos: Path) -> tuple[int, list[str], list[str], list[str]]:
    """(files compared, differences, skipped values/files, hidden leftovers under chaos)."""
    files = lambda root: {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}  # noqa: E731
    hidden = lambda rel: any(part.startswith(".") for part in rel.split("/"))  # noqa: E731
    a, b = files(clean), files(chaos)
    leftovers = sorted(rel for rel in b if hidden(rel))
    a = {rel for rel in a if not hidden(rel)}
    b = {rel for rel in b if not hidden(rel)}
    diffs = [f"{rel}: only in the clean run" for rel in sorted(a - b)]
    diffs += [f"{rel}: only in the chaos run" for rel in sorted(b - a)]
    skipped: list[str] = []
    compared = 0
    for rel in sorted(a & b):
        if rel.endswith(TIME_FILES) or (rel.startswith("report/") and rel.endswith(".png") and "time" in rel):
            skipped.append(rel)
            continue
        try:
            diffs += compare_file(clean / rel, chaos / rel, rel, skipped)
        except Exception as exc:  # unreadable: a truncated file is a difference
            diffs.append(f"{rel}: cannot be read ({type(exc).__name__}: {exc})")
        compared += 1
    return compared, diffs, skipped, leftovers


# -- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="kills to make (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments and targets (default 0)")
    parser.add_argument("--slides", type=int, default=8, help="slides in the demo cohort (default 8)")
    parser.add_argument("--cores", type=int, default=2, help="snakemake --cores (default 2)")
    parser.add_argument("--delay", type=float, nargs=2, default=(0.3, 6.0), metavar=("MIN", "MAX"),
                        help="age of a job (seconds) at which it may be killed, drawn uniformly (default 0.3 6)")
    parser.add_argument("--whole-run-share", type=float, default=0.1,
                        help="share of kills that kill the whole run instead of one job (default 0.1)")
    parser.add_argument("--max-runs", type=int, default=0, help="give up after this many runs (default kills + 5)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to run (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--quick", action="store_true", help="one experiment instead of two (the test's run)")
    args = parser.parse_args(argv)

    global SERVERS
    root = args.workdir or Path(tempfile.mkdtemp(prefix="msamil-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    SERVERS = Path(tempfile.mkdtemp(prefix="msamil-chaos-servers-"))
    try:
        sheet = make_cohort(root, args.slides, args.quick)
        clean, chaos = root / "clean", root / "chaos"
        for d in (clean, chaos):
            d.mkdir(exist_ok=True)
        start = time.monotonic()
        if not (clean / "results" / "report" / "index.html").exists():
            done = subprocess.run(snakemake_argv(clean, sheet, args.cores), capture_output=True, text=True,
                                  env=environment(), cwd=clean)
            if done.returncode != 0:
                log(done.stderr[-3000:])
                log("chaos: the clean run failed; fix that first")
                return 2
        log(f"clean run: {time.monotonic() - start:.0f} s")

        rng = random.Random(args.seed)
        kills: Counter = Counter()
        runs = 0
        max_runs = args.max_runs or args.kills + 5
        start = time.monotonic()
        while True:
            runs += 1
            left = args.kills - sum(kills.values())
            log(f"chaos run {runs} ({left} kills left)")
            status, _ = chaos_run(chaos, sheet, args.cores, rng, left, tuple(args.delay), args.whole_run_share,
                                  kills)
            if status == 0 and nothing_to_do(chaos, sheet):
                if sum(kills.values()) < args.kills:
                    log(f"the run completed before all kills were made ({sum(kills.values())} of {args.kills})")
                break
            if runs >= max_runs:
                log(f"chaos: no complete run after {runs} runs; see {chaos / 'chaos.log'}")
                return 2
        log(f"chaos runs: {time.monotonic() - start:.0f} s")

        compared, diffs, skipped, leftovers = compare_results(clean / "results", chaos / "results")
        log(f"kills made: {sum(kills.values())} ({', '.join(f'{k}: {n}' for k, n in sorted(kills.items()))})")
        log(f"runs: {runs}")
        log(f"files compared: {compared}; values and files skipped as clock readings: {len(skipped)}")
        kinds = Counter(s.rsplit(".", 1)[-1] if not s.endswith(TIME_FILES) else Path(s).suffix for s in skipped)
        log(f"  skipped: {', '.join(f'{k} x{n}' for k, n in sorted(kinds.items()))}")
        log(f"differences: {len(diffs)}")
        for d in diffs[:50]:
            log(f"  {d}")
        log(f"leftover temporary files: {len(leftovers)}")
        for rel in leftovers[:20]:
            log(f"  {rel}")
        return 1 if diffs or leftovers else 0
    finally:
        for proc, _ in feature_servers():
            proc.kill()
        shutil.rmtree(SERVERS, ignore_errors=True)
        if not args.keep and args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
