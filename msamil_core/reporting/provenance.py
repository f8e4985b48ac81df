"""The report's provenance header: when and by which code it was written, from which config, and
the encoders (with the digest of their weights) the experiments' manifests record.

The commit is the msamil checkout's ``git rev-parse HEAD`` when the report is written (the
manifests record the msamil version each experiment was trained with, not a commit); an
installed package outside a git checkout says so instead.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path

import pandas as pd

from .. import __version__

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding msamil_core/


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(PACKAGE_ROOT), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):  # no git on this machine
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_commit() -> str:
    """The commit of the msamil checkout this code runs from, ``+ uncommitted changes`` when its
    tracked files differ from it, or ``not a git checkout`` (an installed package: a repository
    that merely holds the environment, e.g. ``.venv/`` in a clone, does not count)."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != PACKAGE_ROOT:
        return "not a git checkout"
    commit = _git("rev-parse", "HEAD") or "no commit yet"
    return f"{commit} + uncommitted changes" if _git("status", "--porcelain", "--untracked-files=no") else commit


def encoder_rows(manifests: dict[str, dict]) -> pd.DataFrame:
    """One row per encoder the experiments used (``{experiment: manifest data}``): its name, its
    weights (file, ``hf-hub:`` repository or random initialisation), its id, whose hash covers
    the weights' bytes (the digest), and the experiments that used it; an e2e twin's folds each
    tune their own copy of the initial encoder it names."""
    rows: dict[str, dict] = {}
    for experiment, data in manifests.items():
        encoder = data.get("encoder") or {}
        tuned = "e2e" in encoder
        record = encoder.get("initial", {}) if tuned else encoder
        settings = record.get("settings") or {}
        weights = settings.get("weights") or f"none (random initialisation, seed {settings.get('seed', 0)})"
        name = settings.get("name", "?")
        row = rows.setdefault(record.get("id", "?"), {
            "encoder": f"{name} ({record['key']})" if record.get("key") else name, "weights": weights,
            "id (name-digest of the weights)": record.get("id", "?"), "experiments": []})
        row["experiments"].append(f"{experiment} (tuned end to end per fold)" if tuned else experiment)
    return pd.DataFrame([{**r, "experiments": ", ".join(r["experiments"])} for r in rows.values()])


def provenance(manifests: dict[str, dict], config_files: list[str | os.PathLike] = ()) -> dict:
    """What the report's header states: ``written`` (UTC time), ``commit`` (:func:`code_commit`),
    ``version`` (msamil's, and those the manifests record when they differ), ``config`` (the
    config files, or that the report was not told them) and ``encoders`` (:func:`encoder_rows`)."""
    trained = sorted({str(d.get("msamil_version")) for d in manifests.values() if d.get("msamil_version")})
    version = __version__
    if trained not in ([], [__version__]):
        version += f" (experiments trained with {', '.join(trained)})"
    return {
        "written": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": code_commit(),
        "version": version,
        "config": ", ".join(str(p) for p in config_files) or "not given (msamil report --config-file)",
        "encoders": encoder_rows(manifests) if manifests else None,
    }
