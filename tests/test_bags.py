"""Feature bags: ours, TRIDENT's and CLAM's files, written here the way those tools write them."""

from __future__ import annotations

import argparse

import h5py
import numpy as np
import pytest
import torch

from msamil_core.features.bags import Bag, find_bag, load_bag, merge_bags, save_bag
from msamil_core.errors import MsamilError


def _grid(n: int, step: int, seed: int = 0) -> np.ndarray:
    """n distinct grid positions (level-0 top-left) of a ``step``-px grid, shuffled."""
    rng = np.random.default_rng(seed)
    cells = rng.choice(100, size=n, replace=False)
    return np.stack([cells % 10 * step, cells // 10 * step], axis=1).astype(np.int64)


def _bag(n: int = 7, d: int = 5, seed: int = 0) -> Bag:
    g = torch.Generator().manual_seed(seed)
    return Bag(
        features=torch.randn(n, d, generator=g),
        coords=torch.from_numpy(_grid(n, 256, seed)),
        scales=torch.randint(0, 3, (n,), generator=g),
        patch_size_level0=torch.randint(100, 2000, (n,), generator=g),
        slide_id="slide 01 (a)",
        encoder="resnet18-0123456789",
    )


def _write_h5(path, assets: dict, attributes: dict, chunk_rows: int) -> None:
    """Resizable, row-chunked datasets with per-dataset attributes: how TRIDENT's and CLAM's
    writers store assets (CLAM appends batch after batch with mode 'a')."""
    with h5py.File(path, "a") as f:
        for key, value in assets.items():
            if key not in f:
                ds = f.create_dataset(
                    key,
                    shape=value.shape,
                    maxshape=(None,) + value.shape[1:],
                    chunks=(chunk_rows,) + value.shape[1:],
                    dtype=value.dtype,
                )
                ds[:] = value
                for k, v in attributes.get(key, {}).items():
                    ds.attrs[k] = v
            else:
                ds = f[key]
                ds.resize(len(ds) + len(value), axis=0)
                ds[-len(value) :] = value


def _trident_h5(path, features: np.ndarray, coords: np.ndarray, target_mag: int, encoder: str = "uni_v1") -> None:
    _write_h5(
        path,
        {"features": features, "coords": coords},
        {
            "features": {"name": path.stem, "savetodir": str(path.parent), "encoder": encoder},
            "coords": {
                "patch_size": 256,
                "patch_size_level0": 256 * 40 // target_mag,
                "level0_magnification": 40,
                "target_magnification": target_mag,
                "overlap": 0,
                "name": path.stem,
                "savetodir": str(path.parent),
                "level0_width": 40000,
                "level0_height": 30000,
            },
        },
        chunk_rows=1,
    )


def test_our_bag_round_trip_with_float16_storage(tmp_path):
    bag = _bag()
    bag.features = bag.features.half()
    path = tmp_path / f"{bag.slide_id}.pt"
    save_bag(path, bag)
    raw = torch.load(path, weights_only=True)  # the SPEC's promise
    assert set(raw) == {"features", "coords", "scales", "patch_size_level0", "slide_id", "encoder"}
    loaded = load_bag(path)
    assert loaded.features.dtype == torch.float32 and loaded.features.shape == (7, 5)
    assert torch.equal(loaded.features, bag.features.float())
    for name in ("coords", "scales", "patch_size_level0"):
        assert getattr(loaded, name).dtype == torch.int64
        assert torch.equal(getattr(loaded, name), getattr(bag, name))
    assert (loaded.slide_id, loaded.encoder) == (bag.slide_id, bag.encoder)
    counts = loaded.scale_counts()
    assert sum(counts.values()) == 7 and counts["10x"] == int((bag.scales == 1).sum())


def test_trident_h5_at_10x(tmp_path):
    folder = tmp_path / "20x_256px_0px_overlap" / "features_uni_v1"
    folder.mkdir(parents=True)
    features = np.random.default_rng(1).normal(size=(9, 16)).astype(np.float32)
    coords = _grid(9, 1024, seed=1)
    _trident_h5(folder / "TCGA-01.h5", features, coords, target_mag=10)
    bag = load_bag(find_bag(folder, "TCGA-01"))
    assert bag.features.dtype == torch.float32 and np.array_equal(bag.features.numpy(), features)
    assert np.array_equal(bag.coords.numpy(), coords) and bag.coords.dtype == torch.int64
    assert bag.scales.tolist() == [1] * 9  # target_magnification 10 -> 10x
    assert bag.patch_size_level0.tolist() == [1024] * 9  # 256 px at 10x on a 40x slide
    assert (bag.slide_id, bag.encoder) == ("TCGA-01", "uni_v1")


def test_trident_empty_slide(tmp_path):
    # TRIDENT writes features of shape (0,) when the encoder's width is unknown
    _trident_h5(tmp_path / "empty.h5", np.empty((0,), np.float32), np.empty((0, 2), np.int64), target_mag=20)
    bag = load_bag(tmp_path / "empty.h5")
    assert len(bag) == 0 and bag.features.shape == (0, 0) and bag.coords.shape == (0, 2)


def test_trident_scales_merge_into_one_multiscale_bag(tmp_path):
    rng = np.random.default_rng(2)
    bags = []
    for mag, n in ((20, 6), (10, 3), (5, 2)):
        folder = tmp_path / f"{mag}x" / "features_conch_v15"
        folder.mkdir(parents=True)
        _trident_h5(folder / "s.h5", rng.normal(size=(n, 8)).astype(np.float32), _grid(n, 256 * 40 // mag), mag)
        bags.append(load_bag(folder / "s.h5"))
    merged = merge_bags(bags)
    assert merged.scales.tolist() == [0] * 6 + [1] * 3 + [2] * 2
    assert merged.patch_size_level0.tolist() == [512] * 6 + [1024] * 3 + [2048] * 2
    other = bags[0]
    other.encoder = "conch_v15"  # the files say uni_v1
    with pytest.raises(MsamilError, match="cannot merge"):
        merge_bags([bags[1], other])


def test_clam_h5_appended_in_batches_without_attributes(tmp_path):
    folder = tmp_path / "FEATURES" / "h5_files"
    folder.mkdir(parents=True)
    path = folder / "slide_7.h5"
    rng = np.random.default_rng(3)
    coords = _grid(40, 448, seed=3).astype(np.int32)  # CLAM stores int32 coordinates
    features = rng.normal(size=(40, 1024)).astype(np.float32)
    for start in range(0, 40, 16):  # one write per DataLoader batch, like CLAM's compute_w_loader
        _write_h5(path, {"features": features[start : start + 16], "coords": coords[start : start + 16]}, {}, 32)
    bag = load_bag(find_bag(tmp_path / "FEATURES", "slide_7"))
    assert bag.features.shape == (40, 1024) and np.array_equal(bag.features.numpy(), features)
    assert bag.coords.dtype == torch.int64 and np.array_equal(bag.coords.numpy(), coords)
    assert bag.scales.tolist() == [0] * 40  # single scale, no magnification recorded
    assert bag.patch_size_level0.tolist() == [448] * 40  # the coordinate grid's step
    assert bag.encoder == "FEATURES"


def test_clam_h5_with_batch_dimension(tmp_path):
    path = tmp_path / "s.h5"
    features = np.random.default_rng(4).normal(size=(1, 5, 12)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f["features"] = features
        f["coords"] = _grid(5, 256).astype(np.int32)
    bag = load_bag(path)
    assert bag.features.shape == (5, 12) and np.array_equal(bag.features.numpy(), features[0])


def test_features_only_pt_files(tmp_path):
    clam = tmp_path / "pt_files" / "s1.pt"
    clam.parent.mkdir()
    torch.save(torch.randn(6, 32), clam)  # CLAM's pt_files: a bare tensor
    assert find_bag(tmp_path, "s1") == clam
    with pytest.raises(MsamilError, match="no patch coordinates") as info:
        load_bag(clam)
    assert str(clam) in str(info.value)
    bag = load_bag(clam, require_coords=False)
    assert bag.features.shape == (6, 32) and not bag.has_coords and (bag.coords == -1).all()
    trident = tmp_path / "s2.pt"
    torch.save(np.arange(12, dtype=np.float32).reshape(3, 4), trident)  # TRIDENT's .pt: a numpy array
    bag = load_bag(trident, require_coords=False)
    assert bag.features.tolist() == np.arange(12, dtype=np.float32).reshape(3, 4).tolist()
    with pytest.raises(MsamilError):
        save_bag(tmp_path / "out.pt", bag)


def test_find_bag_prefers_our_pt_and_names_what_it_tried(tmp_path):
    save_bag(tmp_path / "a.pt", _bag())
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["features"] = np.zeros((1, 2), np.float32)
    assert find_bag(tmp_path, "a") == tmp_path / "a.pt"
    assert find_bag(tmp_path, "a").suffix == ".pt"
    with pytest.raises(MsamilError, match="no feature bag") as info:
        find_bag(tmp_path, "b")
    assert "'b'" in str(info.value) and str(tmp_path) in str(info.value)
    with pytest.raises(MsamilError, match="not found"):
        find_bag(tmp_path / "missing_dir", "a")


def test_malformed_bags_fail_naming_the_file(tmp_path):
    bag = _bag()
    cases = {
        "missing_key.pt": {k: v for k, v in bag.to_dict().items() if k != "scales"},
        "rows.pt": {**bag.to_dict(), "coords": bag.coords[:-1]},
        "scale.pt": {**bag.to_dict(), "scales": bag.scales + 3},
        "not_a_bag.pt": "hello",
        "int_features.pt": {**bag.to_dict(), "features": bag.coords},
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(MsamilError) as info:
            load_bag(tmp_path / name)
        assert str(tmp_path / name) in str(info.value), name
    # arbitrary objects are never unpickled
    torch.save({**bag.to_dict(), "extra": argparse.Namespace(x=1)}, tmp_path / "object.pt")
    with pytest.raises(MsamilError, match="cannot read"):
        load_bag(tmp_path / "object.pt")
    with h5py.File(tmp_path / "nofeatures.h5", "w") as f:
        f["coords"] = np.zeros((2, 2), np.int64)
    with pytest.raises(MsamilError, match="no `features`"):
        load_bag(tmp_path / "nofeatures.h5")
    (tmp_path / "broken.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(MsamilError, match="cannot read"):
        load_bag(tmp_path / "broken.h5")
    with pytest.raises(MsamilError, match="not found"):
        load_bag(tmp_path / "absent.pt")
