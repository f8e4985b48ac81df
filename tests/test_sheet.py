"""Slide sheets: good sheets load, each kind of bad sheet names the row and the fix."""

from __future__ import annotations

import math

import pytest

from msamil_core.errors import MsamilError
from msamil_core.cohort.sheet import load_sheet, slide_mpp

HEADER = "slide_id,path,label,patient_id,mpp\n"


def write(tmp_path, text, name="sheet.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_sheet_resolves_paths_and_mpp(tmp_path):
    p = write(tmp_path, HEADER + "001,slides/a.svs,tumor,p1,\nb (2),/abs/b.ndpi,normal,p2,0.25\n")
    df = load_sheet(p)
    assert list(df.index) == ["001", "b (2)"]  # ids stay strings as written
    assert df.loc["001", "path"] == str(tmp_path / "slides" / "a.svs")
    assert df.loc["b (2)", "path"] == "/abs/b.ndpi"
    assert math.isnan(df.loc["001", "mpp"]) and slide_mpp(df.loc["001"]) is None
    assert slide_mpp(df.loc["b (2)"]) == 0.25


def test_tsv_sheet(tmp_path):
    p = write(tmp_path, "slide_id\tpath\tlabel\tpatient_id\na\ta.svs\tx\tp\n", "s.tsv")
    assert list(load_sheet(p).index) == ["a"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("slide_id,path,label\na,a.svs,x\n", r"missing column\(s\) patient_id"),
        (HEADER + "a,a.svs,x,p1,\na,b.svs,x,p2,\n", r"duplicate slide_id 'a' \(rows 2, 3\)"),
        (HEADER + "a,a.svs,x,p1,\nb,b.svs,y,p1,\n", r"patient 'p1' has slides with different labels"),
        (HEADER + "a,,x,p1,\n", r"row 2: empty `path`"),
        (HEADER + "a/b,a.svs,x,p1,\n", r"row 2: slide_id 'a/b' cannot be a file name"),
        (HEADER + "a,a.svs,x,p1,-1\n", r"row 2: mpp '-1' is not a positive number"),
        (HEADER + "ok,a.svs,x,p1,\ns{1},b.svs,x,p2,\n", r"row 3: slide_id 's\{1\}' holds a brace"),
        (HEADER + "x}y,a.svs,x,p1,\n", r"row 2: slide_id 'x\}y' holds a brace"),
        (HEADER + "-rf,a.svs,x,p1,\n", r"row 2: slide_id '-rf' .*starts with '-'"),
        (HEADER + '"two\nlines",a.svs,x,p1,\n', r"row 2: slide_id 'two\\nlines' holds a brace, a line break"),
        (HEADER, r"no rows"),
    ],
)
def test_bad_sheets(tmp_path, text, message):
    with pytest.raises(MsamilError, match=message) as info:
        load_sheet(write(tmp_path, text))
    assert "sheet.csv" in str(info.value)


def test_missing_sheet(tmp_path):
    with pytest.raises(MsamilError, match="slide sheet not found"):
        load_sheet(tmp_path / "nope.csv")


def test_ids_a_shell_would_misread_are_accepted(tmp_path):
    """The workflow quotes every value: such ids are file names like any other."""
    ids = ["a b (1)", "it's", "x;y", "$(id)", "&", "naïve é", "a-b"]
    rows = "".join(f'"{sid}",{i}.svs,x,p{i},\n' for i, sid in enumerate(ids))
    assert list(load_sheet(write(tmp_path, HEADER + rows)).index) == ids
