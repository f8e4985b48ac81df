"""Screening: which slides and annotations a run can use, and why the others are left out.

In a cohort of thousands a few files are always unreadable, truncated, blank or mislabelled. The
workflow screens every slide of the sheet once, before any per-slide step, with what those steps
would do first: the slide opens, its µm/px is known, its thumbnail-level image decodes, it holds
tissue (the tissue step's own mask and threshold), and its annotation, if any, parses and fits
the slide. A slide that fails is left out of the run with its one-line reason; a bad annotation
leaves out only the annotation (the slide is still segmented, trained on and evaluated). The
screened sheet (kept slides; bad annotations blanked; paths inside the project relative to the
screened sheet, so that a moved project or a copied results folder still finds them) is what
every later step reads, and ``left_out.csv`` lists what was left out; the report shows it.

Verdicts are cached by the slide and annotation files' path (as the project sees it), size and
modification time and by the settings, so a rerun screens only new or changed files: a fixed
file comes back in.

Whether a run may leave slides out is :class:`~msamil_core.settings.ScreeningSettings`: by
default it may, up to a share of the sheet, above which the screening fails (nothing is
written) and names the first reasons.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import MsamilError
from ..fileio import atomic_path, write_json
from ..layout import project_path
from ..settings import ScreeningSettings, ThumbnailSettings, TissueSettings
from .sheet import slide_mpp

log = logging.getLogger(__name__)

LEFT_OUT_COLUMNS = ("slide_id", "patient_id", "label", "what", "reason")


@dataclass(frozen=True)
class ScreenSettings:
    """What the screening checks a slide with: the thumbnail step's and the tissue step's
    settings (the same decision they will make)."""

    thumbnail: ThumbnailSettings = field(default_factory=ThumbnailSettings)
    tissue: TissueSettings = field(default_factory=TissueSettings)

    def key(self) -> dict:
        return {"thumbnail": self.thumbnail.to_dict(), "tissue": self.tissue.to_dict()}


def _one_line(exc: BaseException) -> str:
    """An exception as one line: our own messages as they are, others with their type."""
    text = str(exc) if isinstance(exc, MsamilError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


def _stat(path: str) -> dict | None:
    """A file as the cache knows it: its path as the project sees it (relative inside it), size and
    modification time (None: absent).
    A file replaced, fixed or touched gets a new entry; reading no byte keeps a rerun over
    thousands of unchanged slides at a stat each."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"path": project_path(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def screen_key(row: pd.Series, settings: ScreenSettings) -> str:
    """What a verdict depends on: the files (path, size, mtime), the sheet's mpp and the settings."""
    annotation = row.get("annotation", "") or ""
    key = {"slide": _stat(row["path"]) if row["path"] else None,
           "annotation": _stat(annotation) if annotation else None,
           "mpp": slide_mpp(row), "settings": settings.key()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def screen_slide(row: pd.Series, settings: ScreenSettings) -> dict:
    """The verdict on one sheet row: ``{"slide": reason or None, "annotation": reason or None}``.

    Anything that goes wrong while opening, reading or judging the slide is a reason (one line),
    not an exception: screening exists to keep such files out of the run.
    """
    from ..wsi.annotations import annotation_mask
    from ..wsi.slide import open_slide
    from ..wsi.thumbnail import thumbnail_and_meta, thumbnail_mpp
    from ..wsi.tissue import slide_tissue_mask

    sid = str(row["slide_id"])
    verdict: dict = {"slide": None, "annotation": None}
    try:
        if not row["path"]:
            raise MsamilError(f"slide {sid!r}: the sheet gives no path; add the slide file's path")
        with open_slide(row["path"], sid, slide_mpp(row)) as slide:
            rgb, meta = thumbnail_and_meta(slide, settings.thumbnail.long_side)
        slide_tissue_mask(rgb, settings.tissue, sid, thumbnail_mpp(meta))
    except Exception as exc:  # noqa: BLE001 - any failure to read a slide is a reason to leave it out
        verdict["slide"] = _one_line(exc)
        return verdict
    annotation = row.get("annotation", "") or ""
    if annotation:
        try:
            annotation_mask(annotation, sid, (meta["width"], meta["height"]),
                            (meta["thumbnail"]["width"], meta["thumbnail"]["height"]))
        except Exception as exc:  # noqa: BLE001
            verdict["annotation"] = _one_line(exc)
    return verdict


def _read_cache(path: Path | None) -> dict:
    if path is None or not path.exists():
        return {}
    try:
        cache = json.loads(path.read_text())
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        log.warning("screening cache %s is unreadable; every slide is screened again", path)
        return {}


def cached_verdicts(sheet: pd.DataFrame, settings: ScreenSettings, cache: str | os.PathLike | None,
                    keys: dict[str, str] | None = None) -> dict[str, dict]:
    """The verdicts of ``cache`` that still hold for the sheet's rows (files and settings
    unchanged); rows screened never or since changed are absent."""
    cached = _read_cache(Path(cache) if cache is not None else None)
    keys = keys or {sid: screen_key(row, settings) for sid, row in sheet.iterrows()}
    return {sid: cached[sid]["verdict"] for sid, key in keys.items()
            if isinstance(cached.get(sid), dict) and cached[sid].get("key") == key}


def screen_cohort(sheet: pd.DataFrame, settings: ScreenSettings, cache: str | os.PathLike | None = None,
                  threads: int = 1) -> dict[str, dict]:
    """Verdicts of every slide of a checked sheet (indexed by slide_id), reusing the cached ones
    whose files and settings are unchanged; the cache is rewritten with the current verdicts."""
    cache_path = Path(cache) if cache is not None else None
    keys = {sid: screen_key(row, settings) for sid, row in sheet.iterrows()}
    verdicts = cached_verdicts(sheet, settings, cache_path, keys)
    todo = [sid for sid in sheet.index if sid not in verdicts]
    log.info("screening %d slides (%d unchanged since the last screening)", len(todo), len(verdicts))
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for sid, verdict in zip(todo, pool.map(lambda s: screen_slide(sheet.loc[s], settings), todo)):
            verdicts[sid] = verdict
            if verdict["slide"]:
                log.warning("left out: %s", verdict["slide"])
            elif verdict["annotation"]:
                log.warning("annotation left out: %s", verdict["annotation"])
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache_path, {sid: {"key": keys[sid], "verdict": verdicts[sid]} for sid in sheet.index})
    return verdicts


