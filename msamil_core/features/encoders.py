"""Patch encoders: images [B, 3, S, S] -> features [B, D], built offline from a small registry.

Three kinds of encoder:

* named presets (:mod:`.presets`): pathology foundation models (``uni_v1``, ``virchow2``,
  ``h_optimus_0``, ``phikon``, ``resnet50_trunc``, ...) built with their published architecture,
  input size, normalisation and output rule; their weights come from a local file or folder or
  from ``hf-hub:<org>/<repo>`` (read from the Hugging Face cache that ``msamil fetch-weights``
  fills; nothing is downloaded here).
* ``msfem``, the multi-scale feature extraction module of MsaMIL-Net (sec. 3.2): an
  EfficientNet-B3 feature map (16 x 16 x 1536 for a 512-px patch) read as 256 tokens, projected
  to 512, prefixed with a class token, given a learned position embedding and passed through a
  Transformer encoder; the class token of the last layer is the 512-d patch feature.
* any timm backbone by name (``resnet50``, ``efficientnet_b3``, ``vit_base_patch16_224``, ...)
  with global pooling and no classifier; ViTs get ``img_size`` when the input size differs from
  their default.

Nothing here touches the network: timm models are always created with ``pretrained=False``,
and constructor options pass an allowlist (no ``checkpoint_path``, ``pretrained``, file or URL
values), so timm never loads a file or reaches the network by itself. Weights files are read
without unpickling (safetensors, or ``torch.load(weights_only=True)``). Without weights the
encoder is randomly initialised from a fixed seed and a warning says so. :func:`encoder_id`
names the result (``name-<hash>``, the hash covering the weight bytes) so that feature bags of
different weights never mix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import MsamilError
from ..hub import HUB_PREFIXES, WEIGHT_FILES, hub_file, is_hub_ref, local_weights
from .presets import IMAGENET_MEAN, IMAGENET_STD, Preset, convert_state_dict, get_preset, timm_options
from .weights import file_sha256, load_weights, read_state_dict

log = logging.getLogger(__name__)

# Keys whose value names a local weights file: encoder_id hashes the file's bytes, not its path,
# so that moving a file keeps the id and replacing it changes the id.
_WEIGHTS_KWARGS = ("backbone_weights",)
# Constructor options a config or command line may set (issue: timm must never load files or
# reach the network by itself). msfem's, then architecture options of timm models.
_MSFEM_OPTIONS = {"backbone", "dim", "depth", "heads", "mlp_ratio", "grid_size", "dropout", "backbone_weights"}
_TIMM_OPTIONS = {
    "drop_rate", "drop_path_rate", "proj_drop_rate", "attn_drop_rate", "pos_drop_rate", "global_pool",
    "init_values", "dynamic_img_size", "dynamic_img_pad", "img_size", "patch_size", "embed_dim", "depth",
    "num_heads", "mlp_ratio", "reg_tokens", "no_embed_class", "class_token", "qkv_bias", "qk_norm", "fc_norm",
    "pre_norm", "output_stride", "in_chans",
}
# Presets fix their architecture (the weights depend on it); only regularisation may change.
_PRESET_OPTIONS = {"drop_rate", "drop_path_rate"}
_REFUSED_HINT = {
    "checkpoint_path": "name the weights file in `weights` (--weights) instead",
    "pretrained": "weights come only from `weights` (--weights): a local file or hf-hub:<org>/<repo>",
    "pretrained_cfg": "presets and timm names carry their configuration",
    "pretrained_cfg_overlay": "presets and timm names carry their configuration",
    "pretrained_strict": "weights are always loaded strictly",
    "cache_dir": "hub weights are fetched by `msamil fetch-weights`",
}


@dataclass
class EncoderSpec:
    """What to build: a preset, registry or timm name, its weights, input size, normalisation, options.

    Attributes:
        name: a preset (see :data:`.presets.PRESETS`, e.g. ``uni_v1``), a registered encoder
            (``msfem``) or a timm model name (``resnet50``, ``vit_base_patch16_224``).
        weights: local state-dict file (``.safetensors``, ``.bin``, ``.pth``, ``.pt``), a folder
            holding the model's published files, or ``hf-hub:<org>/<repo>`` (read from the
            Hugging Face cache); ``None`` means random initialisation from ``seed``.
        input_size: side of the square patch fed to the network, in pixels (512 in the paper);
            ``None``: the preset's (224 for other names).
        mean, std: per-channel RGB normalisation of images scaled to [0, 1]; ``None``: the
            preset's (ImageNet's for other names).
        kwargs: extra constructor options from an allowlist (timm architecture options, or
            ``msfem`` options such as ``depth``); file, URL and download options are refused.
        seed: seed of the random initialisation (used when ``weights`` is ``None``, and for
            any part a weights file does not cover, e.g. the msfem Transformer with
            ``backbone_weights``).
    """

    name: str
    weights: str | os.PathLike | None = None
    input_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    @classmethod
    def from_settings(cls, settings) -> "EncoderSpec":
        """The spec of an encoder's settings (an `encoders` entry: :class:`~msamil_core.settings.EncoderSettings`)."""
        return cls(name=settings.name, weights=settings.weights, input_size=settings.input_size,
                   mean=tuple(settings.mean) if settings.mean else None, std=tuple(settings.std) if settings.std else None,
                   kwargs=dict(settings.options), seed=settings.seed)

    def __post_init__(self) -> None:
        preset = get_preset(self.name)
        if self.input_size is None:
            self.input_size = preset.input_size if preset else 224
        self.mean = tuple(self.mean) if self.mean is not None else (preset.mean if preset else IMAGENET_MEAN)
        self.std = tuple(self.std) if self.std is not None else (preset.std if preset else IMAGENET_STD)
        if int(self.input_size) < 16:
            raise MsamilError(f"encoder {self.name}: input size {self.input_size} px is too small; use 16 px or more")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise MsamilError(
                f"encoder {self.name}: mean and std need three values each (R, G, B) and std > 0, "
                f"got mean={tuple(self.mean)}, std={tuple(self.std)}"
            )
        self.input_size = int(self.input_size)
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if preset and preset.size_multiple and self.input_size % preset.size_multiple:
            m = preset.size_multiple
            raise MsamilError(
                f"encoder {self.name}: input size {self.input_size} px is not a multiple of {m} (its patch size); "
                f"use {m * max(1, self.input_size // m)} or {m * (self.input_size // m + 1)} (native {preset.input_size})"
            )
        check_encoder_options(self.name, self.kwargs)


