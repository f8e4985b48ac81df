"""Annotations -> lesion masks: QuPath GeoJSON, ASAP XML and mask images; holes, classes, bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from msamil_core.wsi.annotations import (
    ClassRules,
    annotation_format,
    annotation_mask,
    fill_polygons,
    read_asap_xml,
    read_geojson,
    resize_mask,
)
from msamil_core.errors import MsamilError

LEVEL0 = (8000, 6000)  # slide W, H in level-0 px
THUMB = (400, 300)  # thumbnail w, h: 20 level-0 px per thumbnail px
DS = 20.0


def rect(x0, y0, x1, y1):
    """Closed GeoJSON ring of a rectangle (level-0 px)."""
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def rect_mask(x0, y0, x1, y1):
    """Thumbnail pixels whose centre lies inside the level-0 rectangle."""
    cx = (np.arange(THUMB[0]) + 0.5) * DS
    cy = (np.arange(THUMB[1]) + 0.5) * DS
    return ((cy[:, None] > y0) & (cy[:, None] < y1)) & ((cx[None, :] > x0) & (cx[None, :] < x1))


def feature(geometry, cls=None, **props):
    if cls is not None:
        props["classification"] = {"name": cls, "color": [255, 0, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": dict(objectType="annotation", **props)}


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def mask_of(path, **kwargs):
    return annotation_mask(path, "slide A", LEVEL0, THUMB, **kwargs)


# ----------------------------------------------------------------------------- rasterising


def brute_force_even_odd(rings, w, h):
    """Reference: crossing count of a ray from each pixel centre, one pixel at a time."""
    out = np.zeros((h, w), bool)
    edges = [(r[i], r[(i + 1) % len(r)]) for r in rings for i in range(len(r))]
    for row in range(h):
        for col in range(w):
            px, py = col + 0.5, row + 0.5
            inside = False
            for (x0, y0), (x1, y1) in edges:
                if (y0 <= py < y1) or (y1 <= py < y0):
                    if x0 + (py - y0) * (x1 - x0) / (y1 - y0) < px:
                        inside = not inside
            out[row, col] = inside
    return out


def test_fill_polygons_matches_a_pixelwise_even_odd_reference():
    rng = np.random.default_rng(3)
    t = np.linspace(0, 2 * np.pi, 23, endpoint=False)
    outer = np.stack([20 + rng.uniform(8, 15, t.size) * np.cos(t), 15 + rng.uniform(8, 12, t.size) * np.sin(t)], 1)
    hole = np.stack([20 + 4 * np.cos(t), 15 + 3 * np.sin(t)], 1)[::-1]
    got = fill_polygons([[outer, hole]], (40, 30))
    want = brute_force_even_odd([outer, hole], 40, 30)
    assert want.sum() > 200 and (~want[15, 20])  # the reference has area and a hole
    assert np.array_equal(got, want)


def test_overlapping_polygons_are_united_not_cancelled():
    a = np.array([[2, 2], [12, 2], [12, 12], [2, 12]], float)
    got = fill_polygons([[a], [a + 5]], (20, 20))
    assert got.sum() == 100 + 100 - 25


# ----------------------------------------------------------------------------- GeoJSON


def test_geojson_polygon_with_hole(tmp_path):
    geom = {"type": "Polygon", "coordinates": [rect(1000, 1000, 5000, 4000), rect(2000, 2000, 3000, 3000)]}
    path = write_json(tmp_path / "a.geojson", {"type": "FeatureCollection", "features": [feature(geom, "Tumor")]})
    got = mask_of(path)
    want = rect_mask(1000, 1000, 5000, 4000) & ~rect_mask(2000, 2000, 3000, 3000)
    assert np.array_equal(got, want)
    assert not got[125, 125]  # centre of the hole (level-0 2500, 2500)


def test_geojson_multipolygon_single_feature_and_bare_list(tmp_path):
    geom = {
        "type": "MultiPolygon",
        "coordinates": [[rect(0, 0, 1000, 1000)], [rect(4000, 4000, 6000, 5000), rect(4500, 4200, 5000, 4800)]],
    }
    want = rect_mask(0, 0, 1000, 1000) | (rect_mask(4000, 4000, 6000, 5000) & ~rect_mask(4500, 4200, 5000, 4800))
    single = write_json(tmp_path / "single.json", feature(geom, "Tumor"))
    bare = write_json(tmp_path / "bare.json", [feature(geom, "Tumor")])
    assert np.array_equal(mask_of(single), want)
    assert np.array_equal(mask_of(bare), want)


def test_geojson_class_names_from_every_place_qupath_puts_them(tmp_path):
    g = {"type": "Polygon", "coordinates": [rect(0, 0, 100, 100)]}
    feats = [
        feature(g, "Tumor"),
        {"type": "Feature", "geometry": g, "properties": {"classification": "Necrosis"}},
        {"type": "Feature", "geometry": g, "properties": {"name": "Carcinoma"}},
        {"type": "Feature", "geometry": g, "properties": {"classification": {"names": ["Tumor", "Positive"]}}},
        {"type": "Feature", "geometry": g, "properties": {}},
    ]
    shapes = read_geojson(write_json(tmp_path / "c.geojson", feats))
    assert [s.names[0] for s in shapes] == ["Tumor", "Necrosis", "Carcinoma", "Tumor: Positive", "Unclassified"]
    assert "Tumor" in shapes[3].names


def test_class_filtering_defaults_and_explicit_lists(tmp_path):
    feats = [
        feature({"type": "Polygon", "coordinates": [rect(0, 0, 2000, 2000)]}, "Tumor"),
        feature({"type": "Polygon", "coordinates": [rect(3000, 0, 5000, 2000)]}, "Stroma"),
        feature({"type": "Polygon", "coordinates": [rect(6000, 0, 8000, 2000)]}, "Ignore*"),
        feature({"type": "Polygon", "coordinates": [rect(0, 3000, 2000, 5000)]}),  # unclassified
        feature({"type": "Polygon", "coordinates": [rect(500, 500, 1500, 1500)]}, "Exclusion"),
    ]
    path = write_json(tmp_path / "classes.geojson", {"type": "FeatureCollection", "features": feats})
    tumor = rect_mask(0, 0, 2000, 2000) & ~rect_mask(500, 500, 1500, 1500)
    default = mask_of(path)
    assert np.array_equal(default, tumor | rect_mask(0, 3000, 2000, 5000))  # stroma, ignore: out; exclusion: cut
    only_stroma = mask_of(path, rules=ClassRules(lesion=["stroma"]))  # case-insensitive
    assert np.array_equal(only_stroma, rect_mask(3000, 0, 5000, 2000))
    no_subtract = mask_of(path, rules=ClassRules(lesion=["Tumor"], subtract=[]))
    assert np.array_equal(no_subtract, rect_mask(0, 0, 2000, 2000))


def test_tiles_are_not_annotations(tmp_path):
    tile = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [rect(0, 0, 512, 512)]},
        "properties": {"objectType": "tile", "classification": {"name": "20x"}},
    }
    assert read_geojson(write_json(tmp_path / "t.geojson", [tile])) == []


# ----------------------------------------------------------------------------- ASAP XML

ASAP = """<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="2" X="5000" Y="4000" />
        <Coordinate Order="0" X="1000" Y="1000" />
        <Coordinate Order="1" X="5000" Y="1000" />
        <Coordinate Order="3" X="1000" Y="4000" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 1" Type="Polygon" PartOfGroup="_2" Color="#64FE2E">
      <Coordinates>
        <Coordinate Order="0" X="2000,5" Y="2000" />
        <Coordinate Order="1" X="3000" Y="2000" />
        <Coordinate Order="2" X="3000" Y="3000" />
        <Coordinate Order="3" X="2000,5" Y="3000" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 2" Type="Rectangle" PartOfGroup="Metastasis" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="0" X="6000" Y="4000" />
        <Coordinate Order="1" X="7000" Y="4000" />
        <Coordinate Order="2" X="7000" Y="5000" />
        <Coordinate Order="3" X="6000" Y="5000" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 3" Type="Dot" PartOfGroup="_0" Color="#F4FA58">
      <Coordinates><Coordinate Order="0" X="100" Y="100" /></Coordinates>
    </Annotation>
  </Annotations>
  <AnnotationGroups>
    <Group Name="_0" PartOfGroup="None" Color="#FF0000"><Attributes /></Group>
    <Group Name="_2" PartOfGroup="None" Color="#00FF00"><Attributes /></Group>
    <Group Name="Tumour" PartOfGroup="None" Color="#FF0000"><Attributes /></Group>
    <Group Name="Metastasis" PartOfGroup="Tumour" Color="#FF0000"><Attributes /></Group>
  </AnnotationGroups>
