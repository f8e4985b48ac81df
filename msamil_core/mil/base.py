"""The MIL template every model of the zoo follows, and the mask helpers they share.

A bag is a tensor ``h`` of instance features [B, M, D] (an unbatched [M, D] is accepted
too). Bags of different sizes are padded to a common M and described by ``attn_mask``
[B, M] (1 = real instance, 0 = padding). Every model gives padding no weight, so a padded
batch gives the same logits as each bag run alone.

The call follows MIL-Lab (``src/models/mil_template.py``): ``forward_features`` aggregates a
bag into a slide feature, ``forward_head`` maps it to logits and ``forward`` returns
``(results_dict, log_dict)``:

* ``results_dict``: ``logits`` [B, C]; ``loss`` (a scalar tensor, ``None`` without
  ``loss_fn``); ``attention`` [B, M] with ``return_attention``; ``slide_feats`` with
  ``return_slide_feats``.
* ``log_dict``: ``loss`` as a float (-1 without ``loss_fn``, as MIL-Lab), plus model-specific
  floats (``cls_loss``, ``instance_loss`` for CLAM and DTFD) and the same ``attention`` /
  ``slide_feats`` tensors (MIL-Lab scripts read them from there).

``attention`` is the same kind of map for every model, so heatmap code needs no per-model
branch: per-instance weights in the caller's instance order, non-negative, summing to 1
over each bag's real instances, 0 at padding. Each model's docstring says which of its
attention maps this is; models with one map per class (CLAM-MB, DSMIL) give the map of
the predicted class and log all of them as ``class_attention`` [B, C, M].
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from ..errors import MsamilError

__all__ = [
    "MILModel",
    "build_model",
    "init_weights",
    "masked_softmax",
    "masked_mean",
    "masked_max",
    "state_only",
    "split_bags",
    "pool_instances",
    "mean_pool_weights",
    "max_pool_weights",
    "scatter_bags",
]


# ----------------------------------------------------------------------------- helpers


def init_weights(module: nn.Module) -> None:
    """MIL-Lab's initialisation: Kaiming-uniform (ReLU gain) for linear layers, Xavier for
    convolutions, ones/zeros for norms, zero biases. Models trained from scratch here then
    start where MIL-Lab's do, which keeps their published hyper-parameters meaningful."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.Conv2d):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)):
            if layer.weight is not None:
                nn.init.ones_(layer.weight)
                nn.init.zeros_(layer.bias)


def state_only(module: nn.Module) -> nn.Module:
    """Turn ``module``'s parameters into buffers of the same names and return it.

    MIL-Lab builds a few layers that its forward pass never calls (DSMIL's ``fcc``, RRT's
    ``pos_embedding``, WIKG's ``gate_U/V/W``). Their weights are in MIL-Lab state dicts, so
    we keep them for strict loading, but as buffers: an optimizer never sees weights that
    cannot get a gradient, and they still round-trip through ``state_dict``.
    """
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            del sub._parameters[name]
            sub.register_buffer(name, param.detach().clone())
    return module


def masked_softmax(scores: Tensor, mask: Tensor | None, dim: int = -1) -> Tensor:
    """Softmax over ``dim`` that gives exactly 0 where ``mask`` is False.

    ``mask`` is bool and broadcastable to ``scores``. Masked scores are set to the dtype's
    lowest value (not -inf, which turns a fully masked row into NaN) and the output is
    zeroed there as well.
    """
    if mask is None:
        return scores.softmax(dim)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores.softmax(dim).masked_fill(~mask, 0.0)


def masked_mean(x: Tensor, mask: Tensor | None, dim: int = 1) -> Tensor:
    """Mean of ``x`` [B, M, D] over the real instances (``mask`` [B, M]); keeps no dim."""
    if mask is None:
        return x.mean(dim)
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim) / weights.sum(dim).clamp_min(1.0)


