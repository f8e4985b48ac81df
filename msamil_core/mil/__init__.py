"""The MIL model zoo: MIL-Lab-compatible models and MsaMIL-Net's IAAM.

Example::

    from msamil_core.mil import create_model, list_models, load_pretrained
    model = create_model("abmil.base", in_dim=1024, num_classes=3)
    load_pretrained(model, "feather_abmil.safetensors")   # classifier re-initialised: 3 classes
    results, log = model(h, loss_fn=loss_fn, label=y, attn_mask=mask)   # h [B, M, 1024]
    results["logits"]                                                    # [B, 3]

Every model follows :class:`MILModel` (``forward_features`` / ``forward_head`` / ``forward``
/ ``reset_classifier``). Models that MIL-Lab also has keep its parameter names and shapes,
so its state dicts (and FEATHER's) load with :func:`load_pretrained` and give the same
logits. Importing this package registers every model.
"""

from . import abmil, clam, dftd, dsmil, iaam, ilra, minet, pooling, rrt, transformer, transmil, wikg  # noqa: F401  (register)
from ._registry import ENCODER_DIMS, create_model, is_model, list_models, model_entrypoint, register_model
from .base import MILModel
from .pretrained import LoadResult, load_pretrained, read_state_dict

__all__ = [
    "ENCODER_DIMS",
    "LoadResult",
    "MILModel",
    "create_model",
    "is_model",
    "list_models",
    "load_pretrained",
    "model_entrypoint",
    "read_state_dict",
    "register_model",
]
