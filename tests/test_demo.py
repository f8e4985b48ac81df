"""The synthetic demo cohort: files OpenSlide reads, a sound sheet, exact annotations, the label rule.

Slides are generated at patch_size 64 (2048 x 1536 level-0 px) to stay fast; the rule and the
file format do not depend on the size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from msamil_core.cohort import demo
from msamil_core.cli import main
from msamil_core.errors import MsamilError

P = 64  # patch size of the test cohort, level-0 px
SLIDES = ["demo_000", "demo_003"]  # demo_003 carries a pen mark
SEED = 7


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    demo.generate_cohort(out, n_slides=30, seed=SEED, patch_size=P, threads=2, slide_ids=SLIDES)
    return out


def polygons(path: Path) -> list[np.ndarray]:
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection"
    rings = []
    for feature in collection["features"]:
        assert feature["geometry"]["type"] == "Polygon"  # one feature per lesion
        assert feature["properties"]["objectType"] == "annotation"
        assert feature["properties"]["classification"]["name"] == "Tumor"
        ring = np.asarray(feature["geometry"]["coordinates"][0], dtype=float)
        assert (ring[0] == ring[-1]).all()  # GeoJSON rings are closed
        rings.append(ring[:-1])
    return rings


# -- the sheet -----------------------------------------------------------------------------------
def test_cohort_table_columns_classes_and_patients():
    table = demo.cohort_table(30, seed=0, out_dir="somewhere")
    assert list(table.columns) == ["slide_id", "path", "label", "patient_id", "annotation"]
    assert len(table) == 30 and table["slide_id"].is_unique
    counts = table["label"].value_counts()
    assert set(counts.index) == set(demo.CLASSES) and len(demo.CLASSES) >= 3
    assert counts.max() - counts.min() <= 3  # balanced over patients, so nearly over slides
    per_patient = table.groupby("patient_id")
    assert (per_patient["label"].nunique() == 1).all()  # a patient's slides share the label
    two = per_patient.size()
    assert (two == 2).sum() >= 3 and two.max() == 2
    assert 0.1 <= (two == 2).mean() <= 0.3
    out = Path("somewhere").resolve()
    for column in ("path", "annotation"):
        assert all(Path(p).is_absolute() and Path(p).parent.parent == out for p in table[column])


def test_cohort_table_is_deterministic_and_prefix_stable():
    full = demo.cohort_table(30, seed=3)
    assert full.equals(demo.cohort_table(30, seed=3))
    assert full.head(11).equals(demo.cohort_table(11, seed=3))  # slide i does not depend on n_slides
    assert not full["label"].equals(demo.cohort_table(30, seed=4)["label"])


def test_bad_arguments_fail_with_a_message(tmp_path):
    with pytest.raises(MsamilError, match="patch_size"):
        demo.cohort_table(30, patch_size=100)
    with pytest.raises(MsamilError, match="demo_099"):
        demo.generate_cohort(tmp_path, n_slides=30, patch_size=P, slide_ids=["demo_099"])
    assert not (tmp_path / "slides").exists()


# -- the files -----------------------------------------------------------------------------------
def test_sheet_lists_the_whole_cohort(cohort):
    import pandas as pd

    sheet = pd.read_csv(cohort / "slides.csv")
    table = demo.cohort_table(30, SEED, cohort, P)
    for column in ("path", "annotation"):  # relative to the sheet's folder: the cohort moves with its sheet
        assert not any(sheet[column].str.startswith("/"))
        sheet[column] = [str((cohort / p).resolve()) for p in sheet[column]]
    assert sheet.equals(table)
    written = sorted(p.stem for p in (cohort / "slides").glob("*.tiff"))
    assert written == SLIDES
    assert sorted(p.stem for p in (cohort / "annotations").glob("*.geojson")) == SLIDES
    assert not list(cohort.rglob(".*"))  # no temporary files left behind


@pytest.mark.parametrize("slide_id", SLIDES)
def test_openslide_reads_pyramid_with_mpp(cohort, slide_id):
    import openslide

    index = int(slide_id.split("_")[1])
    label = demo.cohort_table(30, SEED)["label"][index]
    truth = demo.render_slide(index, label, seed=SEED, patch_size=P)
    with openslide.OpenSlide(str(cohort / "slides" / f"{slide_id}.tiff")) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.5)
        assert slide.level_count >= 3
        assert slide.dimensions == (32 * P, 24 * P) == truth.rgb.shape[1::-1]
        assert [round(d) for d in slide.level_downsamples] == [1, 4, 16]
        # Each level shows the rendered slide (JPEG-compressed), here over the lesion.
        x, y = (np.argwhere(truth.lesion_mask).mean(axis=0)[::-1] // 64 * 64).astype(int)
        for level, ds in enumerate(slide.level_downsamples):
            ds = int(round(ds))
            size = 512 // ds
            got = np.asarray(slide.read_region((int(x), int(y)), level, (size, size)))[..., :3].astype(float)
            want = truth.rgb[y : y + 512, x : x + 512].reshape(size, ds, size, ds, 3).mean(axis=(1, 3))
            assert np.abs(got - want).mean() < 8.0, f"level {level}"  # JPEG, 4:2:0 chroma
            assert np.abs(got.mean(axis=(0, 1)) - want.mean(axis=(0, 1))).max() < 2.0, f"level {level}"


def test_same_seed_same_bytes_other_seed_other_bytes(cohort, tmp_path):
    again = tmp_path / "again"
    demo.generate_cohort(again, n_slides=5, seed=SEED, patch_size=P, slide_ids=["demo_000"])
    for sub in ("slides/demo_000.tiff", "annotations/demo_000.geojson"):
        assert (again / sub).read_bytes() == (cohort / sub).read_bytes(), sub
    other = tmp_path / "other"
    demo.generate_cohort(other, n_slides=5, seed=SEED + 1, patch_size=P, slide_ids=["demo_000"])
    for sub in ("slides/demo_000.tiff", "annotations/demo_000.geojson"):
        assert (other / sub).read_bytes() != (cohort / sub).read_bytes(), sub


@pytest.mark.parametrize("slide_id", SLIDES)
def test_annotation_is_the_lesion_and_a_minority_of_tissue(cohort, slide_id):
    import openslide

    rings = polygons(cohort / "annotations" / f"{slide_id}.geojson")
    assert 1 <= len(rings) <= 2
    w, h = 32 * P, 24 * P
    for ring in rings:
        assert (ring >= 0).all() and (ring[:, 0] <= w).all() and (ring[:, 1] <= h).all()
    with openslide.OpenSlide(str(cohort / "slides" / f"{slide_id}.tiff")) as slide:
        rgb = np.asarray(slide.read_region((0, 0), 0, (w, h)))[..., :3].astype(float)
    lesion = demo.rasterise_polygons(rings, (w, h))
    tissue = rgb.mean(axis=2) < 225  # glass is about 244
    # Hematoxylin takes red away, eosin hardly: the lesion is much less red than the stroma.
    red_in, red_out = rgb[lesion, 0].mean(), rgb[tissue & ~lesion, 0].mean()
    assert red_in < red_out - 25, (red_in, red_out)
    assert (tissue[lesion]).mean() > 0.99  # the polygon lies on tissue
    assert 0.15 < lesion.sum() / (tissue | lesion).sum() < 0.5


def test_subset_does_not_depend_on_cohort_size(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    demo.generate_cohort(a, n_slides=3, seed=1, patch_size=32, slide_ids=["demo_002"])
    demo.generate_cohort(b, n_slides=12, seed=1, patch_size=32, slide_ids=["demo_002"])
    assert (a / "slides/demo_002.tiff").read_bytes() == (b / "slides/demo_002.tiff").read_bytes()


def test_cli_writes_requested_slides(tmp_path):
    out = tmp_path / "cli"
    assert main(["demo", "--out", str(out), "--n-slides", "4", "--patch-size", "32", "--slides", "demo_001"]) == 0
    assert (out / "slides" / "demo_001.tiff").exists() and (out / "annotations" / "demo_001.geojson").exists()
    assert not (out / "slides" / "demo_000.tiff").exists()
    assert len((out / "slides.csv").read_text().splitlines()) == 5
    assert main(["demo", "--out", str(out), "--patch-size", "40"]) == 1  # one-line error, no traceback


# -- the generative rule --------------------------------------------------------------------------
def fields_of(nest_map: np.ndarray, k: int) -> np.ndarray:
    """[n, k*k] blocks of a nest-grid map, one row per aligned k x k field."""
    r, c = nest_map.shape[0] // k * k, nest_map.shape[1] // k * k
    return nest_map[:r, :c].reshape(r // k, k, c // k, k).transpose(0, 2, 1, 3).reshape(-1, k * k)


def test_architecture_changes_only_the_arrangement_of_nests():
    alt = demo.render_slide(5, "bland_alternating", seed=SEED, patch_size=P)
    zon = demo.render_slide(5, "bland_zonal", seed=SEED, patch_size=P)
    assert (alt.lesion_mask == zon.lesion_mask).all() and (alt.tissue_mask == zon.tissue_mask).all()
    assert alt.nest_size == zon.nest_size == P  # one nest per 20x patch
    n = P
    rows, cols = alt.dense_nests.shape
    cover = alt.lesion_mask.reshape(rows, n, cols, n).mean(axis=(1, 3))
    # Same number of dense nests in every coverage class, so in the nests a 20x grid keeps.
    for group in (cover == 1, (cover >= 0.7) & (cover < 1), (cover > 0) & (cover < 0.7)):
        assert alt.dense_nests[group].sum() == zon.dense_nests[group].sum()
    # 10x (2 x 2 nests) and 5x (4 x 4) fields inside the lesion: always half dense when
    # alternating; when zonal, often all dense or all sparse.
    for k in (2, 4):
        inside = fields_of(cover == 1, k).all(axis=1)
        assert inside.sum() >= 1
        assert (fields_of(alt.dense_nests, k)[inside].sum(axis=1) == k * k // 2).all()
    inside = fields_of(cover == 1, 2).all(axis=1)
    zonal_counts = fields_of(zon.dense_nests, 2)[inside].sum(axis=1)
    assert ((zonal_counts == 0) | (zonal_counts == 4)).mean() > 0.5
    # A nest's pixels depend on its own type only: nests of the same type are pixel-identical
    # under both architectures although their neighbours differ.
    same = (alt.dense_nests == zon.dense_nests) & (cover > 0)
    differ = (alt.dense_nests != zon.dense_nests) & (cover == 1)
    assert same.sum() > 10 and differ.sum() > 10
    tiles = lambda s: s.rgb.reshape(rows, n, cols, n, 3).transpose(0, 2, 1, 3, 4)  # noqa: E731
    assert (tiles(alt)[same] == tiles(zon)[same]).all()
    assert all((tiles(alt)[r, c] != tiles(zon)[r, c]).any() for r, c in np.argwhere(differ))


def test_cytology_differs_in_texture_not_in_mean_colour():
    bland = demo.render_slide(2, "bland_alternating", seed=SEED, patch_size=P)
    atyp = demo.render_slide(2, "atypical_alternating", seed=SEED, patch_size=P)
    rows, cols = bland.dense_nests.shape
    n = bland.nest_size
    full = bland.lesion_mask.reshape(rows, n, cols, n).all(axis=(1, 3))
    for dense in (True, False):
        pick = full & (bland.dense_nests == dense)
        assert pick.sum() >= 4
        nests = lambda s: s.rgb.reshape(rows, n, cols, n, 3).transpose(0, 2, 1, 3, 4)[pick].astype(float)  # noqa: E731
        b, a = nests(bland), nests(atyp)
        assert np.abs(b.mean(axis=(0, 1, 2)) - a.mean(axis=(0, 1, 2))).max() < 4.0, dense  # blurs out at 5x
        if dense:  # at 20x the crowded nuclei are resolved: the luminance texture differs clearly
            tex_b, tex_a = b.mean(axis=3).std(axis=(1, 2)).mean(), a.mean(axis=3).std(axis=(1, 2)).mean()
            assert abs(tex_b - tex_a) > 0.15 * max(tex_b, tex_a), (tex_b, tex_a)
    dense_vs_sparse = [
        bland.rgb.reshape(rows, n, cols, n, 3).transpose(0, 2, 1, 3, 4)[full & (bland.dense_nests == d)].mean()
        for d in (True, False)
    ]
    assert dense_vs_sparse[1] - dense_vs_sparse[0] > 20  # nest types differ strongly, even blurred
