"""Encoder presets, offline: each model's weights written in its published layout into a local
Hugging Face cache laid out as huggingface_hub writes it (models--org--name/blobs, snapshots/<rev>,
refs/main), then loaded with HF_HUB_OFFLINE=1 through hf_hub_download (the code path a download
takes): strict key match, output width, output rule recomputed from the backbone's tokens, and the
normalisation constants of the card.

Size: every preset is also built at full size on the meta device (no memory, no weights) to check
its parameter count against the published one and its output width. Loading real tensors uses full
depth for resnet50_trunc and phikon, and depth 2 (1 for the ViT-g models) for the others; the test
ids say ``reduced``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from msamil_core.errors import MsamilError
from msamil_core.features.encoders import (EncoderSpec, PresetEncoder, build_encoder, build_preset_backbone,
                                           encoder_id, load_preset_weights, weights_file)
from msamil_core.features.presets import PRESETS

from conftest import HUB_REVISION as REVISION, write_hub_cache

FULL_SIZE = {"resnet50_trunc", "phikon"}  # small enough to load at full size here
REDUCED_DEPTH = {"h_optimus_0": 1, "h_optimus_1": 1, "gigapath": 1}  # ViT-g: one block; other ViTs two


# -- published layouts, written from the model families' own key names (not from our converter)
def hf_vit_state(depth: int, dim: int, mlp: int, grid: int, patch: int, dinov2: bool, gen) -> dict:
    """Random weights with the keys of transformers' ViTModel (phikon) or Dinov2Model (phikon-v2)."""
    def r(*shape):
        return torch.randn(*shape, generator=gen) * 0.05

    s = {
        "embeddings.cls_token": r(1, 1, dim),
        "embeddings.position_embeddings": r(1, 1 + grid * grid, dim),
        "embeddings.patch_embeddings.projection.weight": r(dim, 3, patch, patch),
        "embeddings.patch_embeddings.projection.bias": r(dim),
        "layernorm.weight": 1 + r(dim),
        "layernorm.bias": r(dim),
    }
    if dinov2:
        s["embeddings.mask_token"] = r(1, dim)
    else:
        s["pooler.dense.weight"], s["pooler.dense.bias"] = r(dim, dim), r(dim)
    for i in range(depth):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            s[p + f"attention.attention.{n}.weight"], s[p + f"attention.attention.{n}.bias"] = r(dim, dim), r(dim)
        s[p + "attention.output.dense.weight"], s[p + "attention.output.dense.bias"] = r(dim, dim), r(dim)
        norms = ("norm1", "norm2") if dinov2 else ("layernorm_before", "layernorm_after")
        for n in norms:
            s[p + f"{n}.weight"], s[p + f"{n}.bias"] = 1 + r(dim), r(dim)
        if dinov2:
            s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"] = r(mlp, dim), r(mlp)
            s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"] = r(dim, mlp), r(dim)
            s[p + "layer_scale1.lambda1"], s[p + "layer_scale2.lambda1"] = 1 + r(dim), 1 + r(dim)
        else:
            s[p + "intermediate.dense.weight"], s[p + "intermediate.dense.bias"] = r(mlp, dim), r(mlp)
            s[p + "output.dense.weight"], s[p + "output.dense.bias"] = r(dim, mlp), r(dim)
    return s


