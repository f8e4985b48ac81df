"""Patch encoders: images [B, 3, S, S] -> features [B, D], built offline from a small registry.

Two kinds of encoder:

* ``msfem``, the multi-scale feature extraction module of MsaMIL-Net (sec. 3.2): an
  EfficientNet-B3 feature map (16 x 16 x 1536 for a 512-px patch) read as 256 tokens, projected
  to 512, prefixed with a class token, given a learned position embedding and passed through a
  Transformer encoder; the class token of the last layer is the 512-d patch feature.
* any timm backbone by name (``resnet50``, ``efficientnet_b3``, ``vit_base_patch16_224``, ...)
  with global pooling and no classifier; ViTs get ``img_size`` when the input size differs from
  their default.

Nothing here touches the network: timm models are always created with ``pretrained=False`` and
weights come only from a local file (a timm or Hugging Face state dict, ``.bin``/``.pth``/``.pt``
or ``.safetensors``). Without a file the encoder is randomly initialised from a fixed seed and a
warning says so. :func:`encoder_id` names the result (``name-<hash>``) so that feature bags of
different weights never mix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import MsamilError
from .weights import file_sha256, load_weights

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Keys whose value names a local weights file: encoder_id hashes the file's bytes, not its path,
# so that moving a file keeps the id and replacing it changes the id.
_WEIGHTS_KWARGS = ("backbone_weights",)


@dataclass
class EncoderSpec:
    """What to build: a registry or timm name, its weights, input size, normalisation and options.

    Attributes:
        name: a registered encoder (see :func:`list_encoders`, e.g. ``msfem``) or a timm model
            name (``resnet50``, ``vit_base_patch16_224``, with or without a ``.tag``).
        weights: local state-dict file (``.safetensors``, ``.bin``, ``.pth``, ``.pt``); ``None``
            means random initialisation from ``seed``.
        input_size: side of the square patch fed to the network, in pixels (512 in the paper).
        mean, std: per-channel RGB normalisation of images scaled to [0, 1].
        kwargs: extra constructor options (timm kwargs, or ``msfem`` options such as ``depth``).
        seed: seed of the random initialisation (used when ``weights`` is ``None``, and for
            any part a weights file does not cover, e.g. the msfem Transformer with
            ``backbone_weights``).
    """

    name: str
    weights: str | os.PathLike | None = None
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
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
    """Registered encoder names; any timm model name is accepted besides these."""
    return sorted(_REGISTRY)


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

    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        raise MsamilError(
            f"encoder {name!r}: hub names need a download; give the timm architecture name "
            "(e.g. vit_large_patch16_224) and the downloaded file as weights (--weights)"
        )
    if not timm.is_model(name):
        raise MsamilError(
            f"unknown encoder {name!r}: use one of {', '.join(list_encoders())} or a timm model name "
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


def build_encoder(spec: EncoderSpec) -> tuple[PatchEncoder, int]:
    """Build ``spec`` in eval mode on the CPU: (encoder [B, 3, S, S] -> [B, D], D).

    Random initialisation is seeded with ``spec.seed`` (same spec, same weights); the global
    RNG state is left as it was. A weights file is loaded strictly: a file that is missing,
    unreadable or made for another architecture raises :class:`MsamilError`.
    """
    kwargs = dict(spec.kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        if spec.name in _REGISTRY:
            try:
                model = _REGISTRY[spec.name](input_size=spec.input_size, **kwargs)
            except TypeError as exc:  # an option the constructor does not take
                raise MsamilError(f"encoder {spec.name!r}: rejects the options {sorted(kwargs)}: {exc}") from None
        else:
            model = _timm_encoder(spec.name, spec.input_size, **kwargs)
    if spec.weights is not None:
        load_weights(model, spec.weights, f"encoder {spec.name}")
    elif kwargs.get("backbone_weights"):
        log.info("encoder %s: backbone from %s, the rest randomly initialised (seed %d)",
                 spec.name, kwargs["backbone_weights"], spec.seed)  # fmt: skip
    else:
        log.warning(
            "encoder %s: no weights file given, randomly initialised (seed %d); features carry no "
            "pretrained knowledge. Name a local state dict (weights / --weights) for real use.",
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
    the constructor options (weight files among them by their bytes) and, for fixed-size models
    such as ViTs whose parameters depend on it, the input size. Normalisation is not part of it.
    """
    kwargs = {
        k: (f"sha256:{file_sha256(v)}" if k in _WEIGHTS_KWARGS and v is not None else v)
        for k, v in sorted(spec.kwargs.items())
    }
    identity: dict[str, Any] = {"name": spec.name, "kwargs": kwargs}
    if spec.weights is not None:
        identity["weights"] = f"sha256:{file_sha256(spec.weights)}"
    else:
        identity["seed"] = spec.seed  # random initialisation: the seed determines the weights
    if _fixed_input_size(spec.name):
        identity["input_size"] = spec.input_size
    text = json.dumps(identity, sort_keys=True, default=str)
    name = spec.name.replace("/", "_")
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:digits]}"