</ASAP_Annotations>
"""


def test_asap_xml_groups_order_and_exclusion(tmp_path):
    path = tmp_path / "camelyon.xml"
    path.write_text(ASAP)
    shapes = read_asap_xml(path)
    assert len(shapes) == 3  # the Dot has no area
    assert shapes[2].names == ("Metastasis", "Tumour")  # nested group: its ancestors count too
    got = mask_of(path)
    want = (rect_mask(1000, 1000, 5000, 4000) & ~rect_mask(2000.5, 2000, 3000, 3000)) | rect_mask(
        6000, 4000, 7000, 5000
    )
    assert np.array_equal(got, want)  # vertices sorted by Order; decimal comma read; _2 subtracted
    parent_only = mask_of(path, rules=ClassRules(lesion=["Tumour"]))
    assert np.array_equal(parent_only, rect_mask(6000, 4000, 7000, 5000))


# ----------------------------------------------------------------------------- mask images


def test_mask_png_at_another_resolution_is_resized_by_area(tmp_path):
    big = np.zeros((600, 800), np.uint8)  # 2x the thumbnail, same aspect as the slide
    big[100:301, 200:401] = 255  # odd extent: a half-covered thumbnail pixel row/column at the edge
    Image.fromarray(big).save(tmp_path / "m.png")
    got = mask_of(tmp_path / "m.png")
    want = np.zeros((300, 400), bool)
    want[50:150, 100:200] = True
    assert np.array_equal(got, want)


def test_label_image_with_configured_values_and_small_tiff(tmp_path):
    labels = np.zeros((150, 200), np.uint8)  # half the thumbnail: upsampled by nearest neighbour
    labels[10:20, 10:20] = 1
    labels[30:40, 30:40] = 2
    labels[60:70, 60:70] = 3
    Image.fromarray(labels).save(tmp_path / "labels.tif")
    assert annotation_format(tmp_path / "labels.tif") == "mask"
    only_2 = mask_of(tmp_path / "labels.tif", mask_labels=[2])
    assert only_2.sum() == 20 * 20 and only_2[60:80, 60:80].all()
    anything = mask_of(tmp_path / "labels.tif")
    assert anything.sum() == 3 * 20 * 20


def test_resize_mask_identity_and_shapes():
    m = np.random.default_rng(0).random((30, 40)) > 0.5
    assert np.array_equal(resize_mask(m, (40, 30)), m)
    assert resize_mask(m, (80, 60)).shape == (60, 80)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "name, content",
    [
        ("broken.geojson", '{"type": "FeatureCollection", "features": [ {'),
        ("broken.xml", "<ASAP_Annotations><Annot"),
        ("wrong.json", '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[1, 2, 3]]}}'),
        ("weird.geojson", '{"type": "Feature", "geometry": {"type": "Blob", "coordinates": []}}'),
        ("noimage.png", "this is not a PNG"),
    ],
)
def test_unparsable_files_name_the_file_and_the_slide(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(MsamilError) as err:
        mask_of(path)
    message = str(err.value)
    assert str(path) in message and "'slide A'" in message and "cannot parse" in message


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(MsamilError, match="not found.*annotation"):
        mask_of(tmp_path / "nowhere.geojson")


def test_out_of_bounds_coordinates_are_refused_beyond_the_tolerance(tmp_path):
    inside = write_json(
        tmp_path / "ok.geojson", [feature({"type": "Polygon", "coordinates": [rect(-50, 0, 8050, 6040)]}, "Tumor")]
    )
    assert mask_of(inside).all()  # within 1 %: the overshoot is clipped
    far = write_json(
        tmp_path / "far.geojson", [feature({"type": "Polygon", "coordinates": [rect(0, 0, 16000, 12000)]}, "Tumor")]
    )
    with pytest.raises(MsamilError) as err:
        mask_of(far)
    message = str(err.value)
    assert str(far) in message and "'slide A'" in message and "outside the slide" in message and "level-0" in message
    assert mask_of(far, tolerance=1.5).all()  # the tolerance is what refused it


def test_mask_of_another_aspect_ratio_is_refused(tmp_path):
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(tmp_path / "square.png")
    with pytest.raises(MsamilError, match="not the shape of the 8000 x 6000 px slide"):
        mask_of(tmp_path / "square.png")


def test_label_values_need_a_single_channel_image(tmp_path):
    Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(MsamilError, match="single-channel"):
        mask_of(tmp_path / "rgb.png", mask_labels=[1])
