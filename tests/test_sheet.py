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


# ----------------------------------------------------------------------------- whitespace and label spellings


@pytest.mark.parametrize("column", ["slide_id", "label", "patient_id"])
@pytest.mark.parametrize(
    "written, value",
    [
        ("{} ", "{} "),  # trailing space
        (" {}", " {}"),  # leading space
        ('"{} "', "{} "),  # quoted
        ('" {}"', " {}"),
        ("{}\t", "{}\t"),  # tab
        ("{}\u00a0", "{}\u00a0"),  # non-breaking space, as a spreadsheet copy brings
        ("\u00a0{}", "\u00a0{}"),
        ("{}\u200b", "{}\u200b"),  # zero-width space: invisible, not str.isspace
    ],
)
def test_whitespace_around_an_id_is_refused_naming_the_row(tmp_path, column, written, value):
    """Whitespace around a slide id, label or patient id would silently make another slide, class or
    patient ("atypical_zonal " a class of its own): refused, naming the row and the value as written."""
    clean = {"slide_id": "b", "label": "zonal", "patient_id": "p2"}
    cells = {**clean, column: written.format(clean[column])}
    text = HEADER + "a,a.svs,zonal,p1,\n" + f"{cells['slide_id']},b.svs,{cells['label']},{cells['patient_id']},\n"
    with pytest.raises(MsamilError) as info:
        load_sheet(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message and "sheet.csv, row 3: " in message
    assert f"{column} {value.format(clean[column])!r} starts or ends with whitespace; remove it" in message


def test_whitespace_in_a_tsv_and_every_row_named(tmp_path):
    text = "slide_id\tpath\tlabel\tpatient_id\n" + "".join(
        f"s{i}\ts{i}.svs\t{'zonal ' if i % 2 else 'zonal'}\tp{i}\n" for i in range(30))
    with pytest.raises(MsamilError, match=r"s\.tsv, rows 3, 5, 7, 9, 11, 13, 15, 17, 19, 21 and 5 more: "
                                          r"label 'zonal ' starts or ends with whitespace"):
        load_sheet(write(tmp_path, text, "s.tsv"))


def test_whitespace_around_other_values_is_stripped(tmp_path):
    df = load_sheet(write(tmp_path, HEADER + "a, slides/a.svs ,x,p1, 0.5 \n"))
    assert df.loc["a", "path"] == str(tmp_path / "slides" / "a.svs") and df.loc["a", "mpp"] == 0.5


def test_a_blank_value_is_empty(tmp_path):
    with pytest.raises(MsamilError, match=r"row 2: empty `label`"):
        load_sheet(write(tmp_path, HEADER + "a,a.svs, \u00a0 ,p1,\n"))


@pytest.mark.parametrize(
    "first, second",
    [("Tumor", "tumor"), ("atypical zonal", "atypical  zonal"), ("low grade", "lowgrade"), ("ÄRGER", "ärger")],
)
def test_labels_differing_only_by_case_or_whitespace_are_refused(tmp_path, first, second):
    text = HEADER + f"a,a.svs,{first},p1,\nb,b.svs,other,p2,\nc,c.svs,{second},p3,\n"
    with pytest.raises(MsamilError) as info:
        load_sheet(write(tmp_path, text))
    assert str(info.value) == (f"slide sheet {tmp_path / 'sheet.csv'}: labels {first!r} (row 2) and {second!r} (row 4) "
                               "differ only by case or whitespace; write each class one way")


def test_labels_differing_otherwise_and_inner_spaces_load(tmp_path):
    text = HEADER + "a (1),a.svs,atypical zonal,patient 1,\nb,b.svs,atypical_zonal,p2,\nc,c.svs,atypical zonal,p3,\n"
    df = load_sheet(write(tmp_path, text))
    assert sorted(set(df["label"])) == ["atypical zonal", "atypical_zonal"] and df.loc["a (1)", "patient_id"] == "patient 1"


def test_predict_sheet_refuses_whitespace_around_a_given_label(tmp_path):
    from msamil_core.prediction import read_new_slides

    p = write(tmp_path, "slide_id,path,label,patient_id\na,a.svs,,\nb,b.svs,tumor,p\nc,c.svs, ,\n")
    df = read_new_slides(p)  # labels and patients are optional: blank ones are none given
    assert list(df["label"]) == ["", "tumor", ""] and list(df["patient_id"]) == ["a", "p", "c"]
    with pytest.raises(MsamilError, match=r"row 3: label 'tumor ' starts or ends with whitespace"):
        read_new_slides(write(tmp_path, "slide_id,path,label\na,a.svs,\nb,b.svs,tumor \n"))
    with pytest.raises(MsamilError, match=r"row 2: patient_id 'p\\xa0' starts or ends with whitespace"):
        read_new_slides(write(tmp_path, "slide_id,path,patient_id\na,a.svs,p\u00a0\n"))