def hf_vit_reference(s: dict, x: torch.Tensor, heads: int, eps: float, dinov2: bool) -> torch.Tensor:
    """The class token of the last layer computed from the Hugging Face keys by hand (pre-norm ViT)."""
    import torch.nn.functional as F

    w = s["embeddings.patch_embeddings.projection.weight"]
    t = F.conv2d(x, w, s["embeddings.patch_embeddings.projection.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    t = torch.cat([s["embeddings.cls_token"].expand(len(x), -1, -1), t], 1) + s["embeddings.position_embeddings"]
    dim = t.shape[-1]
    depth = len({k.split(".")[2] for k in s if k.startswith("encoder.layer.")})
    n1, n2 = ("norm1", "norm2") if dinov2 else ("layernorm_before", "layernorm_after")
    for i in range(depth):
        p = f"encoder.layer.{i}."

        def lin(name, v):
            return F.linear(v, s[p + name + ".weight"], s[p + name + ".bias"])

        h = F.layer_norm(t, (dim,), s[p + n1 + ".weight"], s[p + n1 + ".bias"], eps)
        q, k, v = (lin(f"attention.attention.{n}", h).unflatten(-1, (heads, -1)).transpose(1, 2)
                   for n in ("query", "key", "value"))
        a = (q @ k.transpose(-1, -2) / (dim // heads) ** 0.5).softmax(-1) @ v
        a = lin("attention.output.dense", a.transpose(1, 2).flatten(2))
        t = t + (a * s[p + "layer_scale1.lambda1"] if dinov2 else a)
        h = F.layer_norm(t, (dim,), s[p + n2 + ".weight"], s[p + n2 + ".bias"], eps)
        if dinov2:
            m = lin("mlp.fc2", F.gelu(lin("mlp.fc1", h))) * s[p + "layer_scale2.lambda1"]
        else:
            m = lin("output.dense", F.gelu(lin("intermediate.dense", h)))
        t = t + m
    t = F.layer_norm(t, (dim,), s["layernorm.weight"], s["layernorm.bias"], eps)
    return t[:, 0]


def published_state(name: str, gen) -> tuple[dict, int | None]:
    """(random weights in the preset's published layout, depth built or None for full)."""
    preset = PRESETS[name]
    if name == "phikon":
        return hf_vit_state(12, 768, 3072, 14, 16, False, gen), None
    if name == "phikon_v2":
        return hf_vit_state(2, 1024, 4096, 14, 16, True, gen), 2
    depth = None if name in FULL_SIZE else REDUCED_DEPTH.get(name, 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        backbone = build_preset_backbone(preset, **({"depth": depth} if depth else {}))
    state = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
             for k, v in backbone.state_dict().items()}
    if name == "resnet50_trunc":  # timm/resnet50.tv_in1k publishes the ImageNet classifier too
        state["fc.weight"], state["fc.bias"] = torch.randn(1000, 2048, generator=gen), torch.randn(1000, generator=gen)
    return state, depth


def serialise(state: dict, filename: str) -> bytes:
    import io

    if filename.endswith(".safetensors"):
        from safetensors.torch import save

        return save({k: v.contiguous() for k, v in state.items()})
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def put_preset(cache: Path, name: str, gen) -> tuple[dict, int | None]:
    """Write a preset's random weights + config.json into the cache under its repo id."""
    preset = PRESETS[name]
    state, depth = published_state(name, gen)
    files = {preset.files[0]: serialise(state, preset.files[0])}
    if preset.config_file:
        files[preset.config_file] = json.dumps({"architecture": preset.architecture}).encode()
    write_hub_cache(cache, preset.repo_id, files)
    return state, depth


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_full_size_on_meta_device(name):
    preset = PRESETS[name]
    with torch.device("meta"):
        backbone = build_preset_backbone(preset)
        out = PresetEncoder(backbone, preset)(torch.zeros(2, 3, preset.input_size, preset.input_size))
    params = sum(p.numel() for p in backbone.parameters()) / 1e6
    assert abs(params - preset.params_m) / preset.params_m < 0.04, (params, preset.params_m)
    assert tuple(out.shape) == (2, preset.width)


@pytest.mark.parametrize("name", [pytest.param(n, id=n if n in FULL_SIZE else f"{n}-reduced") for n in PRESETS])
def test_preset_loads_published_layout_offline(name, hub_cache):
    preset = PRESETS[name]
    gen = torch.Generator().manual_seed(0)
    state, depth = put_preset(hub_cache, name, gen)
    spec = EncoderSpec(name, weights=f"hf-hub:{preset.repo_id}")
    file = weights_file(spec)  # hf_hub_download(local_files_only) from the cache
    assert file.name == preset.files[0] and f"snapshots/{REVISION}" in str(file)
    if depth is None:
        encoder, width = build_encoder(spec)
        model = encoder.model
    else:
        model = PresetEncoder(build_preset_backbone(preset, depth=depth), preset)
        load_preset_weights(model, preset, file)  # raises on any missing, unexpected or reshaped key
        from msamil_core.features.encoders import PatchEncoder

        encoder, width = PatchEncoder(model, model.out_dim, spec).eval(), model.out_dim
    assert width == preset.width
    loaded = model.backbone.state_dict()
    if preset.layout == "timm":  # every published tensor but the unused classifier, bit for bit
        used = {k: v for k, v in state.items() if not k.startswith(preset.unused_keys or ("\0",))}
        assert set(used) == set(loaded) and all(torch.equal(used[k], loaded[k]) for k in used)

    # normalisation constants as on the card
    assert torch.allclose(encoder.mean.flatten(), torch.tensor(preset.mean))
    assert torch.allclose(encoder.std.flatten(), torch.tensor(preset.std))
    if name.startswith("h_optimus"):
        assert preset.mean == (0.707223, 0.578729, 0.703617) and preset.std == (0.211883, 0.230117, 0.177517)

    # output rule recomputed from the backbone's own outputs
    x = torch.rand(2, 3, preset.input_size, preset.input_size, generator=gen)
    with torch.inference_mode():
        out = encoder(x)
        z = (x - torch.tensor(preset.mean).view(1, 3, 1, 1)) / torch.tensor(preset.std).view(1, 3, 1, 1)
        b = model.backbone
        if preset.output == "layer3_avgpool":
            fmap = b.forward_intermediates(z, indices=[3], intermediates_only=True)[0]  # layer3: [B, 1024, 14, 14]
            assert fmap.shape[1:] == (1024, 14, 14)
            expected = fmap.mean((2, 3))
        else:
            tokens = b.forward_features(z)
            prefix = 1 + int(b.reg_token.shape[1] if getattr(b, "reg_token", None) is not None else 0)
            assert tokens.shape[1] == prefix + (preset.input_size // b.patch_embed.patch_size[0]) ** 2
            if preset.output == "cls+mean":
                expected = torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], -1)
            else:
                expected = tokens[:, 0]
        if preset.layout != "timm":  # Hugging Face layout: against a forward pass written from its keys
            heads = 12 if name == "phikon" else 16
            eps = 1e-12 if name == "phikon" else 1e-6
            expected_hf = hf_vit_reference(state, z, heads, eps, preset.layout == "hf_dinov2")
            assert torch.allclose(out, expected_hf, atol=2e-4, rtol=1e-4)
    assert out.shape == (2, preset.width)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_bag_id_hashes_the_cached_weight_bytes(hub_cache):
    gen = torch.Generator().manual_seed(0)
    put_preset(hub_cache, "resnet50_trunc", gen)
    spec = EncoderSpec("resnet50_trunc", weights="hf-hub:timm/resnet50.tv_in1k")
    first = encoder_id(spec)
    assert first.startswith("resnet50_trunc-")
    folder = weights_file(spec).parent
    assert encoder_id(EncoderSpec("resnet50_trunc", weights=str(folder))) == first  # same bytes, a folder
    put_preset(hub_cache, "resnet50_trunc", torch.Generator().manual_seed(1))  # new weights, same name
    assert encoder_id(spec) != first
    assert encoder_id(EncoderSpec("resnet50_trunc", weights="hf-hub:timm/resnet50.tv_in1k", input_size=256)) != \
        encoder_id(spec)


def test_missing_from_cache_offline_says_fetch(hub_cache):
    with pytest.raises(MsamilError, match=r"not in .*HF_HUB_OFFLINE.*msamil fetch-weights"):
        build_encoder(EncoderSpec("uni_v1", weights="hf-hub:MahmoodLab/UNI"))


@pytest.mark.parametrize("kwargs, match", [
    ({"checkpoint_path": "uni.bin"}, "checkpoint_path.*not allowed"),
    ({"pretrained": True}, "pretrained.*not allowed"),
    ({"pretrained_cfg_overlay": {"file": "x"}}, "pretrained_cfg_overlay.*not allowed"),
    ({"global_pool": "https://example.org/w.bin"}, "names a file or URL"),
    ({"img_size": "hf-hub:org/repo"}, "names a file or URL"),
    ({"features_only": True}, "not allowed; allowed"),
])
def test_encoder_options_allowlist(kwargs, match):
    with pytest.raises(MsamilError, match=match):
        EncoderSpec("vit_small_patch16_224", kwargs=kwargs)
    with pytest.raises(MsamilError, match="not allowed|names a file"):
        EncoderSpec("uni_v1", kwargs={"depth": 2, **kwargs} if "features_only" in kwargs else kwargs)


def test_e2e_checkpoint_encoder_spec_passes_the_allowlist(tmp_path):
    from msamil_core.training.e2e import encoder_spec_from_checkpoint

    path = tmp_path / "checkpoint.pt"
    spec = {"name": "resnet18", "input_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "seed": 0,
            "kwargs": {"checkpoint_path": "/tmp/evil.pth"}}
    torch.save({"encoder_spec": spec, "encoder_state_dict": {}}, path)
    with pytest.raises(MsamilError, match="checkpoint_path.*not allowed"):
        encoder_spec_from_checkpoint(path)


def test_preset_input_size_must_fit_the_patch_grid():
    assert EncoderSpec("uni_v1", input_size=256).input_size == 256
    with pytest.raises(MsamilError, match="multiple of 14"):
        EncoderSpec("virchow2", input_size=230)


# -- end to end: msamil extract on a real slide, weights from the offline cache
@pytest.fixture
def few_coords(tmp_path, cmu_slide):
    from msamil_core.wsi.coords import make_grids, write_coords
    from msamil_core.wsi.slide import open_slide

    with open_slide(cmu_slide) as slide:
        mask = np.zeros((60, 44), bool)
        mask[10:16, 10:16] = True
        grids = make_grids(mask, slide.dimensions, slide.mpp, patch_size=256, name=slide.slide_id)
    paths = []
    for scale, grid in grids.items():
        paths.append(tmp_path / "coords" / scale / "cmu.h5")
        write_coords(paths[-1], grid.coords, grid.attrs)
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("name, size", [("resnet50_trunc", 64), ("phikon", 64)])  # small inputs the presets allow
def test_msamil_extract_with_a_preset_from_the_offline_cache(tmp_path, hub_cache, cmu_slide, few_coords, name, size):
    from msamil_core.features.bags import load_bag
    from msamil_core.wsi.slide import open_slide

    preset = PRESETS[name]
    put_preset(hub_cache, name, torch.Generator().manual_seed(0))
    out = tmp_path / "bag.pt"
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-c", "import sys; from msamil_core.cli import main; sys.exit(main())", "extract", "--slide", str(cmu_slide), "--coords",
           *map(str, few_coords), "--out", str(out), "--encoder", name, "--weights", f"hf-hub:{preset.repo_id}",
           "--input-size", str(size), "--workers", "0", "--batch-size", "8", "--threads", "2", "--no-progress"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    bag = load_bag(out)
    assert bag.features.shape[1] == preset.width and len(bag.features) > 0
    spec = EncoderSpec(name, weights=f"hf-hub:{preset.repo_id}", input_size=size)
    assert bag.encoder == encoder_id(spec)
    encoder, _ = build_encoder(spec)
    with open_slide(cmu_slide) as slide, torch.inference_mode():
        x, y = bag.coords[0].tolist()
        patch = slide.read_patch(x, y, int(bag.patch_size_level0[0]), size)
        feature = encoder(torch.from_numpy(patch.copy()).permute(2, 0, 1)[None])[0]
    assert torch.allclose(bag.features[0], feature, atol=1e-3, rtol=1e-3)
