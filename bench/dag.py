"""How long Snakemake takes to plan the workflow for large cohorts, against a trivial workflow.

For each N it writes an N-row sheet whose slides are symbolic links to one real slide (default
``../shared/data/slides/CMU-1-Small-Region.svs``), then times, in the same run,

- ``snakemake -n`` of this workflow on that sheet (``patches.strategy: tissue``: per slide one
  preprocessing job (thumbnail, tissue mask, coordinates, GeoJSON) and one extraction, plus the
  cohort steps), and
- ``snakemake -n`` of a trivial workflow of 5 chained ``touch`` jobs per slide (the slide ids
  read from the same sheet with the csv module): what Snakemake itself costs per job,

and prints wall seconds, CPU seconds (user + system of the Snakemake process: on a shared
machine the steadier figure), ms per slide and the peak RSS of each Snakemake process, and the
ratios ours / trivial (goal: <= 1.0), measured side by side.

It then plans adding one slide to a finished run of the first N: the finished run is made by
creating every output file the first dry run lists (empty) and running ``snakemake --touch``,
which touches them job by job in DAG order, so that each output is newer than its inputs, as
after a real run (the screened sheet is the sheet itself: every slide kept); one row is then added
to the sheet, and the dry run must list that slide's per-slide jobs (one each) plus the cohort
steps, and nothing for the other slides.

    python bench/dag.py                       # N = 1000 and 10000, one-slide addition at 1000
    python bench/dag.py --slides 1000 3000 --incremental 0
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from msamil_core.cohort.screening import LEFT_OUT_COLUMNS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SLIDE = REPO.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
PER_SLIDE_RULES = ("preprocess_slide", "extract_features")
BENCH_CONFIG = "patches: {strategy: tissue}\nexport_geojson: true\n"

TRIVIAL_SNAKEFILE = '''
import csv

with open(config["sheet"], newline="") as f:
    SLIDES = [row["slide_id"] for row in csv.DictReader(f)]


rule all:
    input:
        expand("out/{slide}/e.txt", slide=SLIDES),
'''
for _prev, _step in zip("-abcd", "abcde"):
    _input = "" if _prev == "-" else f'    input: "out/{{slide}}/{_prev}.txt"\n'
    TRIVIAL_SNAKEFILE += f'''

rule step_{_step}:
{_input}    output: "out/{{slide}}/{_step}.txt"
    shell: "touch {{output}}"
'''


def write_sheet(path: Path, slides_dir: Path, slide: Path, n: int) -> None:
    """An N-row sheet; slide i is ``slides_dir/s<i>.svs``, a link to ``slide``."""
    slides_dir.mkdir(parents=True, exist_ok=True)
    rows = ["slide_id,path,label,patient_id"]
    for i in range(n):
        link = slides_dir / f"s{i:05d}.svs"
        if not link.is_symlink():
            link.symlink_to(slide)
        rows.append(f"s{i:05d},{link},{'ab'[i % 2]},p{i:05d}")
    path.write_text("\n".join(rows) + "\n")


class Timing(float):
    """Wall seconds of a process, with its CPU seconds (``cpu``) beside them."""

    cpu: float


def run_snakemake(args: list[str], cwd: Path) -> tuple[Timing, float, str]:
    """(seconds, peak RSS in MB, stdout+stderr) of one Snakemake process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = Timing(time.perf_counter() - start)
    seconds.cpu = usage.ru_utime + usage.ru_stime
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"snakemake {' '.join(args)} failed in {cwd}:\n{out[-4000:]}")
    return seconds, usage.ru_maxrss / 1024, out


def job_counts(out: str) -> Counter:
    """Jobs per rule from the dry run's job-stats table."""
    counts = Counter()
    table = out.split("Job stats:", 1)[-1] if "Job stats:" in out else ""
    for line in table.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)\s*$", line.strip())
        if m and m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


def workflow_args(wd: Path) -> list[str]:
    return ["-s", str(REPO / "Snakefile"), "--directory", str(wd), "--cores", "2", "--configfile",
            str(wd / "bench.yaml"), "--config", f"slides={wd / 'sheet.csv'}"]


def planned_outputs(out: str) -> list[str]:
    """Every output file the jobs of a (non-quiet) dry run list."""
    files = []
    for line in out.splitlines():
        m = re.match(r"^\s+output: (.*)$", line)
        if m:
            files += [f.strip() for f in m.group(1).split(", ")]
    return files