def keep_usable(sheet: pd.DataFrame, verdicts: dict[str, dict], policy: ScreeningSettings,
                  what: str = "the sheet") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(screened sheet, left-out table) under ``policy``; raises when it forbids the result."""
    bad = [sid for sid in sheet.index if verdicts[sid]["slide"]]
    rows = [(sid, sheet.at[sid, "patient_id"], sheet.at[sid, "label"], "slide", verdicts[sid]["slide"]) for sid in bad]
    rows += [(sid, sheet.at[sid, "patient_id"], sheet.at[sid, "label"], "annotation", verdicts[sid]["annotation"])
             for sid in sheet.index if not verdicts[sid]["slide"] and verdicts[sid]["annotation"]]
    left_out = pd.DataFrame(rows, columns=list(LEFT_OUT_COLUMNS))
    if bad:
        examples = "; ".join(verdicts[sid]["slide"] for sid in bad[:3]) + ("; ..." if len(bad) > 3 else "")
        share = len(bad) / len(sheet)
        if not policy.leave_out:
            raise MsamilError(
                f"{what}: {len(bad)} of {len(sheet)} slides cannot be used ({examples}); fix or remove them, "
                "or set screening.leave_out: true to run without them"
            )
        if share > policy.max_left_out + 1e-12:
            raise MsamilError(
                f"{what}: {len(bad)} of {len(sheet)} slides ({share:.0%}) cannot be used, more than "
                f"screening.max_left_out ({policy.max_left_out:.0%}): {examples}; fix the files (or the sheet) "
                "or raise screening.max_left_out"
            )
    kept = sheet.drop(index=bad).copy()
    if "annotation" in kept.columns:
        for sid in kept.index:
            if verdicts[sid]["annotation"]:
                kept.at[sid, "annotation"] = ""
    if kept.empty:
        raise MsamilError(f"{what}: no slide can be used ({examples}); fix the files or the sheet")
    return kept, left_out


def screening_record(sheet: pd.DataFrame, settings: ScreenSettings, policy: ScreeningSettings) -> dict:
    """What a screening was made from: its settings and policy, and a digest of which of the
    sheet's slide and annotation files existed (their paths as the project sees them, so that the
    record holds in a moved project). The workflow compares it with the config and the files of a
    later run to know, while it plans, whether the screened sheet is still current."""
    paths = list(sheet["path"]) + [p for p in sheet.get("annotation", []) if p]
    present = sorted(project_path(p) for p in paths if p and os.path.exists(p))
    record = {"settings": settings.key(), "policy": policy.to_dict(),
              "files": hashlib.sha256("\n".join(present).encode()).hexdigest()}
    return json.loads(json.dumps(record))


def write_screened(kept: pd.DataFrame, left_out: pd.DataFrame, sheet_out: str | os.PathLike,
                   left_out_path: str | os.PathLike) -> None:
    """The screened sheet (CSV; paths of files inside the project relative to the screened sheet,
    others absolute; the mpp column as numbers or empty) and the left-out table (CSV: slide_id,
    patient_id, label, what, reason)."""
    kept = kept.reset_index(drop=True)
    folder = Path(sheet_out).resolve().parent
    for column in ("path", "annotation"):
        if column in kept.columns:
            kept[column] = [_sheet_relative(p, folder) for p in kept[column]]
    if "mpp" in kept.columns:
        kept["mpp"] = ["" if (isinstance(v, float) and math.isnan(v)) else repr(float(v)) for v in kept["mpp"]]
    for frame, target in ((left_out, left_out_path), (kept, sheet_out)):  # the sheet last: it marks completion
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            frame.to_csv(tmp, index=False)


def _sheet_relative(path: str, folder: Path) -> str:
    """A file's path as a sheet in ``folder`` holds it: relative when the file is inside the project."""
    if not path:
        return path
    inside = project_path(path)
    return os.path.relpath(os.path.abspath(inside), folder) if not os.path.isabs(inside) else inside


