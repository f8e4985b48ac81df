"""Folds: patient-level, label-stratified, seeded, stable when the cohort grows; the train/val/test rule."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from msamil_core.cli import build_parser
from msamil_core.errors import MsamilError
from msamil_core.training.splits import (
    FOLDS_COLUMNS,
    fold_counts,
    fold_parts,
    make_folds,
    read_folds,
    val_rank,
    write_folds,
)


def cohort(patients_per_label: dict[str, int], prefix: str = "p", two_slides_every: int = 3) -> pd.DataFrame:
    """A sheet: every ``two_slides_every``-th patient of a label has two slides."""
    rows = []
    for label, n in patients_per_label.items():
        for i in range(n):
            pid = f"{prefix}_{label}_{i:02d}"
            for s in range(2 if i % two_slides_every == 0 else 1):
                rows.append({"slide_id": f"{pid}_s{s}", "path": f"{pid}_s{s}.svs", "label": label, "patient_id": pid})
    return pd.DataFrame(rows)


def patient_folds(folds: pd.DataFrame) -> dict[str, int]:
    return dict(zip(folds["patient_id"], folds["fold"]))


def assert_balanced(folds: pd.DataFrame) -> None:
    counts = fold_counts(folds)
    spread = counts.max(axis=1) - counts.min(axis=1)
    assert (spread <= 1).all(), f"unbalanced folds:\n{counts}"


@pytest.mark.parametrize(
    "sizes, n_folds",
    [({"a": 10, "b": 10}, 5), ({"a": 7, "b": 13, "c": 5}, 5), ({"x": 4, "y": 9, "z": 6, "w": 3}, 3)],
)
def test_folds_are_stratified_and_patient_level(sizes, n_folds):
    sheet = cohort(sizes)
    folds = make_folds(sheet, n_folds=n_folds, seed=3)
    assert list(folds.columns) == list(FOLDS_COLUMNS)
    assert list(folds["slide_id"]) == list(sheet["slide_id"])  # the sheet's rows, in order
    assert (folds.groupby("patient_id")["fold"].nunique() == 1).all()
    assert set(folds["fold"]) == set(range(n_folds))
    assert_balanced(folds)
    # Totals are balanced too (the tie-break), within the number of labels.
    totals = folds.drop_duplicates("patient_id")["fold"].value_counts()
    assert totals.max() - totals.min() <= len(sizes)


def test_parts_of_each_fold_partition_the_cohort_by_patient():
    sheet = cohort({"a": 9, "b": 8, "c": 6}, two_slides_every=2)
    folds = make_folds(sheet, n_folds=4, seed=1)
    patient_of = dict(zip(folds["slide_id"], folds["patient_id"]))
    tested = []
    for k in range(4):
        parts = fold_parts(folds, k, val_fraction=0.25)
        assert sorted(sum(parts.values(), [])) == sorted(folds["slide_id"])
        patients = {name: {patient_of[s] for s in ids} for name, ids in parts.items()}
        assert not patients["train"] & patients["val"]
        assert not patients["train"] & patients["test"]
        assert not patients["val"] & patients["test"]
        assert set(parts["test"]) == set(folds.loc[folds["fold"] == k, "slide_id"])
        # Every label reaches each part: test by stratification, val by the at-least-one rule.
        label_of = dict(zip(folds["slide_id"], folds["label"]))
        for name in ("train", "val", "test"):
            assert {label_of[s] for s in parts[name]} == {"a", "b", "c"}
        tested += parts["test"]
    assert sorted(tested) == sorted(folds["slide_id"])  # each slide is tested exactly once


def test_two_slide_patients_stay_together():
    sheet = cohort({"a": 6, "b": 6}, two_slides_every=1)  # every patient has two slides
    folds = make_folds(sheet, n_folds=3, seed=0)
    for k in range(3):
        parts = fold_parts(folds, k, val_fraction=0.3)
        where = {s: name for name, ids in parts.items() for s in ids}
        for pid, group in folds.groupby("patient_id"):
            assert len(group) == 2
            assert len({where[s] for s in group["slide_id"]}) == 1, pid


def test_seed_determines_the_folds_and_row_order_does_not():
    sheet = cohort({"a": 15, "b": 15, "c": 15})
    first = make_folds(sheet, n_folds=5, seed=7)
    pd.testing.assert_frame_equal(first, make_folds(sheet, n_folds=5, seed=7))
    shuffled = make_folds(sheet.sample(frac=1.0, random_state=1), n_folds=5, seed=7)
    assert patient_folds(shuffled) == patient_folds(first)
    assert patient_folds(make_folds(sheet, n_folds=5, seed=8)) != patient_folds(first)


def test_growing_cohort_keeps_old_patients_folds(tmp_path):
    old_sheet = cohort({"a": 8, "b": 7, "c": 5})
    path = tmp_path / "folds.csv"
    write_folds(path, make_folds(old_sheet, n_folds=4, seed=2))
    before = read_folds(path)

    new_patients = cohort({"a": 3, "b": 6, "c": 2}, prefix="new")
    extra_slide = old_sheet.iloc[[0]].assign(slide_id="late_slide")  # an old patient gains a slide
    grown = pd.concat([old_sheet, new_patients, extra_slide], ignore_index=True)
    after = make_folds(grown, n_folds=4, seed=2, previous=before)

    old_folds, new_folds = patient_folds(before), patient_folds(after)
    assert all(new_folds[pid] == fold for pid, fold in old_folds.items())
    assert set(new_folds) == set(old_folds) | set(new_patients["patient_id"])
    late = after.set_index("slide_id").loc["late_slide"]
    assert late["fold"] == old_folds[late["patient_id"]]
    assert_balanced(after)


def test_removed_patients_disappear():
    sheet = cohort({"a": 6, "b": 6})
    before = make_folds(sheet, n_folds=3, seed=0)
    removed = sheet["patient_id"].iloc[-1]
    after = make_folds(sheet[sheet["patient_id"] != removed], n_folds=3, seed=0, previous=before)
    assert removed not in set(after["patient_id"])
    old_folds = patient_folds(before)
    assert all(old_folds[pid] == fold for pid, fold in patient_folds(after).items())


def test_new_patients_of_one_label_fill_its_smallest_folds():
    base = cohort({"a": 6, "b": 5})
    folds = make_folds(base, n_folds=3, seed=0)
    grown = pd.concat([base, cohort({"b": 4}, prefix="late")], ignore_index=True)
    after = make_folds(grown, n_folds=3, seed=0, previous=folds)
    assert_balanced(after)
    assert fold_counts(after).loc["b"].sum() == 9


def test_val_part_follows_the_rule():
    # Two folds: label a has 5 training patients per fold, b 2, c 1 (hand-derived below).
    sheet = cohort({"a": 10, "b": 4, "c": 2})
    folds = make_folds(sheet, n_folds=2, seed=4)
    label_of = dict(zip(folds["slide_id"], folds["label"]))
    patient_of = dict(zip(folds["slide_id"], folds["patient_id"]))
    parts = fold_parts(folds, 0, val_fraction=0.3)
    val_patients = {patient_of[s] for s in parts["val"]}
    by_label = {lab: {p for p in val_patients if p.split("_")[1] == lab} for lab in "abc"}
    # round_half_up(0.3 * 5) = 2; round_half_up(0.3 * 2) = 1; one patient stays in train: 0.
    assert [len(by_label[lab]) for lab in "abc"] == [2, 1, 0]
    training_a = folds[(folds["fold"] != 0) & (folds["label"] == "a")].drop_duplicates("patient_id")
    lowest = training_a.sort_values("val_rank")["patient_id"].iloc[:2]
    assert by_label["a"] == set(lowest)
    assert {label_of[s] for s in parts["val"]} == {"a", "b"}
    assert fold_parts(folds, 0, val_fraction=0.0)["val"] == []
    # A label's val never takes all its training patients.
    assert len({patient_of[s] for s in fold_parts(folds, 1, val_fraction=0.9)["train"] if label_of[s] == "b"}) == 1


def test_parts_are_a_function_of_the_file(tmp_path):
    sheet = cohort({"a": 9, "b": 9})
    folds = make_folds(sheet, n_folds=3, seed=5)
    write_folds(tmp_path / "folds.csv", folds)
    read = read_folds(tmp_path / "folds.csv")
    minimal = read.loc[:, ["slide_id", "patient_id", "label", "fold"]]  # an external four-column file
    for k in range(3):
        expected = fold_parts(folds, k, 0.25)
        assert fold_parts(read, k, 0.25) == expected
        assert fold_parts(minimal, k, 0.25, seed=5) == expected  # val_rank recomputed from the seed
    assert read["val_rank"].tolist() == [val_rank(p, 5) for p in read["patient_id"]]
    assert all(0.0 <= r < 1.0 for r in read["val_rank"])


def test_too_few_patients_for_the_folds():
    with pytest.raises(MsamilError, match=r"label 'b' has 3 patient\(s\), fewer than the 5 folds.*at most 3 folds"):
        make_folds(cohort({"a": 8, "b": 3}), n_folds=5)
    with pytest.raises(MsamilError, match=r"add patients with label 'b'"):
        make_folds(cohort({"a": 8, "b": 1}), n_folds=2)
    with pytest.raises(MsamilError, match="at least 2"):
        make_folds(cohort({"a": 8}), n_folds=1)


def test_previous_with_other_number_of_folds():
    sheet = cohort({"a": 6, "b": 6})
    previous = make_folds(sheet, n_folds=3)
    with pytest.raises(MsamilError, match="previous folds file has 3 folds but 5 were requested"):
        make_folds(sheet, n_folds=5, previous=previous)
    # Without the n_folds column the count is max(fold) + 1.
    with pytest.raises(MsamilError, match="has 3 folds but 2"):
        make_folds(sheet, n_folds=2, previous=previous.drop(columns="n_folds"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("slide_id,patient_id,label\ns,p,a\n", r"missing column\(s\) fold"),
        ("slide_id,patient_id,label,fold\ns1,p,a,0\ns2,p,a,1\n", "patient 'p' is in two folds"),
        ("slide_id,patient_id,label,fold\ns1,p,a,x\n", "must be integers"),
        ("slide_id,patient_id,label,fold,n_folds\ns1,p,a,3,2\n", r"fold 3, outside 0..1"),
        ("slide_id,patient_id,label,fold\ns1,p,a,0\ns1,q,a,1\n", "slide 's1' is listed twice"),
    ],
)
def test_bad_folds_files(tmp_path, text, message):
    path = tmp_path / "folds.csv"
    path.write_text(text)
    with pytest.raises(MsamilError, match=message):
        read_folds(path)


def test_bad_fold_arguments(tmp_path):
    folds = make_folds(cohort({"a": 4, "b": 4}), n_folds=2)
    with pytest.raises(MsamilError, match="fold 2 does not exist"):
        fold_parts(folds, 2)
    with pytest.raises(MsamilError, match=r"val_fraction must be in \[0, 1\)"):
        fold_parts(folds, 0, val_fraction=1.0)
    with pytest.raises(MsamilError, match="folds file not found"):
        read_folds(tmp_path / "missing.csv")


def run_splits(*argv: str) -> None:
    args = build_parser(only="splits").parse_args(["splits", *argv])
    args._module.run(args)


def test_command_updates_its_own_output(tmp_path):
    sheet_path, out = tmp_path / "slides.csv", tmp_path / "results" / "folds.csv"
    first = cohort({"a": 6, "b": 5})
    first.to_csv(sheet_path, index=False)
    run_splits("--sheet", str(sheet_path), "--out", str(out), "--n-folds", "3", "--split-seed", "1", "--previous", str(out))
    before = read_folds(out)
    assert before["n_folds"].eq(3).all() and len(before) == len(first)

    pd.concat([first, cohort({"a": 2, "b": 3}, prefix="new")]).to_csv(sheet_path, index=False)
    run_splits("--sheet", str(sheet_path), "--out", str(out), "--n-folds", "3", "--split-seed", "1", "--previous", str(out))
    after = read_folds(out)
    assert len(after) > len(before)
    merged = before.merge(after, on="slide_id", suffixes=("_before", "_after"))
    assert len(merged) == len(before) and (merged["fold_before"] == merged["fold_after"]).all()
    assert_balanced(after)
    assert [p.name for p in out.parent.iterdir()] == ["folds.csv"]  # no temporary files left

    with pytest.raises(MsamilError, match="previous folds file has 3 folds"):
        run_splits("--sheet", str(sheet_path), "--out", str(out), "--n-folds", "2", "--previous", str(out))
    pd.testing.assert_frame_equal(read_folds(out), after)  # a failed run leaves the file as it was


def test_val_rank_is_uniform_enough():
    ranks = [val_rank(f"patient_{i}", seed=0) for i in range(2000)]
    assert all(0.0 <= r < 1.0 for r in ranks)
    assert math.isclose(sum(ranks) / len(ranks), 0.5, abs_tol=0.03)
    assert val_rank("patient_1", seed=0) != val_rank("patient_1", seed=1)


def test_training_subset_is_nested_stratified_and_seeded():
    from msamil_core.training.splits import training_subset

    patients = [f"p{i // 2}" if i < 8 else f"p{i}" for i in range(40)]  # p0..p3 have two slides
    labels = [i % 2 if i >= 8 else (i // 2) % 2 for i in range(40)]
    kept = {f: training_subset(patients, labels, f, seed=0) for f in (0.1, 0.25, 0.5, 1.0)}
    assert kept[1.0] == list(range(40))
    assert set(kept[0.1]) <= set(kept[0.25]) <= set(kept[0.5])
    for f, rows in kept.items():
        for label in (0, 1):
            n = len({patients[i] for i in range(40) if labels[i] == label})
            got = {patients[i] for i in rows if labels[i] == label}
            assert len(got) == max(1, int(f * n + 0.5))
        # a patient's slides stay together
        assert all(i in rows for i in range(40) if patients[i] in {patients[j] for j in rows})
    assert training_subset(patients, labels, 0.25, seed=1) != kept[0.25]
    with pytest.raises(MsamilError, match="train_fraction"):
        training_subset(patients, labels, 0.0)