def plan(root: Path, slide: Path, n: int) -> tuple[float, float, Counter, str]:
    wd = root / f"cohort{n}"
    wd.mkdir()
    (wd / "bench.yaml").write_text(BENCH_CONFIG)
    write_sheet(wd / "sheet.csv", root / "slides", slide, n)
    seconds, rss, out = run_snakemake([*workflow_args(wd), "-n"], wd)
    return seconds, rss, job_counts(out), out


def plan_trivial(root: Path, n: int) -> tuple[float, float, Counter]:
    wd = root / f"trivial{n}"
    wd.mkdir()
    (wd / "Snakefile").write_text(TRIVIAL_SNAKEFILE)
    seconds, rss, out = run_snakemake(["-s", "Snakefile", "-n", "--cores", "2", "--config",
                                       f"sheet={root / f'cohort{n}' / 'sheet.csv'}"], wd)
    return seconds, rss, job_counts(out)


def add_one_slide(root: Path, slide: Path, n: int, dry_run_out: str) -> None:
    """Finish the N-slide run with `--touch`, add one slide, plan."""
    wd = root / f"cohort{n}"
    start = time.perf_counter()
    for path in planned_outputs(dry_run_out):
        target = wd / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
    # what later steps read of the screening: every slide kept, none left out
    (wd / "results/cohort/slides.csv").write_text((wd / "sheet.csv").read_text())
    (wd / "results/cohort/left_out.csv").write_text(",".join(LEFT_OUT_COLUMNS) + "\n")
    seconds_touch, _, _ = run_snakemake([*workflow_args(wd), "--touch"], wd)
    seconds, rss, out = run_snakemake([*workflow_args(wd), "-n"], wd)
    if "Nothing to be done" not in out:
        raise SystemExit(f"the touched run of {n} slides is not complete:\n{out[-3000:]}")
    print(f"finished run of {n} slides simulated in {time.perf_counter() - start:.1f} s "
          f"(--touch {seconds_touch:.1f} s); its dry run: {seconds:.2f} s, nothing to be done")
    write_sheet(wd / "sheet.csv", root / "slides", slide, n + 1)
    seconds, rss, out = run_snakemake([*workflow_args(wd), "-n"], wd)
    counts = job_counts(out)
    per_slide = {rule: counts.get(rule, 0) for rule in PER_SLIDE_RULES}
    cohort = {rule: c for rule, c in counts.items() if rule not in PER_SLIDE_RULES and rule != "all"}
    ok = all(c == 1 for c in per_slide.values())
    print(f"add 1 slide to {n}: {seconds:6.2f} s (CPU {seconds.cpu:6.2f} s)  peak RSS {rss:6.0f} MB  per-slide jobs {per_slide} "
          f"({'only the new slide' if ok else 'NOT only the new slide'}); cohort jobs {cohort}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slides", type=int, nargs="+", default=[1000, 10000], help="cohort sizes N")
    parser.add_argument("--incremental", type=int, default=1000,
                        help="N of the finished run one slide is added to (0: skip)")
    parser.add_argument("--slide", type=Path, default=DEFAULT_SLIDE, help="the slide every row links to")
    parser.add_argument("--keep", action="store_true", help="keep the working folders")
    args = parser.parse_args(argv)
    if not args.slide.exists():
        raise SystemExit(f"slide {args.slide} not found; give one with --slide")
    root = Path(tempfile.mkdtemp(prefix="msamil-dag-"))
    print(f"working in {root}; snakemake {subprocess.check_output([sys.executable, '-m', 'snakemake', '--version'], text=True).strip()}")
    outs = {}
    for n in args.slides:
        ours, ours_rss, counts, outs[n] = plan(root, args.slide.resolve(), n)
        trivial, trivial_rss, trivial_counts = plan_trivial(root, n)
        print(f"N={n:6d}  workflow: {ours:7.2f} s (CPU {ours.cpu:7.2f} s) {1000 * ours / n:6.2f} ms/slide "
              f"peak RSS {ours_rss:6.0f} MB ({sum(counts.values())} jobs)  |  trivial: {trivial:7.2f} s "
              f"(CPU {trivial.cpu:7.2f} s) {1000 * trivial / n:6.2f} ms/slide peak RSS {trivial_rss:6.0f} MB "
              f"({sum(trivial_counts.values())} jobs)  |  ratio {ours / trivial:.2f} (CPU {ours.cpu / trivial.cpu:.2f})",
              flush=True)
    if args.incremental:
        n = args.incremental
        out = outs.get(n)
        if out is None:
            _, _, _, out = plan(root, args.slide.resolve(), n)
        add_one_slide(root, args.slide.resolve(), n, out)
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
