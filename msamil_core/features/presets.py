"""Named patch encoders: pathology foundation models with their published preprocessing.

Each :class:`Preset` states what a user would otherwise have to look up on the model card: the
timm architecture and constructor options, the input size and resize rule, the mean/std, the
output rule (which tokens make the patch feature), the output width, the Hugging Face repo, the
file and key layout its weights are published in, and the licence and gating. The source of
these facts is named beside each preset; where the card is silent, ``notes`` says so.

Output rules (``output``):

* ``cls``: the class token of the last layer after the final norm (timm ``global_pool="token"``).
* ``cls+mean``: class token concatenated with the mean of the patch tokens, register tokens
  excluded (Virchow, Virchow2): width 2 x embed_dim.
* ``layer3_avgpool``: a ResNet cut after ``layer3`` and average pooled (CLAM's baseline).

Key layouts (``layout``): ``timm`` (the file loads into the timm model as is), ``hf_vit`` and
``hf_dinov2`` (Hugging Face ``transformers`` ViTModel / Dinov2Model keys, converted to timm by
:func:`convert_state_dict`, so ``transformers`` is not needed).

Resize: the pipeline reads each patch from the best pyramid level for its scale and resizes the
whole square patch to the preset's input size (box filter when shrinking, bilinear when
enlarging; no crop); ``card_resize`` records the card's own rule where it differs (e.g. a
centre crop of 224 out of 256), and the README says what that means for a user.

``conch_v15`` (MahmoodLab/conchv1_5) is not offered: its vision tower is a modified iBOT ViT with
an attentional pooler built by MahmoodLab's own code (TRIDENT ``model_zoo/conchv1_5``), not a
timm model, so it cannot be built here without that code.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# H-optimus-0/1 model cards: their own normalisation constants
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)


@dataclass(frozen=True)
class Preset:
    """One named encoder (see the module docstring for ``output`` and ``layout``).

    Attributes:
        name: the preset name (``encoders.<key>.name``, ``msamil extract --encoder``).
        architecture: timm model name the network is built from (``pretrained=False``).
        timm_kwargs: constructor options, as on the model card (callables for layer types).
        input_size: native input side, px.
        size_multiple: other input sizes must be a multiple of this (the ViT patch size; 0 =
            any size, 32 for a ResNet); ViTs resample their position embedding (timm
            ``dynamic_img_size``).
        mean, std: RGB normalisation of images in [0, 1].
        output: output rule; width: feature width it gives.
        repo_id: Hugging Face repo; files: weight files in the order they are looked for;
            config_file: the config published beside them (fetched too), or None.
        layout: key layout of the weights file.
        unused_keys: key prefixes the published file has and the encoder does not use
            (a classifier, a pooler, a mask token); everything else must match exactly.
        licence, gated: licence and whether the repo needs an accepted access request.
        card_resize: the resize/crop rule the card or reference code uses.
        params_m: published parameter count, millions (card or paper; tests compare the built network).
        source: where these facts come from.
        notes: what the card leaves open.
    """

    name: str
    architecture: str
    timm_kwargs: dict[str, Any]
    input_size: int
    size_multiple: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    output: str
    width: int
    repo_id: str
    files: tuple[str, ...]
    layout: str = "timm"
    config_file: str | None = None
    unused_keys: tuple[str, ...] = ()
    licence: str = ""
    gated: bool = False
    card_resize: str = ""
    params_m: float = 0.0
    source: str = ""
    notes: str = ""
    description: str = field(default="", compare=False)


def _swiglu() -> dict[str, Any]:
    """SwiGLU MLP options (Virchow, UNI2-h): timm's packed SwiGLU with SiLU."""
    import torch
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU}


def _layernorm(eps: float):
    import torch

    return partial(torch.nn.LayerNorm, eps=eps)


