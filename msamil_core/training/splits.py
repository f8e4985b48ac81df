"""Patient-level, label-stratified k-fold cross-validation splits.

``results/splits/folds.csv`` holds one row per slide:

==========  ===============================================================================
slide_id    the slide (as in the sheet)
patient_id  its patient
label       the patient's label
fold        the test fold of the patient, 0 .. n_folds-1
n_folds     the number of folds (the same on every row; lets a later run check it)
val_rank    a number in [0, 1) fixed by (seed, patient_id); orders patients for validation
==========  ===============================================================================

Only the first four columns are required when a folds file is read, so a hand-made or
external folds file works too (``n_folds`` then is ``max(fold) + 1`` and ``val_rank`` is
recomputed from the seed).

The parts of fold ``k`` (:func:`fold_parts`) are a pure function of the file, ``val_fraction``
and (only when the file has no ``val_rank`` column) the seed:

- test: the slides of the patients with ``fold == k``;
- val: among the other patients, per label, the ``n_val`` with the lowest ``(val_rank,
  patient_id)``, where ``n_val = round_half_up(val_fraction * n)`` for the label's ``n``
  training-fold patients, clamped to ``[1, n - 1]`` so that a label with two or more
  training patients keeps at least one in each of train and val (0 when ``val_fraction`` is 0
  or ``n`` is 1);
- train: the remaining patients.

Whole patients move together, so no patient is ever in two parts of one fold.

Assignment (:func:`make_folds`): patients already in a previous folds file keep their fold;
the others, taken in an order fixed by a hash of (seed, patient_id), each go to the fold with
the fewest patients of their label, ties broken by the fold's total number of patients, then
by fold index. On a fresh cohort this gives every label a count per fold within one of the
others; when the cohort grows it keeps that balance while old patients stay put. Because the
order is a hash of the patient id, the result does not depend on the sheet's row order.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path

import pandas as pd

from ..errors import MsamilError
from ..fileio import atomic_path

log = logging.getLogger("msamil.splits")

REQUIRED_COLUMNS = ("slide_id", "patient_id", "label", "fold")
FOLDS_COLUMNS = (*REQUIRED_COLUMNS, "n_folds", "val_rank")
PARTS = ("train", "val", "test")


def _unit_hash(stream: str, seed: int, patient_id: str) -> float:
    """A number in [0, 1) fixed by (stream, seed, patient_id): stable across runs and platforms
    (unlike ``hash()``), and independent between streams."""
    digest = hashlib.sha256(f"{stream}\0{seed}\0{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def val_rank(patient_id: str, seed: int = 0) -> float:
    """The validation rank of a patient: lower ranks are taken into validation first."""
    return _unit_hash("val-rank", seed, patient_id)


def _slide_table(sheet_df: pd.DataFrame) -> pd.DataFrame:
    """slide_id, patient_id, label as str, one row per slide, in the sheet's order."""
    df = sheet_df
    if "slide_id" not in df.columns and df.index.name == "slide_id":
        df = df.reset_index()
    missing = [c for c in ("slide_id", "patient_id", "label") if c not in df.columns]
    if missing:
        raise MsamilError(f"slide sheet: missing column(s) {', '.join(missing)}; folds need slide_id, patient_id and label")
    table = df.loc[:, ["slide_id", "patient_id", "label"]].astype(str).reset_index(drop=True)
    if table.empty:
        raise MsamilError("slide sheet: no slides to split into folds")
    dup = table["slide_id"][table["slide_id"].duplicated()].unique()
    if len(dup):
        raise MsamilError(f"slide sheet: duplicate slide_id {', '.join(map(repr, dup))}; slide ids must be unique")
    labels = table.groupby("patient_id")["label"].nunique()
    if (labels > 1).any():
        pid = labels.index[labels > 1][0]
        raise MsamilError(f"slide sheet: patient {pid!r} has slides with different labels; a patient must have one label")
    return table


def _check_n_folds(n_folds: int) -> None:
    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 2:
        raise MsamilError(f"the number of folds must be an integer of at least 2, got {n_folds!r}")


def count_folds(folds_df: pd.DataFrame) -> int:
    """The number of folds of a folds table: its ``n_folds`` column, else ``max(fold) + 1``."""
    if "n_folds" in folds_df.columns and len(folds_df):
        return int(folds_df["n_folds"].iloc[0])
    return int(folds_df["fold"].max()) + 1 if len(folds_df) else 0