def check_encoder_options(name: str, kwargs: dict[str, Any]) -> None:
    """Refuse, in one line, constructor options outside the allowlist and file or URL values.

    timm would otherwise load ``checkpoint_path`` files, download ``pretrained`` weights or read
    ``pretrained_cfg`` overlays by itself, bypassing the weights handling, hashing and offline rule.
    """
    if name in _REGISTRY:
        allowed = _MSFEM_OPTIONS if name == "msfem" else None
    elif get_preset(name):
        allowed = _PRESET_OPTIONS
    else:
        allowed = _TIMM_OPTIONS
    for key, value in kwargs.items():
        if key in _REFUSED_HINT or key.startswith("pretrained_cfg"):
            hint = _REFUSED_HINT.get(key, _REFUSED_HINT["pretrained_cfg"])
            raise MsamilError(f"encoder {name}: option {key!r} is not allowed (timm would load files or reach the "
                              f"network by itself); {hint}")
        if allowed is not None and key not in allowed:
            raise MsamilError(f"encoder {name}: option {key!r} is not allowed; allowed: {', '.join(sorted(allowed))}")
        if key not in _WEIGHTS_KWARGS and _names_file(value):
            raise MsamilError(f"encoder {name}: option {key}={value!r} names a file or URL, which encoder options may "
                              "not; weights go in `weights` (--weights)")