def masked_max(x: Tensor, mask: Tensor | None, dim: int = 1) -> tuple[Tensor, Tensor]:
    """Max (values, indices) of ``x`` [B, M, D] over the real instances (``mask`` [B, M])."""
    if mask is not None:
        x = x.masked_fill(~mask.unsqueeze(-1), torch.finfo(x.dtype).min)
    return x.max(dim)


def mean_pool_weights(mask: Tensor | None, batch: int, num_instances: int, like: Tensor) -> Tensor:
    """The instance weights of mean pooling, [B, M]: 1/n_b on real instances, 0 at padding."""
    weights = like.new_ones(batch, num_instances) if mask is None else mask.to(like.dtype)
    return weights / weights.sum(1, keepdim=True)


def max_pool_weights(argmax: Tensor, num_instances: int, like: Tensor) -> Tensor:
    """The instance weights of max pooling, [B, M]: each instance's share of the feature
    channels whose maximum it holds. ``argmax`` [B, D] is the per-channel winner."""
    counts = like.new_zeros(argmax.shape[0], num_instances)
    counts.scatter_add_(1, argmax, like.new_ones(argmax.shape))
    return counts / argmax.shape[1]


def pool_instances(x: Tensor, mask: Tensor | None, how: str, with_weights: bool) -> tuple[Tensor, Tensor | None]:
    """Mean or channel-wise max of ``x`` [B, M, D] over the real instances -> [B, D], and
    (``with_weights``) the instance weights [B, M] of :func:`mean_pool_weights` /
    :func:`max_pool_weights`."""
    B, M, _ = x.shape
    if how == "mean":
        return masked_mean(x, mask), mean_pool_weights(mask, B, M, x) if with_weights else None
    pooled, argmax = masked_max(x, mask)
    return pooled, max_pool_weights(argmax, M, x) if with_weights else None


def split_bags(x: Tensor, mask: Tensor | None) -> list[Tensor]:
    """The real instances of each bag: ``x`` [B, M, ...] -> B tensors [1, n_b, ...]."""
    if mask is None:
        return [x[b : b + 1] for b in range(x.shape[0])]
    return [x[b : b + 1, mask[b]] for b in range(x.shape[0])]


def scatter_bags(values: list[Tensor], mask: Tensor | None, num_instances: int) -> Tensor:
    """Inverse of :func:`split_bags` for per-instance values: B tensors [n_b] -> [B, M]
    with zeros at padding."""
    out = values[0].new_zeros(len(values), num_instances)
    for b, v in enumerate(values):
        if mask is None:
            out[b] = v
        else:
            out[b, mask[b]] = v
    return out


def build_model(cls: type[MILModel], defaults: dict[str, Any], overrides: dict[str, Any]) -> MILModel:
    """Instantiate ``cls`` with ``defaults`` updated by ``overrides`` and remember the result
    as ``model.model_args``, so ``create_model(model.model_name, **model.model_args)``
    rebuilds it even if a registered default changes later."""
    args = {**defaults, **overrides}
    accepted = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        valid = ", ".join(p for p in accepted if p != "self")
        raise MsamilError(f"{cls.__name__} has no option(s) {', '.join(unknown)}; valid options: {valid}")
    model = cls(**args)
    model.model_args = dict(args)
    return model


# ----------------------------------------------------------------------------- template


