"""`msamil extract` on a real slide: bag layout, row order, determinism, empty slides, failures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msamil_core.features.bags import load_bag
from msamil_core.cli import main
from msamil_core.wsi.coords import make_grids, read_coords, write_coords
from msamil_core.features.encoders import EncoderSpec, build_encoder, encoder_id
from msamil_core.wsi.geometry import SCALES
from msamil_core.wsi.slide import open_slide

ENCODER = ["--encoder", "resnet18", "--input-size", "64", "--no-server"]  # test_server.py tests the server


@pytest.fixture
def cmu_coords(tmp_path, cmu_slide):
    """20x/10x/5x coordinates of CMU-1-Small-Region (256-px patches) on its upper half."""
    with open_slide(cmu_slide) as slide:
        mask = np.zeros((60, 44), bool)
        mask[:30] = True
        grids = make_grids(mask, slide.dimensions, slide.mpp, patch_size=256, name=slide.slide_id)
    paths = {}
    for scale, grid in grids.items():
        paths[scale] = tmp_path / "coords" / scale / "cmu.h5"
        write_coords(paths[scale], grid.coords, grid.attrs)
    return paths


def _extract(slide, coords, out, *extra) -> int:
    return main(["extract", "--slide", str(slide), "--coords", *map(str, coords), "--out", str(out), *ENCODER, *extra])


def test_extract_writes_a_multiscale_bag(tmp_path, cmu_slide, cmu_coords):
    out = tmp_path / "features" / "resnet18" / "cmu.pt"
    # files in reverse order: the scale comes from each file's attribute
    shuffled = [cmu_coords[s] for s in ("5x", "20x", "10x")]
    assert _extract(cmu_slide, shuffled, out, "--slide-id", "cmu", "--workers", "2") == 0
    raw = torch.load(out, weights_only=True)
    assert raw["features"].dtype == torch.float32 and raw["coords"].dtype == torch.int64
    bag = load_bag(out)
    expected_coords, expected_scales, expected_sizes = [], [], []
    for index, scale in enumerate(SCALES):
        coords, attrs = read_coords(cmu_coords[scale])
        assert len(coords) > 0
        expected_coords.append(coords)
        expected_scales += [index] * len(coords)
        expected_sizes += [attrs["patch_size_level0"]] * len(coords)
    assert np.array_equal(bag.coords.numpy(), np.concatenate(expected_coords))
    assert bag.scales.tolist() == expected_scales
    assert bag.patch_size_level0.tolist() == expected_sizes
    assert bag.features.shape == (len(expected_scales), 512) and torch.isfinite(bag.features).all()
    assert bag.slide_id == "cmu"
    assert bag.encoder == encoder_id(EncoderSpec("resnet18", input_size=64))

    # row i is the encoding of patch i: re-encode a few patches of each scale by hand
    encoder, _ = build_encoder(EncoderSpec("resnet18", input_size=64))
    rows = [0, expected_scales.index(1), expected_scales.index(2), len(expected_scales) - 1]
    with open_slide(cmu_slide) as slide, torch.inference_mode():
        for row in rows:
            x, y = bag.coords[row].tolist()
            patch = slide.read_patch(x, y, int(bag.patch_size_level0[row]), 64)
            feature = encoder(torch.from_numpy(patch.copy()).permute(2, 0, 1)[None])[0]
            assert torch.allclose(bag.features[row], feature, atol=1e-4), row


def test_rerun_is_identical_and_fp16_storage(tmp_path, cmu_slide, cmu_coords):
    coords = list(cmu_coords.values())
    first, second, half = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    assert _extract(cmu_slide, coords, first, "--workers", "2", "--batch-size", "16") == 0
    assert _extract(cmu_slide, coords, second, "--workers", "0", "--batch-size", "16") == 0
    a, b = torch.load(first, weights_only=True), torch.load(second, weights_only=True)
    assert torch.equal(a["features"], b["features"]) and torch.equal(a["coords"], b["coords"])
    assert _extract(cmu_slide, coords, half, "--fp16", "--batch-size", "16") == 0
    c = torch.load(half, weights_only=True)
    assert c["features"].dtype == torch.float16
    assert torch.allclose(c["features"].float(), a["features"], rtol=1e-2, atol=1e-2)


def test_slide_without_patches_gives_an_empty_bag(tmp_path, cmu_slide, cmu_coords):
    empty = []
    for scale, path in cmu_coords.items():
        _, attrs = read_coords(path)
        empty.append(tmp_path / f"empty_{scale}.h5")
        write_coords(empty[-1], np.zeros((0, 2), np.int64), attrs)
    out = tmp_path / "empty.pt"
    assert _extract(cmu_slide, empty, out) == 0
    bag = load_bag(out)
    assert bag.features.shape == (0, 512) and bag.coords.shape == (0, 2) and bag.scales.shape == (0,)


def test_coordinates_of_another_slide_or_twice_the_same_scale_fail(tmp_path, cmu_slide, cmu_coords, capsys):
    coords, attrs = read_coords(cmu_coords["20x"])
    foreign = tmp_path / "foreign.h5"
    write_coords(foreign, coords, {**attrs, "level0_width": 4000, "level0_height": 3000})
    assert _extract(cmu_slide, [foreign], tmp_path / "x.pt") == 1
    assert "another slide" in capsys.readouterr().err
    assert _extract(cmu_slide, [cmu_coords["20x"], cmu_coords["20x"]], tmp_path / "x.pt") == 1
    assert "both hold 20x" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_undecodable_tiles_fail_as_one_line_from_a_worker(tmp_path, capsys):
    from conftest import shared_slide

    slide = shared_slide("unreadable.svs")  # opens, but its tiles fail to decode
    coords = tmp_path / "bad.h5"
    write_coords(
        coords,
        np.array([[0, 0], [8, 8]]),
        {"patch_size": 8, "patch_size_level0": 8, "target_magnification": 20, "level0_width": 16, "level0_height": 16},
    )
    out = tmp_path / "bad.pt"
    assert _extract(slide, [coords], out, "--workers", "1") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("msamil extract: error: slide 'unreadable'") and "decode" in err
    assert not out.exists()
    # the workflow's extraction: empty bags that say why, and the job succeeds
    assert _extract(slide, [coords], out, "--workers", "1", "--leave-out-unreadable") == 0
    bag = load_bag(out)
    assert len(bag) == 0 and bag.dim == 512 and bag.left_out.startswith("slide 'unreadable'")
    assert "decode" in bag.left_out and "\n" not in bag.left_out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_asking_for_a_missing_gpu_fails_clearly(tmp_path, cmu_slide, cmu_coords, capsys):
    assert _extract(cmu_slide, list(cmu_coords.values()), tmp_path / "x.pt", "--device", "cuda") == 1
    assert "no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_several_bags_from_one_pass_share_their_patches(tmp_path, cmu_slide, cmu_coords):
    """Two patch sets (all patches; every other 20x patch plus the 5x ones, in reverse order):
    each bag holds exactly its set's rows, encoded as a bag of its own would be, and shared
    patches are encoded once."""
    subset = {}
    for scale in ("20x", "5x"):
        coords, attrs = read_coords(cmu_coords[scale])
        subset[scale] = tmp_path / "subset" / f"{scale}.h5"
        write_coords(subset[scale], (coords[::2] if scale == "20x" else coords)[::-1].copy(), attrs)
    full, part = tmp_path / "full.pt", tmp_path / "part.pt"
    argv = ["extract", "--slide", str(cmu_slide), *ENCODER, "--batch-size", "16", "--bag", f"full={full}",
            "--bag", f"part={part}", *[a for p in cmu_coords.values() for a in ("--bag-coords", f"full={p}")],
            *[a for p in subset.values() for a in ("--bag-coords", f"part={p}")]]
    assert main(argv) == 0
    alone = tmp_path / "alone.pt"
    assert _extract(cmu_slide, list(subset.values()), alone, "--batch-size", "16") == 0
    a, b, c = load_bag(full), load_bag(part), load_bag(alone)
    assert torch.equal(b.coords, c.coords) and torch.equal(b.scales, c.scales)
    assert torch.allclose(b.features, c.features, atol=1e-4)
    # the subset's rows are rows of the full bag, with the same features
    row = {(s, x, y): i for i, (s, (x, y)) in enumerate(zip(a.scales.tolist(), a.coords.tolist()))}
    index = [row[(s, x, y)] for s, (x, y) in zip(b.scales.tolist(), b.coords.tolist())]
    assert torch.equal(b.features, a.features[index])
    assert a.patches_encoded == b.patches_encoded == len(a) > len(b)
    assert c.patches_encoded is None


def test_named_bags_must_pair_with_their_coordinates(tmp_path, cmu_slide, cmu_coords, capsys):
    unpaired = ["--bag", f"a={tmp_path / 'a.pt'}", "--bag-coords", f"b={cmu_coords['20x']}"]
    no_coords = ["--bag", f"a={tmp_path / 'a.pt'}"]
    mixed = ["--bag", f"a={tmp_path / 'a.pt'}", "--bag-coords", f"a={cmu_coords['20x']}", "--coords",
             str(cmu_coords["20x"]), "--out", str(tmp_path / "b.pt")]
    for extra, words in ((unpaired, "no --bag b="), (no_coords, "no --bag-coords a="), (mixed, "not both")):
        assert main(["extract", "--slide", str(cmu_slide), *ENCODER, *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "b.pt").exists()