# An empty bag is a few kB (its strings and empty tensors); a bag holding a patch of any encoder
# is near or above this only with thousands of patches, so larger bags need not be opened.
EMPTY_BAG_MAX_BYTES = 1 << 20
AFTER_SCREENING = "after the screening: "  # how left_out.csv's later rows begin


def left_out_after_screening(sheet: pd.DataFrame, bag_indexes: list[str | os.PathLike]) -> pd.DataFrame:
    """The kept slides of the screened ``sheet`` whose bags hold no patch (tiles that failed to
    decode: the bag's ``left_out`` reason; no patch kept at any scale), read from the feature
    folders' indexes (``bags.tsv``: slide_id, bag): one row per slide (LEFT_OUT_COLUMNS), ``what``
    ``slide`` when every bag of it is empty, else ``bags`` (left out of the experiments on those
    folders only)."""
    from ..features.bags import load_bag

    empty: dict[str, dict[str, list[str]]] = {}  # slide -> reason -> feature folders
    total: dict[str, int] = {}
    for index in bag_indexes:
        table = pd.read_csv(index, sep="\t", dtype=str, keep_default_na=False)
        for sid, bag_path in zip(table["slide_id"], table["bag"]):
            total[sid] = total.get(sid, 0) + 1
            if os.path.getsize(bag_path) > EMPTY_BAG_MAX_BYTES:
                continue
            bag = load_bag(bag_path, require_coords=False)
            if len(bag):
                continue
            reason = bag.left_out or "no patch kept at any scale"
            empty.setdefault(sid, {}).setdefault(reason, []).append(Path(bag_path).parent.name)
    rows = []
    for sid in (s for s in sheet.index if s in empty):
        reasons = "; ".join(f"{reason} (bags: {', '.join(folders)})" for reason, folders in empty[sid].items())
        what = "slide" if sum(map(len, empty[sid].values())) == total[sid] else "bags"
        rows.append((sid, sheet.at[sid, "patient_id"], sheet.at[sid, "label"], what, AFTER_SCREENING + reasons))
    return pd.DataFrame(rows, columns=list(LEFT_OUT_COLUMNS))


def cohort_left_out(screened_sheet: str | os.PathLike, screening_left_out: str | os.PathLike,
                    bag_indexes: list[str | os.PathLike], policy: ScreeningSettings, out: str | os.PathLike) -> pd.DataFrame:
    """``left_out.csv``: what the screening left out, then the slides left out after it
    (:func:`left_out_after_screening`), under the screening's ``policy`` (the share of the sheet
    left out in all); written atomically. Returns the table."""
    from .sheet import load_sheet

    sheet = load_sheet(screened_sheet)
    screened = read_left_out(screening_left_out)
    after = left_out_after_screening(sheet, bag_indexes)
    gone = after[after["what"] == "slide"]
    if len(gone):
        n_sheet = len(sheet) + int((screened["what"] == "slide").sum())
        n_left = len(gone) + int((screened["what"] == "slide").sum())
        reasons = [r.removeprefix(AFTER_SCREENING) for r in gone["reason"]]
        examples = "; ".join(f"{s}: {r}" for s, r in zip(gone["slide_id"][:3], reasons[:3]))
        for sid, reason in zip(gone["slide_id"], reasons):
            log.warning("slide %r left out after the screening: %s", sid, reason)
        if not policy.leave_out:
            raise MsamilError(f"{len(gone)} slide(s) cannot be used after the screening ({examples}); fix or remove "
                              "them, or set screening.leave_out: true to run without them")
        if n_left / n_sheet > policy.max_left_out + 1e-12:
            raise MsamilError(f"{n_left} of {n_sheet} slides ({n_left / n_sheet:.0%}) are left out, more than "
                              f"screening.max_left_out ({policy.max_left_out:.0%}); after the screening: {examples}; "
                              "fix the files (or the sheet) or raise screening.max_left_out")
    table = pd.concat([screened, after], ignore_index=True) if len(after) else screened
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False)
    return table


def read_left_out(path: str | os.PathLike) -> pd.DataFrame:
    """A ``left_out.csv`` (empty table when the file is absent)."""
    path = Path(path)
    if not path.exists():
        return pd.DataFrame(columns=list(LEFT_OUT_COLUMNS))
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise MsamilError(f"left-out list {path}: unreadable ({exc}); delete it and rerun the screening") from None
