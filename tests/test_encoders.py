"""Patch encoders: shapes, normalisation, determinism, offline weights and their failures."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from msamil_core.features.encoders import MSFEM, EncoderSpec, build_encoder, encoder_id, list_encoders
from msamil_core.errors import MsamilError


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _encode(encoder, x):
    with torch.inference_mode():
        return encoder(x)


def _timm_reference(name: str, seed: int) -> torch.nn.Module:
    """A timm model with its classifier, randomly initialised from ``seed`` (what a user would save)."""
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False).eval()


def test_msfem_paper_geometry_at_512():
    model = MSFEM(depth=1, heads=8).eval()
    x = torch.rand(1, 3, 512, 512)
    with torch.inference_mode():
        fmap = model.backbone.forward_features(x)
        tokens = model.forward_tokens(x)
        feature = model(x)
    assert fmap.shape == (1, 1536, 16, 16)  # EfficientNet-B3 map of the paper
    assert tokens.shape == (1, 1 + 256, 512)  # class token + 256 tokens
    assert feature.shape == (1, 512)
    assert torch.equal(feature, tokens[:, 0])


@pytest.mark.parametrize("size,grid", [(64, 2), (96, 3)])
def test_msfem_small_inputs_interpolate_position_embedding(size, grid):
    spec = EncoderSpec("msfem", input_size=size, kwargs={"depth": 2, "heads": 4, "dim": 64})
    encoder, dim = build_encoder(spec)
    assert dim == 64 and len(encoder.model.blocks) == 2
    assert encoder.model.position_embedding((grid, grid)).shape == (1, 1 + grid * grid, 64)
    out = _encode(encoder, _images(3, size))
    assert out.shape == (3, 64) and out.dtype == torch.float32 and torch.isfinite(out).all()
    # the tokens of one image do not leak into another's feature
    assert torch.allclose(_encode(encoder, _images(3, size)[:1]), out[:1], atol=1e-5)


@pytest.mark.parametrize(
    "name,size",
    [("resnet18", 64), ("efficientnet_b0", 64), ("vit_tiny_patch16_224", 64)],
)
def test_timm_backbones_pool_to_their_width(name, size):
    encoder, dim = build_encoder(EncoderSpec(name, input_size=size))
    out = _encode(encoder, _images(2, size))
    assert out.shape == (2, dim)
    assert dim == encoder.model.num_features
    if name.startswith("vit"):
        assert encoder.model.patch_embed.img_size == (size, size)  # ViT built for the input size


def test_uint8_and_float_inputs_normalise_alike():
    spec = EncoderSpec("resnet18", input_size=64, mean=(0.7, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    encoder, _ = build_encoder(spec)
    x = _images(2, 64)
    as_float = x.float() / 255
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    expected = encoder.model((as_float - mean) / std)
    assert torch.allclose(_encode(encoder, x), expected, atol=1e-5)
    assert torch.allclose(_encode(encoder, as_float), expected, atol=1e-5)


def test_random_init_is_deterministic_and_seeded():
    spec = EncoderSpec("msfem", input_size=64, kwargs={"backbone": "resnet18", "depth": 1, "dim": 64, "heads": 2})
    torch.manual_seed(123)  # the global RNG state must not matter
    a, _ = build_encoder(spec)
    torch.manual_seed(456)
    b, _ = build_encoder(spec)
    c, _ = build_encoder(EncoderSpec(**{**spec.__dict__, "seed": 1}))
    x = _images(2, 64)
    assert torch.equal(_encode(a, x), _encode(b, x))
    assert not torch.allclose(_encode(a, x), _encode(c, x))
    assert encoder_id(spec) == encoder_id(EncoderSpec(**spec.__dict__))
    assert encoder_id(spec) != encoder_id(EncoderSpec(**{**spec.__dict__, "seed": 1}))
    assert encoder_id(spec).startswith("msfem-")


@pytest.mark.parametrize("suffix", [".bin", ".pth", ".safetensors"])
def test_saved_timm_state_dict_reproduces_outputs(tmp_path, suffix):
    reference = _timm_reference("resnet18", seed=7)  # with its classifier, as timm/HF files are
    path = tmp_path / f"resnet18{suffix}"
    state = reference.state_dict()
    if suffix == ".safetensors":
        save_file(state, str(path))
    elif suffix == ".pth":
        torch.save({"state_dict": state, "epoch": 3, "best_auc": np.float64(0.9)}, path)  # a training checkpoint
    else:
        torch.save(state, path)
    spec = EncoderSpec("resnet18", weights=path, input_size=64)
    encoder, dim = build_encoder(spec)
    x = _images(2, 64)
    reference.reset_classifier(0)
    with torch.inference_mode():
        expected = reference((x.float() / 255 - encoder.mean) / encoder.std)
    assert dim == 512
    assert torch.allclose(_encode(encoder, x), expected, atol=1e-6)
    # the id follows the file's bytes, not its name or folder
    copy = tmp_path / "elsewhere" / f"copy{suffix}"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    assert encoder_id(spec) == encoder_id(EncoderSpec("resnet18", weights=copy, input_size=64))
    assert encoder_id(spec) != encoder_id(EncoderSpec("resnet18", input_size=64))


def test_vit_weights_load_at_another_input_size(tmp_path):
    reference = _timm_reference("vit_tiny_patch16_224", seed=3)
    path = tmp_path / "vit.safetensors"
    save_file(reference.state_dict(), str(path))
    encoder, dim = build_encoder(EncoderSpec("vit_tiny_patch16_224", weights=path, input_size=64))
    assert dim == 192
    assert encoder.model.pos_embed.shape[1] == 1 + (64 // 16) ** 2  # resampled from 14x14 to 4x4
    assert torch.equal(encoder.model.blocks[0].attn.qkv.weight, reference.blocks[0].attn.qkv.weight)


def test_wrong_architecture_fails_clearly(tmp_path):
    path = tmp_path / "resnet18.bin"
    torch.save(_timm_reference("resnet18", seed=0).state_dict(), path)
    with pytest.raises(MsamilError, match="do not fit") as info:
        build_encoder(EncoderSpec("efficientnet_b0", weights=path, input_size=64))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_and_unreadable_weights_fail_clearly(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(MsamilError, match="not found") as info:
        build_encoder(EncoderSpec("resnet18", weights=missing))
    assert str(missing) in str(info.value)
    garbage = tmp_path / "garbage.bin"
    garbage.write_text("not a checkpoint")
    with pytest.raises(MsamilError, match="cannot read"):
        build_encoder(EncoderSpec("resnet18", weights=garbage))
    bad_safetensors = tmp_path / "bad.safetensors"
    bad_safetensors.write_bytes(b"\x00" * 64)
    with pytest.raises(MsamilError, match="safetensors"):
        build_encoder(EncoderSpec("resnet18", weights=bad_safetensors))


def test_weights_file_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"conv1.weight": torch.zeros(1), "extra": argparse.Namespace(a=1)}, path)
    with pytest.raises(MsamilError, match="cannot read"):
        build_encoder(EncoderSpec("resnet18", weights=path))


def test_msfem_backbone_weights(tmp_path):
    reference = _timm_reference("resnet18", seed=11)
    path = tmp_path / "backbone.safetensors"
    save_file(reference.state_dict(), str(path))
    kwargs = {"backbone": "resnet18", "depth": 1, "dim": 64, "heads": 2}
    spec = EncoderSpec("msfem", input_size=64, kwargs={**kwargs, "backbone_weights": str(path)})
    encoder, _ = build_encoder(spec)
    assert torch.equal(encoder.model.backbone.conv1.weight, reference.conv1.weight)
    # replacing the file's contents changes the id, although the path is the same
    before = encoder_id(spec)
    save_file(_timm_reference("resnet18", seed=12).state_dict(), str(path))
    assert encoder_id(spec) != before


def test_msfem_checkpoint_round_trip(tmp_path):
    kwargs = {"backbone": "resnet18", "depth": 1, "dim": 64, "heads": 2}
    trained, _ = build_encoder(EncoderSpec("msfem", input_size=64, kwargs=kwargs, seed=5))
    path = tmp_path / "msfem.pth"
    # a DDP training checkpoint: wrapped and every key prefixed with "module."
    torch.save({"model": {f"module.{k}": v for k, v in trained.model.state_dict().items()}, "epoch": 9}, path)
    spec = EncoderSpec("msfem", weights=path, input_size=64, kwargs=kwargs)  # seed 0: the file must win
    loaded, _ = build_encoder(spec)
    x = _images(2, 64)
    assert torch.equal(_encode(loaded, x), _encode(trained, x))
    with pytest.raises(MsamilError, match="do not fit"):
        build_encoder(EncoderSpec("msfem", weights=path, input_size=64, kwargs={**kwargs, "dim": 32}))


def test_unknown_and_hub_names_fail_clearly():
    assert "msfem" in list_encoders()
    with pytest.raises(MsamilError, match="unknown encoder"):
        build_encoder(EncoderSpec("resnet_does_not_exist"))
    with pytest.raises(MsamilError, match="download"):
        build_encoder(EncoderSpec("hf-hub:MahmoodLab/uni"))
    with pytest.raises(MsamilError, match="input size"):
        EncoderSpec("resnet18", input_size=8)
