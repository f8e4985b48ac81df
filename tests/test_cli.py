"""The msamil command line: help texts, one-line errors, no partial outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import pytest

from conftest import shared_slide
from msamil_core.cli import commands, main


def msamil(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "msamil_core", *map(str, args)], capture_output=True, text=True, cwd=cwd
    )


def test_help_lists_every_command():
    out = msamil("--help")
    assert out.returncode == 0
    for name in commands():
        assert name in out.stdout


@pytest.mark.parametrize("command", ["thumbnail", "tissue", "coords", "preprocess"])
def test_command_help_explains_options(command):
    out = msamil(command, "--help")
    assert out.returncode == 0
    assert "--out" in out.stdout or "--strategy-out" in out.stdout


def test_preprocessing_chain_on_cmu(tmp_path, cmu_slide):
    d = tmp_path / "cmu"
    assert main(["thumbnail", "--slide", str(cmu_slide), "--slide-id", "cmu", "--out", str(d / "thumbnail.png"), "--meta", str(d / "meta.json")]) == 0
    meta = json.loads((d / "meta.json").read_text())
    assert meta["vendor"] == "aperio" and meta["level_count"] == 1 and meta["objective_power"] == 20.0
    assert meta["mpp"] == pytest.approx(0.499) and meta["thumbnail"]["height"] == 1024
    assert main(["tissue", "--thumbnail", str(d / "thumbnail.png"), "--out", str(d / "tissue_mask.png")]) == 0
    outs = {s: tmp_path / f"{s}.h5" for s in ("20x", "10x", "5x")}
    assert main(["coords", "--meta", str(d / "meta.json"), "--tissue-mask", str(d / "tissue_mask.png"), "--patch-size", "256", "--min-fraction", "0.4",
                 "--out-20x", str(outs["20x"]), "--out-10x", str(outs["10x"]), "--out-5x", str(outs["5x"])]) == 0
    sizes = []
    for scale, path in outs.items():
        with h5py.File(path) as f:
            assert f["coords"].shape[0] > 0
            assert f["coords"].attrs["target_magnification"] == int(scale[:-1])
            sizes.append(int(f["coords"].attrs["patch_size_level0"]))
    assert sizes[1] == 2 * sizes[0] and sizes[2] == 4 * sizes[0]

    # several strategies in one call write what one call per strategy writes
    import numpy as np
    from PIL import Image

    tissue = np.asarray(Image.open(d / "tissue_mask.png")) > 0
    lesion = np.zeros_like(tissue)
    lesion[: tissue.shape[0] // 2] = True  # the upper half of the tissue is "lesion"
    Image.fromarray((lesion * 255).astype(np.uint8)).save(d / "lesion_mask.png")
    common = ["coords", "--meta", str(d / "meta.json"), "--tissue-mask", str(d / "tissue_mask.png"), "--patch-size", "256",
              "--min-fraction", "0.4"]
    scales = ("20x", "10x", "5x")
    files = {s: [str(tmp_path / "multi" / s / f"{m}.h5") for m in scales] for s in ("lesion", "tissue", "random")}
    assert main([*common, "--lesion-mask", str(d / "lesion_mask.png"), "--random-n", "5", "--random-seed", "3",
                 *[a for s, f in files.items() for m, p in zip(scales, f) for a in ("--strategy-out", f"{s}:{m}={p}")]]) == 0
    single = {
        "lesion": ["--lesion-mask", str(d / "lesion_mask.png")],
        "tissue": [],
        "random": ["--strategy", "random", "--random-n", "5", "--random-seed", "3"],
    }
    for strategy, extra in single.items():
        alone = [str(tmp_path / "single" / strategy / f"{m}.h5") for m in ("20x", "10x", "5x")]
        assert main([*common, *extra, "--out-20x", alone[0], "--out-10x", alone[1], "--out-5x", alone[2]]) == 0
        for a, b in zip(files[strategy], alone):
            with h5py.File(a) as fa, h5py.File(b) as fb:
                assert np.array_equal(fa["coords"][()], fb["coords"][()]), (strategy, a)
                assert dict(fa["coords"].attrs).keys() == dict(fb["coords"].attrs).keys()
                assert fa["coords"].attrs["selection"] == fb["coords"].attrs["selection"]
    with h5py.File(files["random"][0]) as f:
        assert f["coords"].shape[0] == 5
    with h5py.File(files["lesion"][0]) as fl, h5py.File(files["tissue"][0]) as ft:
        assert 0 < fl["coords"].shape[0] < ft["coords"].shape[0]
    # lesion without its mask, a strategy without all three scales: a one-line error
    for strategy, names in (("lesion", scales), ("tissue", scales[:2])):
        named = [a for m, p in zip(names, files[strategy]) for a in ("--strategy-out", f"{strategy}:{m}={p}")]
        assert main([*common, *named]) == 1


@pytest.mark.parametrize(
    "slide, words",
    [
        ("unopenable.tiff", ["'unopenable'", "OpenSlide cannot open"]),
        ("unreadable.svs", ["'unreadable'", "fail to decode"]),
        ("boxes.tiff", ["'boxes'", "`mpp` column"]),
        ("missing.svs", ["'missing'", "file not found"]),
    ],
)
def test_bad_slide_is_one_line_and_leaves_nothing(tmp_path, slide, words):
    path = shared_slide("small.svs").parent / slide
    out = msamil("thumbnail", "--slide", path, "--out", tmp_path / "o" / "thumbnail.png", "--meta", tmp_path / "o" / "meta.json")
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("msamil thumbnail: error: slide")
    for w in words:
        assert w in lines[0]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_no_tissue_fails_the_slide(tmp_path, blank_slide):
    assert main(["thumbnail", "--slide", str(blank_slide), "--out", str(tmp_path / "t.png"), "--meta", str(tmp_path / "m.json")]) == 0
    out = msamil("tissue", "--thumbnail", tmp_path / "t.png", "--slide-id", "blank", "--out", tmp_path / "mask.png")
    assert out.returncode == 1
    assert "slide 'blank': no tissue found" in out.stderr
    assert not (tmp_path / "mask.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.tiff", "m.json", "t.png"]


def test_preprocess_writes_what_the_steps_write_one_by_one(tmp_path, cmu_slide):
    """`msamil preprocess` (the workflow's preprocess_slide) = thumbnail, tissue, coords and
    export-geojson run one after the other with the same options."""
    import numpy as np
    from PIL import Image

    grid = ["--patch-size", "256", "--min-fraction", "0.4", "--random-n", "5", "--random-seed", "3"]
    scales = ("20x", "10x", "5x")
    made = {}
    for how in ("steps", "one"):
        d = tmp_path / how
        coords = {s: {m: str(d / s / f"{m}.h5") for m in scales} for s in ("tissue", "random")}
        outs = [a for s, f in coords.items() for m, p in f.items() for a in ("--strategy-out", f"{s}:{m}={p}")]
        thumb, meta, tissue, geojson = d / "thumbnail.png", d / "meta.json", d / "tissue_mask.png", d / "patches.geojson"
        if how == "steps":
            assert main(["thumbnail", "--slide", str(cmu_slide), "--slide-id", "cmu", "--out", str(thumb), "--meta", str(meta)]) == 0
            assert main(["tissue", "--thumbnail", str(thumb), "--slide-id", "cmu", "--out", str(tissue)]) == 0
            assert main(["coords", "--meta", str(meta), "--tissue-mask", str(tissue), *grid, *outs]) == 0
            assert main(["export-geojson", "--meta", str(meta), "--tissue-mask", str(tissue),
                         "--coords", *coords["tissue"].values(), "--out", str(geojson)]) == 0
        else:
            assert main(["preprocess", "--slide", str(cmu_slide), "--slide-id", "cmu", "--thumbnail", str(thumb),
                         "--meta", str(meta), "--tissue-mask", str(tissue), *grid, *outs, "--geojson", str(geojson),
                         "--geojson-strategy", "tissue"]) == 0
        files = {"meta": json.loads(meta.read_text()), "geojson": json.loads(geojson.read_text())}
        for name, path in (("thumbnail", thumb), ("tissue", tissue)):
            files[name] = np.asarray(Image.open(path))
        for strategy, paths in coords.items():
            for scale, path in paths.items():
                with h5py.File(path) as f:
                    files[f"{strategy} {scale}"] = (f["coords"][()], dict(f["coords"].attrs))
        made[how] = files
    steps, one = made["steps"], made["one"]
    assert steps.keys() == one.keys()
    assert steps["meta"] == one["meta"] and steps["geojson"] == one["geojson"]
    assert len(one["geojson"]["features"]) > 1
    for name in ("thumbnail", "tissue"):
        assert np.array_equal(steps[name], one[name]), name
    for name in steps:
        if " " in name:
            assert np.array_equal(steps[name][0], one[name][0]) and len(one[name][0]) > 0, name
            assert str(steps[name][1]) == str(one[name][1]), name


def test_preprocess_fails_whole_and_refuses_what_it_cannot_do(tmp_path, blank_slide, cmu_slide):
    out = tmp_path / "o"
    files = ["--thumbnail", out / "t.png", "--meta", out / "m.json", "--tissue-mask", out / "mask.png"]
    grid = [a for m in ("20x", "10x", "5x") for a in ("--strategy-out", f"tissue:{m}={out / m}.h5")]
    # no tissue: one line naming the slide, and none of its files (the thumbnail was written first)
    run = msamil("preprocess", "--slide", blank_slide, "--slide-id", "blank", *files, *grid)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "slide 'blank': no tissue found" in lines[0]
    assert not out.exists() or not any(out.iterdir())
    # lesion coordinates need the lesion mask, which comes after this step; GeoJSON needs grids
    lesion = [a for m in ("20x", "10x", "5x") for a in ("--strategy-out", f"lesion:{m}={out / m}.h5")]
    for extra, words in ((lesion, "lesion strategy"), (["--geojson", out / "p.geojson"], "--geojson")):
        run = msamil("preprocess", "--slide", cmu_slide, *files, *extra)
        assert run.returncode == 1 and words in run.stderr and len(run.stderr.strip().splitlines()) == 1
        assert not out.exists() or not any(out.iterdir())



def test_list_models_json_lists_every_name(capsys):
    """`msamil list-models --json`: what msamil_core.names caches for the parse-time name checks."""
    import timm

    from msamil_core.features.presets import PRESETS
    from msamil_core.mil import list_models

    assert main(["list-models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed == {
        "mil": list_models(),
        "encoders": {"presets": list(PRESETS), "registered": ["msfem"], "timm": timm.list_models()},
    }
    assert main(["list-models", "--json", "abmil*"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["mil"] == list_models("abmil*") and listed["encoders"] == {"presets": [], "registered": [], "timm": []}
    assert main(["list-models", "abmil*"]) == 0
    assert "abmil.base" in capsys.readouterr().out