def _presets() -> dict[str, Preset]:
    vit = {"num_classes": 0, "dynamic_img_size": True}
    presets = [
        Preset(
            name="resnet50_trunc",
            description="ImageNet ResNet-50 (torchvision weights) cut after layer3, average pooled (CLAM)",
            architecture="resnet50",
            timm_kwargs={"num_classes": 0},
            input_size=224, size_multiple=32, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            output="layer3_avgpool", width=1024,
            repo_id="timm/resnet50.tv_in1k", files=("model.safetensors", "pytorch_model.bin"),
            config_file="config.json", unused_keys=("fc.",),
            licence="BSD-3-Clause (torchvision weights)", gated=False,
            card_resize="CLAM: patches fed at 224 px after resize; TRIDENT: resize 224 + centre crop 224, bilinear",
            params_m=23.5,  # 25.6 M published for ResNet-50, less its 2.05 M classifier
            source="timm model card timm/resnet50.tv_in1k; CLAM models/resnet_custom.py (ResNet-50 to layer3 + "
                   "adaptive average pool); TRIDENT patch_encoder_models/load.py (resnet50: out_indices [3] + pool)",
            notes="layer4 is built and loaded (the published file has it) but not run",
        ),
        Preset(
            name="uni_v1",
            description="UNI (Mahmood Lab), ViT-L/16 DINOv2, 100M patches",
            architecture="vit_large_patch16_224",
            timm_kwargs={**vit, "img_size": 224, "patch_size": 16, "init_values": 1e-5},
            input_size=224, size_multiple=16, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            output="cls", width=1024,
            repo_id="MahmoodLab/UNI", files=("pytorch_model.bin",), config_file="config.json",
            licence="CC-BY-NC-ND-4.0", gated=True,
            card_resize="resize 224, centre crop 224 (card: timm resolve_data_config)",
            params_m=303.0,
            source="huggingface.co/MahmoodLab/UNI model card (timm.create_model('vit_large_patch16_224', "
                   "init_values=1e-5, dynamic_img_size=True)); TRIDENT load.py UNIInferenceEncoder",
        ),
        Preset(
            name="uni_v2",
            description="UNI2-h (Mahmood Lab), ViT-H/14 with 8 registers, SwiGLU",
            architecture="vit_giant_patch14_224",
            timm_kwargs={**vit, "img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
                         "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
                         "no_embed_class": True, "reg_tokens": 8, "swiglu": True},
            input_size=224, size_multiple=14, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            output="cls", width=1536,
            repo_id="MahmoodLab/UNI2-h", files=("pytorch_model.bin",), config_file="config.json",
            licence="CC-BY-NC-ND-4.0", gated=True,
            card_resize="resize 224, centre crop 224",
            params_m=681.0,
            source="huggingface.co/MahmoodLab/UNI2-h model card (timm_kwargs listed there); TRIDENT load.py "
                   "UNIv2InferenceEncoder",
        ),
        Preset(
            name="virchow",
            description="Virchow (Paige), ViT-H/14 SwiGLU; class token + mean of patch tokens",
            architecture="vit_huge_patch14_224",
            timm_kwargs={**vit, "img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "",
                         "swiglu": True},
            input_size=224, size_multiple=14, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            output="cls+mean", width=2560,
            repo_id="paige-ai/Virchow", files=("model.safetensors", "pytorch_model.bin"), config_file="config.json",
            licence="Apache-2.0 with additional terms (gated: institutional e-mail, research use)", gated=True,
            card_resize="resize 224 bicubic, centre crop 224 (card: timm resolve_data_config)",
            params_m=632.0,
            source="huggingface.co/paige-ai/Virchow model card (mlp_layer=SwiGLUPacked, act_layer=SiLU; embedding = "
                   "cat(class token, mean of output[:, 1:])); TRIDENT load.py VirchowInferenceEncoder",
            notes="the card lists both weight formats on the repo page; safetensors is taken when present",
        ),
        Preset(
            name="virchow2",
            description="Virchow2 (Paige), ViT-H/14 SwiGLU, 4 registers; class token + mean of patch tokens",
            architecture="vit_huge_patch14_224",
            timm_kwargs={**vit, "img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4,
                         "global_pool": "", "swiglu": True},
            input_size=224, size_multiple=14, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            output="cls+mean", width=2560,
            repo_id="paige-ai/Virchow2", files=("model.safetensors", "pytorch_model.bin"), config_file="config.json",
            licence="CC-BY-NC-ND-4.0", gated=True,
            card_resize="resize 224 bicubic, centre crop 224 (card: timm resolve_data_config)",
            params_m=632.0,
            source="huggingface.co/paige-ai/Virchow2 model card (reg_tokens=4; embedding = cat(class token, mean of "
                   "output[:, 5:]), registers 1-4 excluded); Virchow2 paper arXiv 2408.00738; TRIDENT load.py",
        ),
        Preset(
            name="h_optimus_0",
            description="H-optimus-0 (Bioptimus), ViT-g/14 with 4 registers",
            architecture="vit_giant_patch14_reg4_dinov2",
            timm_kwargs={**vit, "img_size": 224, "init_values": 1e-5, "global_pool": "token"},
            input_size=224, size_multiple=14, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
            output="cls", width=1536,
            repo_id="bioptimus/H-optimus-0", files=("pytorch_model.bin",), config_file="config.json",
            licence="Apache-2.0", gated=True,
            card_resize="no resize on the card: 224 px tiles at 0.5 um/px, ToTensor + its own mean/std",
            params_m=1100.0,
            source="huggingface.co/bioptimus/H-optimus-0 model card and file list (config.json, pytorch_model.bin "
                   "4.54 GB; timm.create_model('hf-hub:bioptimus/H-optimus-0', init_values=1e-5, "
                   "dynamic_img_size=False), mean/std above); TRIDENT load.py HOptimus0InferenceEncoder",
            notes="the card builds with dynamic_img_size=False (224 only); other sizes here resample the "
                  "position embedding, which the card does not cover",
        ),
        Preset(
            name="gigapath",
            description="Prov-GigaPath tile encoder (Providence/Microsoft), ViT-g/16 DINOv2",
            architecture="vit_giant_patch14_dinov2",
            timm_kwargs={**vit, "img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
                         "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334},
            input_size=224, size_multiple=16, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            output="cls", width=1536,
            repo_id="prov-gigapath/prov-gigapath", files=("pytorch_model.bin",), config_file="config.json",
            licence="Apache-2.0 (gated: research use terms)", gated=True,
            card_resize="resize 256 bicubic, centre crop 224",
            params_m=1130.0,
            source="huggingface.co/prov-gigapath/prov-gigapath model card (timm.create_model('hf_hub:prov-gigapath/"
                   "prov-gigapath'), transform Resize(256, bicubic) + CenterCrop(224)); prov-gigapath "
                   "gigapath/pipeline.py; TRIDENT load.py GigaPathInferenceEncoder",
            notes="this pipeline resizes the whole patch to 224 instead of cropping the centre 224/256",
        ),
        Preset(
            name="phikon",
            description="Phikon (Owkin), ViT-B/16 iBOT, published in the transformers ViTModel layout",
            architecture="vit_base_patch16_224",
            timm_kwargs={**vit, "img_size": 224, "layernorm_eps": 1e-12},
            input_size=224, size_multiple=16, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            output="cls", width=768,
            repo_id="owkin/phikon", files=("model.safetensors", "pytorch_model.bin"), config_file="config.json",
            layout="hf_vit", unused_keys=("pooler.",),
            licence="Owkin non-commercial licence (card: 'other')", gated=False,
            card_resize="card: AutoImageProcessor (resize 224); TRIDENT: resize 224 bilinear",
            params_m=86.0,
            source="huggingface.co/owkin/phikon model card (ViTModel, last_hidden_state[:, 0, :]); transformers "
                   "models/vit/modeling_vit.py (key names, layer_norm_eps 1e-12); TRIDENT load.py "
                   "PhikonInferenceEncoder (add_pooling_layer=False)",
            notes="converted to timm keys here (q/k/v fused into qkv); the ViTModel pooler, if present in the "
                  "file, is not used by the class-token output",
        ),
        Preset(
            name="phikon_v2",
            description="Phikon-v2 (Owkin), ViT-L/16 DINOv2, published in the transformers Dinov2Model layout",
            architecture="vit_large_patch16_224",
            timm_kwargs={**vit, "img_size": 224, "init_values": 1e-5},
            input_size=224, size_multiple=16, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            output="cls", width=1024,
            repo_id="owkin/phikon-v2", files=("model.safetensors",), config_file="config.json",
            layout="hf_dinov2", unused_keys=("embeddings.mask_token",),
            licence="Owkin non-commercial licence (card: 'other', LICENSE.pdf)", gated=False,
            card_resize="resize 224, centre crop 224",
            params_m=300.0,
            source="huggingface.co/owkin/phikon-v2 model card and file list (config.json, model.safetensors "
                   "1.21 GB; ViT-L/16 via DINOv2; last_hidden_state[:, 0, :]); transformers "
                   "models/dinov2/modeling_dinov2.py (key names); TRIDENT load.py Phikonv2InferenceEncoder",
            notes="converted to timm keys here; the card does not state the layer-scale init (1e-5 is the "
                  "DINOv2 default, and only the shape matters for loading)",
        ),
    ]
    h_optimus_0 = next(p for p in presets if p.name == "h_optimus_0")
    presets.insert(presets.index(h_optimus_0) + 1, replace(
        h_optimus_0,
        name="h_optimus_1",
        description="H-optimus-1 (Bioptimus), ViT-g/14 with 4 registers",
        repo_id="bioptimus/H-optimus-1",
        licence="proprietary, non-commercial (card: access on request)",
        source="huggingface.co/bioptimus/H-optimus-1 model card (same architecture, mean/std and usage as "
               "H-optimus-0; access requests reviewed by Bioptimus); TRIDENT load.py HOptimus1InferenceEncoder",
        notes="the exact licence name was not readable offline; treat as non-commercial and check the card",
    ))
    return {p.name: p for p in presets}


PRESETS: dict[str, Preset] = _presets()


def get_preset(name: str) -> Preset | None:
    """The preset called ``name``, or None."""
    return PRESETS.get(name)


def timm_options(preset: Preset) -> dict[str, Any]:
    """The constructor options of ``preset`` for ``timm.create_model`` (layer types resolved)."""
    kwargs = dict(preset.timm_kwargs)
    if kwargs.pop("swiglu", False):
        kwargs.update(_swiglu())
    eps = kwargs.pop("layernorm_eps", None)
    if eps is not None:
        kwargs["norm_layer"] = _layernorm(eps)
    return kwargs


# -- key layouts --------------------------------------------------------------------------------
def _fuse_qkv(state: dict, prefix: str, kind: str) -> Any:
    """Hugging Face's separate query/key/value projections -> timm's fused qkv (rows q, k, v)."""
    import torch

    return torch.cat([state.pop(f"{prefix}.{n}.{kind}") for n in ("query", "key", "value")], dim=0)


def convert_state_dict(state: dict, layout: str, unused: tuple[str, ...] = ()) -> dict:
    """A state dict in ``layout`` (``timm``, ``hf_vit``, ``hf_dinov2``) -> timm ViT keys.

    Keys under ``unused`` prefixes are dropped. Keys the conversion does not know are kept as
    they are, so the strict load that follows names them.
    """
    state = {k: v for k, v in state.items() if not k.startswith(unused)} if unused else dict(state)
    if layout == "timm":
        return state
    if layout not in ("hf_vit", "hf_dinov2"):
        raise ValueError(f"unknown key layout {layout!r}")
    out = {}
    top = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    for key in list(state):
        if key in top:
            out[top[key]] = state.pop(key)
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")})
    if layout == "hf_vit":
        names = {"layernorm_before": "norm1", "attention.output.dense": "attn.proj", "layernorm_after": "norm2",
                 "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
    else:
        names = {"norm1": "norm1", "attention.output.dense": "attn.proj", "norm2": "norm2", "mlp.fc1": "mlp.fc1",
                 "mlp.fc2": "mlp.fc2", "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}
    for i in layers:
        src, dst = f"encoder.layer.{i}", f"blocks.{i}"
        for kind in ("weight", "bias"):
            if f"{src}.attention.attention.query.{kind}" in state:
                out[f"{dst}.attn.qkv.{kind}"] = _fuse_qkv(state, f"{src}.attention.attention", kind)
        for old, new in names.items():
            if old.endswith("lambda1"):  # a bare parameter, not a module
                if f"{src}.{old}" in state:
                    out[f"{dst}.{new}"] = state.pop(f"{src}.{old}")
                continue
            for kind in ("weight", "bias"):
                if f"{src}.{old}.{kind}" in state:
                    out[f"{dst}.{new}.{kind}"] = state.pop(f"{src}.{old}.{kind}")
    out.update(state)  # whatever is left is reported by the strict load
    return out