class MILModel(nn.Module):
    """Base class of every model in :mod:`msamil_core.mil`.

    Subclasses implement :meth:`_forward_features` (bag -> slide feature), :meth:`forward_head`
    (slide feature -> logits) and :meth:`_build_head` (create the class-count-dependent
    layers). Optional hooks: :meth:`_combine_logits` (DSMIL mixes in instance logits) and
    :meth:`_instance_loss` (CLAM, DTFD add an instance-level loss weighted by ``bag_weight``).

    Class attributes:
        permutation_invariant: the logits do not depend on the order of instances (tested).
        head_prefixes: state-dict key prefixes of every layer whose shape depends on the
            class count; :func:`~msamil_core.mil.load_pretrained` drops and re-initialises
            them when a file has another class count.
        uses_positions: the model reads ``coords`` / ``scales``.
    """

    permutation_invariant: ClassVar[bool] = False
    head_prefixes: ClassVar[tuple[str, ...]] = ("classifier",)
    uses_positions: ClassVar[bool] = False

    def __init__(self, in_dim: int, embed_dim: int, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise MsamilError(f"{type(self).__name__}: num_classes must be >= 1, got {num_classes}")
        self.in_dim = in_dim
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.model_name = type(self).__name__.lower()  # create_model sets the registry name
        self.model_args: dict[str, Any] = {}

    # -- to implement ---------------------------------------------------------------

    def _forward_features(
        self,
        h: Tensor,
        mask: Tensor | None,
        coords: Tensor | None,
        scales: Tensor | None,
        return_attention: bool,
    ) -> tuple[Tensor, dict[str, Any]]:
        """Aggregate a prepared batch. ``h`` [B, M, in_dim]; ``mask`` bool [B, M] or ``None``
        (all real); ``coords`` float [B, M, 2] or ``None``; ``scales`` long [B, M] or ``None``.
        Returns the slide feature and a dict of intermediates, which holds ``attention``
        [B, M] (see the module docstring) when ``return_attention``."""
        raise NotImplementedError

    def forward_head(self, slide_feats: Tensor) -> Tensor:
        """Slide feature (as :meth:`forward_features` returns it) -> logits [B, C]."""
        return self.classifier(slide_feats)

    def _build_head(self, num_classes: int) -> None:
        """Create every layer whose shape depends on ``num_classes`` (see ``head_prefixes``)."""
        self.classifier = nn.Linear(self.embed_dim, num_classes)

    def _combine_logits(self, logits: Tensor, intermeds: dict[str, Any], mask: Tensor | None) -> Tensor:
        return logits

    def _instance_loss(self, intermeds: dict[str, Any], label: Tensor, mask: Tensor | None) -> Tensor | None:
        return None

    # -- public API -----------------------------------------------------------------

    def reset_classifier(self, num_classes: int | None = None) -> None:
        """Replace the class-count-dependent layers by freshly initialised ones for
        ``num_classes`` classes (default: the current count)."""
        num_classes = self.num_classes if num_classes is None else num_classes
        if num_classes < 1:
            raise MsamilError(f"{self.model_name}: num_classes must be >= 1, got {num_classes}")
        ref = next(self.parameters())
        self.num_classes = num_classes
        self._build_head(num_classes)
        for prefix in self.head_prefixes:
            head = self.get_submodule(prefix)
            init_weights(head)
            head.to(device=ref.device, dtype=ref.dtype)
        self.model_args["num_classes"] = num_classes

    def forward_features(
        self,
        h: Tensor,
        attn_mask: Tensor | None = None,
        return_attention: bool = False,
        coords: Tensor | None = None,
        scales: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        """Aggregate bags into slide features.

        Args:
            h: instance features [B, M, in_dim] or [M, in_dim].
            attn_mask: [B, M] (or [M]), 1 = real instance, 0 = padding.
            return_attention: put ``attention`` [B, M] into the returned dict.
            coords: level-0 (x, y) of each instance [B, M, 2]; read by multi-scale models only.
            scales: scale index of each instance [B, M] (0 = 20x, 1 = 10x, 2 = 5x).

        Returns:
            (slide features, usually [B, F]; dict of intermediates)
        """
        h, mask, coords, scales = self._prepare(h, attn_mask, coords, scales)
        return self._forward_features(h, mask, coords, scales, return_attention)

    def forward(
        self,
        h: Tensor,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        label: Tensor | None = None,
        attn_mask: Tensor | None = None,
        return_attention: bool = False,
        return_slide_feats: bool = False,
        coords: Tensor | None = None,
        scales: Tensor | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Classify bags (MIL-Lab's call).

        Args:
            h: instance features [B, M, in_dim] or [M, in_dim].
            loss_fn: bag-level loss, called as ``loss_fn(logits, label)``.
            label: bag labels, long [B] (a scalar is taken as [1]).
            attn_mask: [B, M], 1 = real instance, 0 = padding.
            return_attention: add ``attention`` [B, M] to both dicts.
            return_slide_feats: add ``slide_feats`` to both dicts.
            coords, scales: instance positions, see :meth:`forward_features`; models that do
                not use positions ignore them, so a training loop can always pass them.

        Returns:
            ``(results_dict, log_dict)`` as described in the module docstring.
        """
        h, mask, coords, scales = self._prepare(h, attn_mask, coords, scales)
        if label is not None:
            label = torch.as_tensor(label, device=h.device).reshape(-1).long()
        slide_feats, intermeds = self._forward_features(h, mask, coords, scales, return_attention)
        logits = self._combine_logits(self.forward_head(slide_feats), intermeds, mask)

        log_dict: dict[str, Any] = {}
        loss = None
        if loss_fn is not None and label is not None:
            loss = loss_fn(logits, label)
            instance_loss = self._instance_loss(intermeds, label, mask)
            if instance_loss is not None:
                log_dict["cls_loss"] = loss.item()
                log_dict["instance_loss"] = instance_loss.item()
                bag_weight = self.bag_weight
                loss = bag_weight * loss + (1.0 - bag_weight) * instance_loss
        log_dict["loss"] = loss.item() if loss is not None else -1

        results: dict[str, Any] = {"logits": logits, "loss": loss}
        if return_attention:
            results["attention"] = log_dict["attention"] = intermeds["attention"]
            if "class_attention" in intermeds:
                log_dict["class_attention"] = intermeds["class_attention"]
        if return_slide_feats:
            results["slide_feats"] = log_dict["slide_feats"] = slide_feats
        return results, log_dict

    # -- input checks ---------------------------------------------------------------

    def _prepare(
        self, h: Tensor, attn_mask: Tensor | None, coords: Tensor | None, scales: Tensor | None
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """Batch the inputs, check shapes, turn the mask into bool (or ``None`` when every
        instance is real, which lets models skip masking work)."""
        if h.dim() == 2:
            h = h.unsqueeze(0)
            attn_mask = None if attn_mask is None else attn_mask.reshape(1, -1)
            coords = None if coords is None else coords.reshape(1, -1, 2)
            scales = None if scales is None else scales.reshape(1, -1)
        if h.dim() != 3:
            raise ValueError(f"{self.model_name}: h must be [B, M, D] or [M, D], got shape {tuple(h.shape)}")
        B, M, D = h.shape
        if D != self.in_dim:
            raise MsamilError(
                f"{self.model_name}: instance features have {D} dimensions but the model was built "
                f"with in_dim={self.in_dim}; build it with in_dim={D} or use features of the matching encoder"
            )
        if M == 0:
            raise ValueError(f"{self.model_name}: empty bag (M = 0)")
        mask = None
        if attn_mask is not None:
            if tuple(attn_mask.shape) != (B, M):
                raise ValueError(f"{self.model_name}: attn_mask must be [{B}, {M}], got {tuple(attn_mask.shape)}")
            mask = attn_mask.to(h.device) != 0
            counts = mask.sum(1)
            if bool((counts == 0).any()):
                raise ValueError(f"{self.model_name}: bag(s) {counts.eq(0).nonzero().flatten().tolist()} have no real instance")
            if bool(mask.all()):
                mask = None
        if coords is not None and tuple(coords.shape) != (B, M, 2):
            raise ValueError(f"{self.model_name}: coords must be [{B}, {M}, 2], got {tuple(coords.shape)}")
        if scales is not None and tuple(scales.shape) != (B, M):
            raise ValueError(f"{self.model_name}: scales must be [{B}, {M}], got {tuple(scales.shape)}")
        return h, mask, coords, scales