def make_folds(
    sheet_df: pd.DataFrame, n_folds: int = 5, seed: int = 0, previous: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Assign every patient of a sheet to one of ``n_folds`` label-stratified test folds.

    Args:
        sheet_df: the slide sheet (as from :func:`msamil_core.cohort.sheet.load_sheet`): columns
            ``slide_id`` (or an index of that name), ``patient_id`` and ``label``.
        n_folds: number of folds, at least 2; every label needs at least this many patients.
        seed: fixes the order in which new patients are placed and their ``val_rank``.
        previous: an earlier folds table (:func:`read_folds`); its patients that are still in
            the sheet keep their fold. Patients no longer in the sheet are dropped.

    Returns:
        One row per slide of the sheet, in the sheet's order, with columns
        :data:`FOLDS_COLUMNS` (``fold`` and ``n_folds`` int, ``val_rank`` float).

    Raises:
        MsamilError: fewer than 2 folds, a label with fewer patients than folds, or a
            previous table made with another number of folds.
    """
    _check_n_folds(n_folds)
    slides = _slide_table(sheet_df)
    patients = slides.drop_duplicates("patient_id").set_index("patient_id")["label"]

    counts = patients.value_counts()
    short = counts[counts < n_folds]
    if len(short):
        label, n = short.index[0], int(short.iloc[0])
        fewer = f"use at most {int(counts.min())} folds, or " if counts.min() >= 2 else ""
        raise MsamilError(
            f"label {label!r} has {n} patient(s), fewer than the {n_folds} folds requested: every fold's test part "
            f"needs at least one patient of each label; {fewer}add patients with label {label!r}"
        )

    fold_of: dict[str, int] = {}
    if previous is not None and len(previous):
        previous_folds = count_folds(previous)
        if previous_folds != n_folds:
            raise MsamilError(
                f"the previous folds file has {previous_folds} folds but {n_folds} were requested; request "
                f"{previous_folds} folds to keep the patients' folds, or delete the previous folds file to re-split "
                "every patient (results of the old folds are then not comparable)"
            )
        old = previous.drop_duplicates("patient_id").set_index("patient_id")
        for pid in patients.index.intersection(old.index):
            fold_of[pid] = int(old.at[pid, "fold"])
            if str(old.at[pid, "label"]) != patients[pid]:
                # Kept in its fold all the same: moving it would change an existing test set.
                log.warning(
                    "patient %r: label changed from %r to %r since the folds were made; it keeps fold %d",
                    pid, old.at[pid, "label"], patients[pid], fold_of[pid],
                )

    # Per-label and total patient counts per fold, of the patients placed so far.
    per_label = {label: [0] * n_folds for label in counts.index}
    total = [0] * n_folds
    for pid, fold in fold_of.items():
        per_label[patients[pid]][fold] += 1
        total[fold] += 1
    new = sorted((pid for pid in patients.index if pid not in fold_of), key=lambda p: (_unit_hash("fold-order", seed, p), p))
    for pid in new:
        tally = per_label[patients[pid]]
        fold = min(range(n_folds), key=lambda f: (tally[f], total[f], f))
        fold_of[pid] = fold
        tally[fold] += 1
        total[fold] += 1
    if previous is not None:
        log.info("kept the folds of %d patient(s); placed %d new patient(s)", len(fold_of) - len(new), len(new))
    for label, tally in per_label.items():
        empty = [f for f, n in enumerate(tally) if n == 0]
        if empty:
            # Only possible when patients were removed since the previous split.
            log.warning("label %r has no patient in the test part of fold(s) %s", label, ", ".join(map(str, empty)))

    out = slides.copy()
    out["fold"] = out["patient_id"].map(fold_of).astype(int)
    out["n_folds"] = n_folds
    out["val_rank"] = [val_rank(pid, seed) for pid in out["patient_id"]]
    return out.loc[:, list(FOLDS_COLUMNS)]


def fold_counts(folds_df: pd.DataFrame) -> pd.DataFrame:
    """Patients per label (rows) and test fold (columns) of a folds table."""
    patients = folds_df.drop_duplicates("patient_id")
    table = pd.crosstab(patients["label"], patients["fold"])
    return table.reindex(columns=range(count_folds(folds_df)), fill_value=0)


def _n_val(n_train: int, val_fraction: float) -> int:
    """Validation patients out of a label's ``n_train`` training-fold patients (module docstring)."""
    if val_fraction <= 0 or n_train < 2:
        return 0
    return min(n_train - 1, max(1, math.floor(val_fraction * n_train + 0.5)))


def fold_parts(folds_df: pd.DataFrame, fold: int, val_fraction: float = 0.2, seed: int = 0) -> dict[str, list[str]]:
    """The train, val and test slide ids of one fold (the rule is in the module docstring).

    Args:
        folds_df: a folds table (:func:`read_folds` or :func:`make_folds`).
        fold: the test fold, ``0 <= fold < n_folds``.
        val_fraction: fraction of each label's training-fold patients held out for validation,
            in [0, 1).
        seed: used only when ``folds_df`` has no ``val_rank`` column (to compute it).

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, slide ids in the table's row order.
    """
    n_folds = count_folds(folds_df)
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < n_folds:
        raise MsamilError(f"fold {fold!r} does not exist: the folds file has folds 0 to {n_folds - 1}")
    if not 0.0 <= val_fraction < 1.0:
        raise MsamilError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ranks = folds_df["val_rank"] if "val_rank" in folds_df.columns else folds_df["patient_id"].map(lambda p: val_rank(p, seed))
    patients = folds_df.assign(_rank=ranks.astype(float)).drop_duplicates("patient_id")
    training = patients[patients["fold"] != fold].sort_values(["_rank", "patient_id"])
    val_patients: set[str] = set()
    for _, group in training.groupby("label", sort=True):
        val_patients.update(group["patient_id"].iloc[: _n_val(len(group), val_fraction)])
    part = ["test" if f == fold else "val" if p in val_patients else "train" for f, p in zip(folds_df["fold"], folds_df["patient_id"])]
    return {name: [s for s, q in zip(folds_df["slide_id"], part) if q == name] for name in PARTS}


def training_subset(patient_ids: list[str], labels: list, fraction: float,
                    seed: int = 0) -> list[int]:
    """Which of a fold's training slides a share of its patients keeps (a learning curve's point).

    Per label (the class the experiment trains on), the ``max(1, round_half_up(fraction * n))``
    of the label's ``n`` patients with the lowest ``(_unit_hash("train-subset", seed,
    patient_id), patient_id)`` are kept, with all their slides. The rank does not depend on the
    fraction, so smaller shares are subsets of larger ones, and it depends on the patients and
    ``seed`` only, so every experiment of a fold (transfer and scratch) gets the same subset.

    Returns:
        The indices of the kept slides, ascending.
    """
    if not 0.0 < fraction <= 1.0:
        raise MsamilError(f"train_fraction must be in (0, 1], got {fraction}")
    by_label: dict[str, set[str]] = {}
    for patient, label in zip(patient_ids, labels):
        by_label.setdefault(str(label), set()).add(str(patient))
    keep: set[str] = set()
    for patients in by_label.values():
        ranked = sorted(patients, key=lambda p: (_unit_hash("train-subset", seed, p), p))
        keep.update(ranked[: max(1, math.floor(fraction * len(ranked) + 0.5))])
    return [i for i, p in enumerate(patient_ids) if str(p) in keep]


def read_folds(path: str | os.PathLike) -> pd.DataFrame:
    """Read and check a folds CSV (columns :data:`REQUIRED_COLUMNS`, optional ``n_folds``, ``val_rank``).

    Raises:
        MsamilError: a missing or unreadable file, a missing column, a fold that is not an
            integer in [0, n_folds), a duplicate slide, or a patient in two folds.
    """
    path = Path(path)
    if not path.exists():
        raise MsamilError(f"folds file not found: {path}; make it with `msamil splits`")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise MsamilError(f"folds file {path}: cannot parse ({exc}); remake it with `msamil splits`") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise MsamilError(f"folds file {path}: missing column(s) {', '.join(missing)}; it needs {', '.join(REQUIRED_COLUMNS)}")
    try:
        df["fold"] = df["fold"].astype(int)
        if "n_folds" in df.columns:
            df["n_folds"] = df["n_folds"].astype(int)
        if "val_rank" in df.columns:
            df["val_rank"] = df["val_rank"].astype(float)
    except ValueError as exc:
        raise MsamilError(f"folds file {path}: {exc}; fold and n_folds must be integers, val_rank a number") from None
    if "n_folds" in df.columns and df["n_folds"].nunique() > 1:
        raise MsamilError(f"folds file {path}: n_folds differs between rows; remake it with `msamil splits`")
    n_folds = count_folds(df)
    bad = df[(df["fold"] < 0) | (df["fold"] >= n_folds)]
    if len(bad):
        raise MsamilError(f"folds file {path}: slide {bad['slide_id'].iloc[0]!r} has fold {bad['fold'].iloc[0]}, outside 0..{n_folds - 1}")
    dup = df["slide_id"][df["slide_id"].duplicated()].unique()
    if len(dup):
        raise MsamilError(f"folds file {path}: slide {dup[0]!r} is listed twice")
    split = df.groupby("patient_id")["fold"].nunique()
    if (split > 1).any():
        raise MsamilError(f"folds file {path}: patient {split.index[split > 1][0]!r} is in two folds; a patient must be in one fold")
    return df


def write_folds(path: str | os.PathLike, df: pd.DataFrame) -> None:
    """Write a folds table as CSV, atomically (known columns first, in :data:`FOLDS_COLUMNS` order)."""
    columns = [c for c in FOLDS_COLUMNS if c in df.columns] + [c for c in df.columns if c not in FOLDS_COLUMNS]
    with atomic_path(path) as tmp:
        df.loc[:, columns].to_csv(tmp, index=False)


def split_sheet(sheet_path: str | os.PathLike, out: str | os.PathLike, n_folds: int = 5, seed: int = 0,
                previous: str | os.PathLike | None = None) -> pd.DataFrame:
    """``msamil splits``: the folds of a slide sheet, written to ``out``; patients of ``previous``
    (a folds file, which may be ``out`` itself: it is read first) keep their fold."""
    from ..cohort.sheet import load_sheet

    sheet = load_sheet(sheet_path, need_paths=False)  # folds need patients and labels only
    earlier = read_folds(previous) if previous and Path(previous).exists() else None
    folds = make_folds(sheet, n_folds=n_folds, seed=seed, previous=earlier)
    write_folds(out, folds)
    log.info("%d slides of %d patients in %d folds -> %s; patients per label and fold:\n%s", len(folds),
             folds["patient_id"].nunique(), n_folds, out, fold_counts(folds).to_string())
    return folds
