"""The slide sheet: one row per slide, read and checked before any job runs.

Columns: ``slide_id, path, label, patient_id``, optional ``mpp`` (level-0 µm/px, overrides the
file) and ``annotation`` (lesion annotation file). CSV or TSV (by extension, ``.tsv``/``.tab``
meaning tab-separated). Relative ``path`` and ``annotation`` values are resolved against the
sheet's own folder, so a sheet and its slides can move together.

Every problem is reported with the sheet's name and the row, before Snakemake plans any job.
``slide_id``, ``label`` and ``patient_id`` are used exactly as written, so whitespace around one of
them, or two spellings of a label that differ only by case or whitespace, is refused rather than
made into another slide, class or patient.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pandas as pd

from ..errors import MsamilError

REQUIRED_COLUMNS = ("slide_id", "path", "label", "patient_id")
OPTIONAL_COLUMNS = ("mpp", "annotation")
# Compared as written (never stripped): they name files, classes and patients.
ID_COLUMNS = ("slide_id", "label", "patient_id")
# Whitespace (tabs, U+00A0 and the rest of str.isspace) and the zero-width characters that copying
# from a spreadsheet or web page brings along: invisible, yet "tumor " is not "tumor".
_BLANK = r"[\s\u200b\u200c\u200d\u2060\ufeff]"
_EDGE_BLANKS = re.compile(rf"\A{_BLANK}+|{_BLANK}+\Z")
_BLANKS = re.compile(rf"{_BLANK}+")
_SHOWN = 10  # rows or values named in one message
# Characters a file name cannot hold on the platforms we run on (and "/" never).
_BAD_ID_CHARS = set('/\\\0:*?"<>|')
# Characters the workflow cannot carry in a slide id: Snakemake reads braces in paths as wildcards,
# and a line break or other control character would split a log line or a sheet row.
_WORKFLOW_ID_CHARS = set("{}") | {chr(c) for c in range(32)} | {"\x7f"}


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a CSV or TSV as strings, exactly as written: no type guessing (slide ids like ``001``
    stay as written) and no stripping (:func:`check_sheet` refuses whitespace around an id)."""
    path = Path(path)
    if not path.exists():
        raise MsamilError(f"slide sheet not found: {path}; set `slides` in the config to your sheet (CSV or TSV)")
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise MsamilError(f"slide sheet {path}: cannot parse ({exc}); save it as plain CSV or TSV") from None


def load_sheet(path: str | os.PathLike, need_paths: bool = True) -> pd.DataFrame:
    """Read and check a slide sheet; returns it indexed by ``slide_id``.

    ``path`` and ``annotation`` come back as absolute paths (relative ones are taken from the
    sheet's folder), ``mpp`` as float (NaN where empty), every other column as str. Commands that
    never open a slide (training and evaluation on bags) pass ``need_paths=False``: the ``path``
    column may then be missing or empty ("" where empty).

    Raises:
        MsamilError: a missing column, an empty or unusable slide_id, a duplicate slide_id,
            an empty path/label/patient_id, whitespace around a slide_id/label/patient_id,
            labels that differ only by case or whitespace, a non-positive mpp, or a patient
            with two labels.
    """
    path = Path(path)
    df = read_table(path)
    return check_sheet(df, path, need_paths)


