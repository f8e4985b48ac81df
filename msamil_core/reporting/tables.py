"""Report sections for lesion segmentation and the patch-selection strategies (MsaMIL-Net
section 3.1 and Table 1).

* ``segmentation_table``: the UNet++ hold-out (and validation) IoU and Dice from
  ``msamil segment-train``'s metrics.json.
* ``strategy_table``: experiments that differ only in their patch-selection strategy (same
  model, model options, task and scales), each with its test AUC (mean ± sd over folds), the
  patches extracted for it (all slides, all scales), and the wall time of extracting them plus
  running the fold models on the test parts.

  One ``extract_features`` job per slide writes the bags of all strategies, encoding the patches
  they share once. A strategy's extraction time is, slide by slide, the job's wall time
  (Snakemake's ``benchmark:`` file) times the share of the job's patches that strategy needs
  (``len(bag) / patches_encoded``). Inference time is each fold's ``inference_seconds``
  (metrics.json: loading the test bags and running the model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import torch

from ..errors import MsamilError


def _key(config: dict, *fields: str) -> tuple:
    return tuple(json.dumps(config.get(f), sort_keys=True) for f in fields)


def strategy_groups(configs: dict[str, dict]) -> list[list[str]]:
    """Groups of from-scratch experiments identical but for ``strategy`` (two or more strategies)."""
    groups: dict[tuple, list[str]] = {}
    for name, cfg in configs.items():
        if cfg.get("strategy") and not cfg.get("init_from") and not cfg.get("e2e"):
            groups.setdefault(_key(cfg, "model", "model_args", "task", "scales"), []).append(name)
    return [g for g in groups.values() if len({configs[n]["strategy"] for n in g}) > 1]


def bag_counts(feature_dir: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Slide -> (patches in its bag, patches its extraction job encoded) for a feature folder."""
    counts = {}
    for path in sorted(Path(feature_dir).glob("*.pt")):
        bag = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        n = len(bag["coords"])
        counts[path.stem] = (n, int(bag.get("patches_encoded", n)) or 1)
    return counts


def benchmark_seconds(path: Path) -> float | None:
    """Wall-clock seconds (``s`` column, summed) of a Snakemake benchmark file; None when missing."""
    if not path.exists():
        return None
    try:
        return float(pd.read_csv(path, sep="\t")["s"].sum())
    except (OSError, ValueError, KeyError, pd.errors.ParserError) as exc:
        raise MsamilError(f"{path}: not a Snakemake benchmark file ({exc})") from None


def extraction_seconds(counts: dict[str, tuple[int, int]], job_dir: Path) -> float | None:
    """Each slide's extraction-job wall time times this bag's share of the job's patches, summed;
    None when a slide's benchmark file is missing."""
    total = 0.0
    for slide, (n, encoded) in counts.items():
        seconds = benchmark_seconds(job_dir / f"{slide}.tsv")
        if seconds is None:
            return None
        total += seconds * n / encoded
    return total


def strategy_table(summary: pd.DataFrame, configs: dict[str, dict], features: dict[str, str],
                   benchmarks: str | os.PathLike | None, inference: dict[str, float | None]) -> pd.DataFrame | None:
    """One row per experiment of each strategy group; None when there is no such group.

    ``inference``: experiment -> seconds its fold models took on their test parts (None: unknown).
    """
    groups = strategy_groups(configs)
    if not groups:
        return None
    rows = []
    bench = Path(benchmarks) if benchmarks else None
    for group in groups:
        for name in sorted(group, key=lambda n: configs[n]["strategy"]):
            strategy = configs[name]["strategy"]
            auc = summary[(summary.experiment == name) & (summary.metric == "auc")]
            feature_dir = features.get(name)
            counts = bag_counts(feature_dir) if feature_dir else None
            extract_s = None
            if bench is not None and counts is not None:
                job = Path(feature_dir).name.removesuffix(f"-{strategy}")  # <key>-<hash>: the extraction job's folder
                extract_s = extraction_seconds(counts, bench / "extract_features" / job)
            infer_s = inference.get(name)
            total = None if extract_s is None or infer_s is None else extract_s + infer_s
            rows.append({
                "experiment": name,
                "strategy": strategy,
                "AUC": "n/a" if auc.empty else f"{float(auc['mean'].iloc[0]):.3f} ± {float(auc['sd'].iloc[0]):.3f}",
                "patches extracted": None if counts is None else sum(n for n, _ in counts.values()),
                "extraction (s)": None if extract_s is None else round(extract_s, 1),
                "inference (s)": None if infer_s is None else round(infer_s, 1),
                "extraction + inference (s)": None if total is None else round(total, 1),
            })
    return pd.DataFrame(rows)


def segmentation_table(metrics_path: str | os.PathLike) -> pd.DataFrame:
    """Hold-out and validation IoU/Dice of the lesion segmentation model."""
    try:
        with open(metrics_path) as f:
            metrics = json.load(f)
    except (OSError, ValueError) as exc:
        raise MsamilError(f"{metrics_path}: cannot read segmentation metrics ({exc}); rerun segment-train") from None
    rows = []
    for part in ("holdout", "val"):
        m = metrics.get(part) or {}
        rows.append({"part": "hold-out patients" if part == "holdout" else "validation patients",
                     "slides": m.get("n_slides"), "IoU": m.get("iou"), "Dice": m.get("dice"),
                     "pooled IoU": m.get("pooled_iou")})
    return pd.DataFrame(rows).round(4)
