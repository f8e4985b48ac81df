"""QuPath GeoJSON export: mask outlines with holes, patch grids, and the export-geojson command."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from scipy import ndimage as ndi

from msamil_core.wsi.annotations import annotation_mask, fill_polygons, read_geojson, shapes_to_thumbnail
from msamil_core.wsi.coords import write_coords
from msamil_core.errors import MsamilError
from msamil_core.fileio import write_json
from msamil_core.wsi.geojson import coords_features, grid_features, mask_features, mask_polygons, ring_area
from msamil_core.wsi.masks import save_mask

LEVEL0 = (9000, 6600)  # level-0 px; 30 x 30 level-0 px per thumbnail pixel below
THUMB = (300, 220)


def lesion_like_mask() -> np.ndarray:
    """Blobs with holes, a one-pixel speck and two pixels touching only at a corner."""
    rng = np.random.default_rng(7)
    field = ndi.gaussian_filter(rng.random((THUMB[1], THUMB[0])), 6)
    mask = field > np.quantile(field, 0.7)
    mask[100:140, 20:60] = True
    mask[110:120, 30:40] = False  # a hole
    mask[5, 5] = True  # a speck
    mask[10, 10] = mask[11, 11] = True  # diagonal neighbours
    return mask


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_traced_outlines_fill_back_to_the_mask_exactly():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = rng.random((25, 35)) < rng.uniform(0.2, 0.8)
        polygons = mask_polygons(m)
        assert len(polygons) == ndi.label(m)[1]  # one polygon per 4-connected component
        back = fill_polygons([[r.astype(float) for r in p] for p in polygons], (35, 25))
        assert np.array_equal(back, m)
        for rings in polygons:
            assert ring_area(rings[0]) > 0  # exterior counter-clockwise in (x, y) numbers (RFC 7946)
            assert all(ring_area(h) < 0 for h in rings[1:])


def test_holes_become_interior_rings():
    m = np.zeros((10, 10), bool)
    m[1:9, 1:9] = True
    m[3:5, 3:5] = False
    (polygon,) = mask_polygons(m)
    assert len(polygon) == 2
    assert sorted(map(tuple, polygon[0].tolist())) == [(1, 1), (1, 9), (9, 1), (9, 9)]  # collinear corners dropped
    assert ring_area(polygon[1]) == -4


def test_exported_lesion_round_trips_through_geojson(tmp_path):
    mask = lesion_like_mask()
    features = mask_features(mask, LEVEL0, "Tumor")
    path = tmp_path / "lesion.geojson"
    write_json(path, {"type": "FeatureCollection", "features": features})
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection"
    for f in data["features"]:
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        assert f["properties"]["objectType"] == "annotation"
        assert f["properties"]["classification"]["name"] == "Tumor"
        assert len(f["properties"]["classification"]["color"]) == 3
        for ring in f["geometry"]["coordinates"]:
            assert ring[0] == ring[-1] and len(ring) >= 5  # closed rings, as GeoJSON requires
    coords = np.concatenate([np.asarray(r) for f in data["features"] for r in f["geometry"]["coordinates"]])
    assert coords.min() >= 0 and (coords.max(axis=0) <= LEVEL0).all()
    back = shapes_to_thumbnail(read_geojson(path), LEVEL0, THUMB)
    assert iou(back, mask) > 0.95
    assert np.array_equal(back, mask)  # pixel-edge outlines are exact


def test_single_feature_is_a_multipolygon():
    mask = lesion_like_mask()
    (feature,) = mask_features(mask, LEVEL0, "Tumor", single_feature=True)
    assert feature["geometry"]["type"] == "MultiPolygon"
    assert len(feature["geometry"]["coordinates"]) == ndi.label(mask)[1]
    assert mask_features(np.zeros((4, 4), bool), LEVEL0) == []


def test_grid_features_are_level0_squares_with_scale_class():
    coords = np.array([[0, 0], [1024, 2048], [4096, 0]], np.int64)
    feats = grid_features(coords, 1024, "10x")
    assert len(feats) == 3
    ring = np.asarray(feats[1]["geometry"]["coordinates"][0])
    assert ring.min(axis=0).tolist() == [1024, 2048] and ring.max(axis=0).tolist() == [2048, 3072]
    props = feats[1]["properties"]
    assert props["objectType"] == "tile" and props["classification"]["name"] == "10x"
    assert props["measurements"]["magnification"] == 10 and props["measurements"]["patch size level0 px"] == 1024
    assert all(isinstance(v, float) for v in props["measurements"].values())


def test_coords_file_to_features_and_missing_attributes(tmp_path):
    coords = np.array([[0, 0], [512, 0]], np.int64)
    write_coords(tmp_path / "5x" / "s.h5", coords, {"patch_size_level0": 2048, "target_magnification": 5})
    feats = coords_features(tmp_path / "5x" / "s.h5")
    assert [f["properties"]["classification"]["name"] for f in feats] == ["5x", "5x"]
    write_coords(tmp_path / "20x" / "clam.h5", coords, {"patch_size": 256, "patch_level": 0})
    with pytest.raises(MsamilError, match="patch_size_level0"):
        coords_features(tmp_path / "20x" / "clam.h5")


def _run_export(argv):
    from msamil_core.cli import export_geojson

    parser = argparse.ArgumentParser()
    export_geojson.add_arguments(parser)
    export_geojson.run(parser.parse_args(argv))


def test_export_geojson_command(tmp_path):
    mask = lesion_like_mask()
    tissue = ndi.binary_dilation(mask, iterations=3)
    write_json(
        tmp_path / "meta.json",
        {
            "slide_id": "s1",
            "width": LEVEL0[0],
            "height": LEVEL0[1],
            "thumbnail": {"width": THUMB[0], "height": THUMB[1]},
        },
    )
    save_mask(tmp_path / "lesion_mask.png", mask)
    save_mask(tmp_path / "tissue_mask.png", tissue)
    grid = np.array([[0, 0], [512, 512], [1024, 0]], np.int64)
    write_coords(tmp_path / "20x.h5", grid, {"patch_size_level0": 512, "target_magnification": 20})
    out = tmp_path / "qupath.geojson"
    _run_export(
        [
            "--meta",
            str(tmp_path / "meta.json"),
            "--lesion-mask",
            str(tmp_path / "lesion_mask.png"),
            "--tissue-mask",
            str(tmp_path / "tissue_mask.png"),
            "--coords",
            str(tmp_path / "20x.h5"),
            "--out",
            str(out),
        ]
    )
    data = json.loads(out.read_text())
    classes = [f["properties"]["classification"]["name"] for f in data["features"]]
    assert classes.count("20x") == 3 and "Tissue" in classes and "Tumor" in classes
    # Read back as a lesion annotation: tiles are skipped and "Tissue" is no lesion class by default.
    back = annotation_mask(out, "s1", LEVEL0, THUMB)
    assert iou(back, mask) > 0.95
    save_mask(tmp_path / "small.png", np.zeros((10, 10), bool))
    with pytest.raises(MsamilError, match="thumbnail"):
        _run_export(
            [
                "--meta",
                str(tmp_path / "meta.json"),
                "--lesion-mask",
                str(tmp_path / "small.png"),
                "--out",
                str(tmp_path / "x.geojson"),
            ]
        )