def check_sheet(df: pd.DataFrame, path: str | os.PathLike, need_paths: bool = True) -> pd.DataFrame:
    """The checks and normalisation of :func:`load_sheet` on an already read table."""
    path = Path(path)
    df = df.copy()
    df.columns = [str(c).strip() for c in df.columns]
    required = REQUIRED_COLUMNS if need_paths else tuple(c for c in REQUIRED_COLUMNS if c != "path")
    if "path" not in df.columns and not need_paths:
        df["path"] = ""
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise MsamilError(
            f"slide sheet {path}: missing column(s) {', '.join(missing)}; "
            f"the sheet needs {', '.join(REQUIRED_COLUMNS)} (optional: {', '.join(OPTIONAL_COLUMNS)})"
        )
    if df.empty:
        raise MsamilError(f"slide sheet {path}: no rows; add one row per slide")
    for col in df.columns:
        if col in ID_COLUMNS:
            df[col] = df[col].astype(str)  # as written: whitespace around an id is refused below
        elif pd.api.types.is_string_dtype(df[col].dtype):  # object (pandas 2) or str (pandas 3)
            df[col] = df[col].astype(str).str.strip()
    _refuse_edge_blanks(df, path)
    for i, row in df.iterrows():
        where = f"slide sheet {path}, row {i + 2}"  # +1 header, +1 one-based
        for col in required:
            if not _BLANKS.sub("", row[col]):
                raise MsamilError(f"{where}: empty `{col}`; every slide needs {', '.join(required)}")
        sid = row["slide_id"]
        if sid in (".", "..") or any(ch in _BAD_ID_CHARS for ch in sid):
            raise MsamilError(
                f"{where}: slide_id {sid!r} cannot be a file name; use letters, digits, spaces, '-', '_', '.', '(', ')'"
            )
        if any(ch in _WORKFLOW_ID_CHARS for ch in sid) or sid.startswith("-"):
            raise MsamilError(
                f"{where}: slide_id {sid!r} holds a brace, a line break or control character, or starts with '-' "
                "(the workflow would read braces as wildcards and a leading '-' as an option); rename the slide"
            )
    dup = df["slide_id"][df["slide_id"].duplicated()].unique()
    if len(dup):
        rows = _rows(df.index[df["slide_id"].isin(dup)])
        raise MsamilError(f"slide sheet {path}: duplicate slide_id {', '.join(map(repr, dup))} ({rows}); slide ids must be unique")
    _refuse_label_variants(df, path)
    labels = df.groupby("patient_id")["label"].nunique()
    conflicted = labels[labels > 1]
    if len(conflicted):
        pid = conflicted.index[0]
        found = sorted(df.loc[df["patient_id"] == pid, "label"].unique())
        raise MsamilError(
            f"slide sheet {path}: patient {pid!r} has slides with different labels ({', '.join(found)}); "
            "a patient must have one label: fix the rows or split the patient ids"
        )
    base = path.resolve().parent
    df["path"] = [str(_resolve(p, base)) if p else "" for p in df["path"]]  # "" only without need_paths
    if "annotation" in df.columns:
        df["annotation"] = [str(_resolve(p, base)) if p else "" for p in df["annotation"]]
    if "mpp" in df.columns:
        values = []
        for i, raw in zip(df.index, df["mpp"]):
            if raw == "":
                values.append(math.nan)
                continue
            try:
                v = float(raw)
            except ValueError:
                v = -1.0
            if not (v > 0 and math.isfinite(v)):
                raise MsamilError(f"slide sheet {path}, row {i + 2}: mpp {raw!r} is not a positive number of µm/px")
            values.append(v)
        df["mpp"] = values
    return df.set_index("slide_id", drop=False)


def _some(items: list[str]) -> str:
    """The first few items, comma-separated, and how many more: one readable line for any sheet."""
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def _rows(index) -> str:
    """'row 2' or 'rows 2, 5, ...' (sheet rows: header = row 1) of a default-indexed table."""
    return f"row{'s' if len(index) > 1 else ''} {_some([str(i + 2) for i in index])}"


def _refuse_edge_blanks(df: pd.DataFrame, path: Path) -> None:
    """Whitespace at the start or end of a slide_id, label or patient_id (blank values are left
    to the empty-value check)."""
    for col in ID_COLUMNS:
        values = df[col]
        padded = [bool(_EDGE_BLANKS.search(v)) and bool(_BLANKS.sub("", v)) for v in values]
        if any(padded):
            found = list(values[padded].unique())
            example = found[0]
            raise MsamilError(
                f"slide sheet {path}, {_rows(df.index[padded])}: {col} {_some(list(map(repr, found)))} "
                f"starts or ends with whitespace; remove it (values are used as written: "
                f"{example!r} is not {_EDGE_BLANKS.sub('', example)!r})"
            )


def _refuse_label_variants(df: pd.DataFrame, path: Path) -> None:
    """Two spellings of one label that differ only by case or whitespace ("Tumor" and "tumor",
    "low grade" and "lowgrade"): one class written two ways, not two classes."""
    spellings: dict[str, dict[str, int]] = {}  # folded label -> spelling -> its first row
    for i, label in zip(df.index, df["label"]):
        spellings.setdefault(_BLANKS.sub("", label).casefold(), {}).setdefault(label, i + 2)
    for found in spellings.values():
        if len(found) > 1:
            shown = " and ".join(f"{label!r} (row {row})" for label, row in found.items())
            raise MsamilError(
                f"slide sheet {path}: labels {shown} differ only by case or whitespace; "
                "write each class one way"
            )


def _resolve(value: str, base: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def slide_mpp(row: pd.Series) -> float | None:
    """The sheet's mpp of a row, or None when the file's value is to be used."""
    value = row.get("mpp", math.nan)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
