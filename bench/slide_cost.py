"""What one slide costs a finished run: CPU time, wall time and peak memory of each per-slide step,
and the disk its results take, from the run's Snakemake benchmark files and results folder.

Per-slide steps (benchmarks/<rule>/[<encoder>/]<slide>.tsv, Snakemake's `benchmark:` records):
preprocess_slide, segment_lesions, make_patch_coordinates, extract_features. `cpu_time` is the
CPU seconds of the step's processes (user + system); a GPU step's GPU time is not in it (Snakemake
does not record it). With `features.server: true` (the default) the encoding runs in the feature
server, which outlives the job and is not one of its processes: measure extraction with
`features: {server: false}` in a config file, where each job loads the encoder and encodes itself. Disk (file sizes, as `du --apparent-size`): the slide's folder
(results/slides/<slide>/: thumbnail, masks, meta.json, GeoJSON), its coordinates
(results/coords/**/<slide>.h5) and its feature bags (results/features/*/<slide>.pt).

    python bench/slide_cost.py                 # the run in the current folder
    python bench/slide_cost.py --run /path/to/run
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

STEPS = ("preprocess_slide", "segment_lesions", "make_patch_coordinates", "extract_features")


def step_costs(benchmarks: Path) -> pd.DataFrame:
    """One row per step and slide: step, slide, cpu_s, wall_s, max_rss_mb."""
    rows = []
    for step in STEPS:
        for tsv in sorted((benchmarks / step).rglob("*.tsv")):
            record = pd.read_csv(tsv, sep="\t").iloc[-1]  # the last run of the step
            rows.append({"step": step, "slide": tsv.stem, "cpu_s": float(record["cpu_time"]),
                         "wall_s": float(record["s"]), "max_rss_mb": float(record["max_rss"])})
    return pd.DataFrame(rows, columns=["step", "slide", "cpu_s", "wall_s", "max_rss_mb"])


def disk_costs(results: Path) -> pd.DataFrame:
    """One row per kind of result and slide: what, slide, mb."""
    rows = []
    for folder in sorted(p for p in (results / "slides").glob("*") if p.is_dir()):
        rows.append({"what": "slide folder", "slide": folder.name,
                     "mb": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6})
    for what, files in (("coordinates", (results / "coords").rglob("*.h5")),
                        ("feature bags", (results / "features").glob("*/*.pt"))):
        sizes: dict[str, int] = {}
        for f in files:
            sizes[f.stem] = sizes.get(f.stem, 0) + f.stat().st_size
        rows += [{"what": what, "slide": slide, "mb": size / 1e6} for slide, size in sorted(sizes.items())]
    return pd.DataFrame(rows, columns=["what", "slide", "mb"])


def cost_table(run: Path) -> pd.DataFrame:
    """Per step and kind of result: slides measured, then median and max per slide."""
    steps = step_costs(run / "benchmarks")
    disk = disk_costs(run / "results")
    rows = []
    for step, table in steps.groupby("step", sort=False):
        rows.append({"per slide": f"{step}: CPU min", "slides": len(table),
                     "median": table["cpu_s"].median() / 60, "max": table["cpu_s"].max() / 60})
        rows.append({"per slide": f"{step}: wall min", "slides": len(table),
                     "median": table["wall_s"].median() / 60, "max": table["wall_s"].max() / 60})
        rows.append({"per slide": f"{step}: peak RSS MB", "slides": len(table),
                     "median": table["max_rss_mb"].median(), "max": table["max_rss_mb"].max()})
    if len(steps):
        total = steps.groupby("slide")["cpu_s"].sum() / 60
        rows.append({"per slide": "all per-slide steps: CPU min", "slides": len(total),
                     "median": total.median(), "max": total.max()})
    for what, table in disk.groupby("what", sort=False):
        rows.append({"per slide": f"disk: {what}, MB", "slides": len(table),
                     "median": table["mb"].median(), "max": table["mb"].max()})
    if len(disk):
        total = disk.groupby("slide")["mb"].sum()
        rows.append({"per slide": "disk: all, MB", "slides": len(total), "median": total.median(), "max": total.max()})
    return pd.DataFrame(rows, columns=["per slide", "slides", "median", "max"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("."), help="the run's folder (benchmarks/, results/)")
    args = parser.parse_args()
    table = cost_table(args.run)
    if table.empty:
        raise SystemExit(f"{args.run}: no per-slide benchmark files or results")
    print(table.to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