def _names_file(value: Any) -> bool:
    """Whether an option value looks like a path, URL or hub reference."""
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, str) and ("://" in v or is_hub_ref(v) or "/" in v or "\\" in v
                                   or v.lower().endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz"))):
            return True
    return False


class PatchEncoder(nn.Module):
    """Normalises RGB patches and embeds them: [B, 3, S, S] -> [B, out_dim].

    Input is uint8 (0..255) or float (0..1), S = ``input_size``. Normalisation runs on the
    model's device, so data loaders ship compact uint8 batches.
    """

    def __init__(self, model: nn.Module, out_dim: int, spec: EncoderSpec):
        super().__init__()
        self.model = model
        self.out_dim = int(out_dim)
        self.input_size = spec.input_size
        # Not persistent: the state dict stays the bare network's, loadable into timm directly.
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return self.model((x - self.mean) / self.std)


# -- registry -----------------------------------------------------------------------------------
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_encoder(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn(input_size=..., **kwargs) -> nn.Module`` under its function name.

    The module returns [B, D] features and has an ``out_dim`` attribute.
    """
    _REGISTRY[fn.__name__] = fn
    return fn


def list_encoders() -> list[str]:
    """Preset and registered encoder names; any timm model name is accepted besides these."""
    from .presets import PRESETS

    return sorted(PRESETS) + sorted(_REGISTRY)


class MSFEM(nn.Module):
    """MsaMIL-Net's patch feature extractor: CNN feature map -> tokens -> Transformer -> class token.

    For a 512-px patch EfficientNet-B3 gives a 16 x 16 x 1536 map, i.e. 256 tokens, each projected
    to ``dim``. The learned position embedding is defined on a ``grid_size`` x ``grid_size`` grid
    and resampled (bicubic) when the input gives another grid, so 96- or 224-px inputs work.

    Args:
        backbone: timm CNN whose ``forward_features`` is a [B, C, h, w] map.
        dim: token and output width (512 in the paper).
        depth, heads, mlp_ratio: Transformer encoder size (the paper does not state them).
        grid_size: token grid the position embedding is stored for (16 = 512 px / stride 32).
        dropout: dropout of attention and MLP outputs (only while training).
    """

    def __init__(
        self,
        backbone: str = "efficientnet_b3",
        dim: int = 512,
        depth: int = 2,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        grid_size: int = 16,
        dropout: float = 0.0,
    ):
        super().__init__()
        import timm
        from timm.models.vision_transformer import Block

        if dim % heads:
            raise MsamilError(f"encoder msfem: dim {dim} is not divisible by heads {heads}; pick heads dividing dim")
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0, global_pool="")
        self.grid_size = int(grid_size)
        self.out_dim = int(dim)
        self.proj = nn.Linear(self.backbone.num_features, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size**2, dim))
        self.blocks = nn.Sequential(
            *[
                Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=dropout, attn_drop=dropout)
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(dim)
        # ViT initialisation (timm): small position embedding, near-zero class token.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """[1, 1 + h*w, dim] position embedding for an h x w token grid."""
        if grid == (self.grid_size, self.grid_size):
            return self.pos_embed
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(
            self.pos_embed, new_size=list(grid), old_size=[self.grid_size] * 2, num_prefix_tokens=1
        )

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] (normalised) -> all output tokens [B, 1 + h*w, dim], class token first."""
        fmap = self.backbone.forward_features(x)  # [B, C, h, w]; C = 1536, h = w = S/32 for B3
        grid = (fmap.shape[-2], fmap.shape[-1])
        tokens = self.proj(fmap.flatten(2).transpose(1, 2))  # [B, h*w, dim]
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(grid)
        return self.norm(self.blocks(tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] (normalised) -> patch features [B, dim] (the class token)."""
        return self.forward_tokens(x)[:, 0]


@register_encoder
def msfem(input_size: int = 512, backbone_weights: str | os.PathLike | None = None, **kwargs) -> MSFEM:
    """The paper's extractor; ``backbone_weights`` loads a timm state dict into the CNN only
    (e.g. ImageNet EfficientNet-B3 weights while the Transformer starts from random)."""
    model = MSFEM(**kwargs)
    if backbone_weights is not None:
        load_weights(model.backbone, backbone_weights, f"msfem backbone {kwargs.get('backbone', 'efficientnet_b3')}")
    return model


def _timm_encoder(name: str, input_size: int, **kwargs) -> nn.Module:
    """A timm backbone with global pooling and no classifier, created offline."""
    import timm
    from timm.models import get_pretrained_cfg

    if name.startswith((*HUB_PREFIXES, "local-dir:")):
        raise MsamilError(
            f"encoder {name!r}: a hub reference is not an encoder name; name a preset (`msamil list-models`, e.g. "
            f"uni_v1) or a timm architecture, and give {name} as weights (--weights), fetched once with "
            "`msamil fetch-weights` (nothing is downloaded during extraction)"
        )
    if not timm.is_model(name):
        raise MsamilError(
            f"unknown encoder {name!r}: use a preset or registered encoder ({', '.join(list_encoders())}) or a timm "
            "model name "
            "(python -c 'import timm; print(timm.list_models())')"
        )
    kwargs = {"num_classes": 0, **kwargs}
    # Fixed-size models (ViT, Swin) bake the token grid into their parameters; CNNs take any size.
    if _fixed_input_size(name) and "img_size" not in kwargs:
        if tuple(get_pretrained_cfg(name.split(".")[0]).input_size[-2:]) != (input_size, input_size):
            kwargs["img_size"] = input_size
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:
        options = sorted(set(kwargs) - {"num_classes", "img_size"})  # the user's, not ours
        raise MsamilError(f"encoder {name!r}: timm rejects the options {options}: {exc}") from None
    model.out_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return model


class PresetEncoder(nn.Module):
    """A preset's backbone (timm keys, as published) and its output rule: [B, 3, S, S] -> [B, width].

    ``cls``: class token after the final norm; ``cls+mean``: class token concatenated with the
    mean of the patch tokens (register tokens excluded); ``layer3_avgpool``: ResNet stem and
    layers 1-3, average pooled.
    """

    def __init__(self, backbone: nn.Module, preset: Preset):
        super().__init__()
        self.backbone = backbone
        self.output = preset.output
        self.out_dim = preset.width

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """ViT output tokens after the final norm: [B, prefix + patches, D], class token first."""
        return self.backbone.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output == "layer3_avgpool":
            b = self.backbone
            x = b.maxpool(b.act1(b.bn1(b.conv1(x))))
            return b.layer3(b.layer2(b.layer1(x))).mean((2, 3))
        tokens = self.forward_tokens(x)
        if self.output == "cls":
            return tokens[:, 0]
        if self.output == "cls+mean":
            patches = tokens[:, self.backbone.num_prefix_tokens:]
            return torch.cat([tokens[:, 0], patches.mean(1)], dim=-1)
        raise ValueError(f"unknown output rule {self.output!r}")


def build_preset_backbone(preset: Preset, **overrides) -> nn.Module:
    """The preset's timm network (random weights, ``pretrained=False``); ``overrides`` replace
    constructor options (tests build large models at reduced depth)."""
    import timm

    kwargs = {**timm_options(preset), **overrides}
    return timm.create_model(preset.architecture, pretrained=False, **kwargs)


def load_preset_weights(model: PresetEncoder, preset: Preset, path: str | os.PathLike) -> None:
    """Read a file in the preset's published layout, convert its keys to timm's and load it
    strictly into the backbone (``preset.unused_keys`` aside); a mismatch fails naming the file."""
    state = read_state_dict(path, f"encoder {preset.name} weights")
    if preset.layout != "timm" and not any(k.startswith("embeddings.") for k in state):
        layout = "timm"  # already converted, e.g. an e2e checkpoint's tuned encoder
    else:
        layout = preset.layout
    state = convert_state_dict(state, layout, preset.unused_keys)
    load_weights(model.backbone, state, f"encoder {preset.name}", source=path)


def output_rule(spec: EncoderSpec) -> str:
    """Which tokens or maps make an encoder's patch feature, in words (the manifest records it)."""
    preset = get_preset(spec.name)
    if preset:
        return preset.output
    if spec.name in _REGISTRY:
        return "class token"  # msfem: the Transformer's class token of the last layer
    return "timm global pool"


def weights_file(spec: EncoderSpec) -> Path | None:
    """The local file behind ``spec.weights``: the file itself, the published file inside a
    folder, or the cached file of an ``hf-hub:`` reference (never downloaded here)."""
    if spec.weights is None:
        return None
    names = _weight_files(get_preset(spec.name))
    found = local_weights(spec.weights, names)
    if found is None:
        raise MsamilError(f"encoder {spec.name}: weights folder {spec.weights} holds none of {', '.join(names)}; "
                          "give the folder the model was downloaded to, or the weights file itself")
    return found


def _weight_files(preset: Preset | None) -> tuple[str, ...]:
    """The names a preset's weights are published under (the usual ones for other encoders)."""
    return preset.files if preset else WEIGHT_FILES


def build_encoder(spec: EncoderSpec) -> tuple[PatchEncoder, int]:
    """Build ``spec`` in eval mode on the CPU: (encoder [B, 3, S, S] -> [B, D], D).

    Random initialisation is seeded with ``spec.seed`` (same spec, same weights); the global
    RNG state is left as it was. A weights file is loaded strictly: a file that is missing,
    unreadable or made for another architecture raises :class:`MsamilError`.
    """
    kwargs = dict(spec.kwargs)
    preset = get_preset(spec.name)
    weights = weights_file(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        if preset is not None:
            model = PresetEncoder(build_preset_backbone(preset, **kwargs), preset)
        elif spec.name in _REGISTRY:
            try:
                model = _REGISTRY[spec.name](input_size=spec.input_size, **kwargs)
            except TypeError as exc:  # an option the constructor does not take
                raise MsamilError(f"encoder {spec.name!r}: rejects the options {sorted(kwargs)}: {exc}") from None
        else:
            model = _timm_encoder(spec.name, spec.input_size, **kwargs)
    if weights is not None and preset is not None:
        load_preset_weights(model, preset, weights)
    elif weights is not None:
        load_weights(model, weights, f"encoder {spec.name}")
    elif kwargs.get("backbone_weights"):
        log.info("encoder %s: backbone from %s, the rest randomly initialised (seed %d)",
                 spec.name, kwargs["backbone_weights"], spec.seed)  # fmt: skip
    else:
        log.warning(
            "encoder %s: no weights file given, randomly initialised (seed %d); features carry no "
            "pretrained knowledge. Name a local state dict or hf-hub:<org>/<repo> (weights / --weights) "
            "for real use.",
            spec.name,
            spec.seed,
        )
    encoder = PatchEncoder(model, model.out_dim, spec).eval()
    return encoder, encoder.out_dim


# -- identity -----------------------------------------------------------------------------------
def _fixed_input_size(name: str) -> bool:
    """Whether a timm model's parameters depend on its input size (ViT, Swin: the token grid)."""
    if name in _REGISTRY:
        return False
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name.split(".")[0])
    return bool(cfg is not None and getattr(cfg, "fixed_input_size", False))


def encoder_id(spec: EncoderSpec, digits: int = 10) -> str:
    """``<name>-<hash>``: the encoder string of feature bags, deterministic for a given spec.

    The hash covers the weights file's bytes (or, with no file, the random-initialisation seed),
    the constructor options (weight files among them by their bytes) and, for presets and for
    fixed-size models such as ViTs whose parameters or token grid depend on it, the input size. Normalisation is not part of it.
    """
    kwargs = {
        k: (f"sha256:{file_sha256(v)}" if k in _WEIGHTS_KWARGS and v is not None else v)
        for k, v in sorted(spec.kwargs.items())
    }
    identity: dict[str, Any] = {"name": spec.name, "kwargs": kwargs}
    weights = weights_file(spec)
    if weights is not None:
        identity["weights"] = f"sha256:{file_sha256(weights)}"
    else:
        identity["seed"] = spec.seed  # random initialisation: the seed determines the weights
    if _fixed_input_size(spec.name) or get_preset(spec.name):
        identity["input_size"] = spec.input_size
    text = json.dumps(identity, sort_keys=True, default=str)
    name = spec.name.replace("/", "_")
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:digits]}"



# -- fetching -----------------------------------------------------------------------------------
def hub_reference(name: str, weights: str | None) -> str:
    """The ``hf-hub:`` reference to fetch for encoder ``name``: ``weights`` when it is one,
    else the preset's own repo; fails for local weights or a name without a repo."""
    if weights and is_hub_ref(str(weights)):
        return str(weights)
    preset = get_preset(name)
    if weights:
        raise MsamilError(f"encoder {name}: weights {weights} are local, nothing to fetch")
    if preset is None:
        raise MsamilError(f"encoder {name}: not a preset, so it has no known repo; give --weights hf-hub:<org>/<repo>")
    return f"hf-hub:{preset.repo_id}"


def fetch_weights(name: str, weights: str | None = None, local_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Download the weights (and the config file published beside them) of encoder ``name``
    once, into the Hugging Face cache or ``local_dir``; returns what was fetched:
    ``{"ref", "file", "sha256", "bytes"}`` (``file`` is what ``weights`` then resolves to).

    Uses ``HF_TOKEN`` for gated repos; honours ``HF_HUB_OFFLINE`` (then only the cache is read).
    """
    ref = hub_reference(name, weights)
    preset = get_preset(name)
    # into the cache first: hub_file checks access; a copy into local_dir is then local
    file = hub_file(ref, _weight_files(preset), download=True)
    extra = (preset.config_file,) if preset and preset.config_file else ()
    extra = [n for n in extra if hub_file(ref, (n,), download=True, required=False) is not None]
    if local_dir is not None:
        from huggingface_hub import hf_hub_download

        from ..hub import parse_hub_ref

        repo, revision = parse_hub_ref(ref)
        file = Path(hf_hub_download(repo, file.name, revision=revision, local_dir=local_dir))
        for extra_name in extra:
            hf_hub_download(repo, extra_name, revision=revision, local_dir=local_dir)
    log.info("encoder %s: weights %s ready at %s", name, ref, file)
    return {"ref": ref, "file": str(file), "sha256": file_sha256(file), "bytes": file.stat().st_size}
