"""Temperature scaling (Guo et al. 2017): class probabilities ``softmax(logits / T)``.

One temperature T > 0 per fold model, fitted after training on the fold's validation slides by
minimising their negative log-likelihood (``training.temperature_scaling``). It is stored in the
checkpoint (``temperature``) and :func:`probabilities` is the one place logits become
probabilities, in evaluation and in ``msamil predict`` alike. Dividing every logit by the same
T > 0 keeps their order, so the predicted class, accuracy and AUC stay as they were; the
confidences, and with them the calibration error and the log-likelihood, change.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import MsamilError

# The fitted log T is kept within these bounds: a validation part the model separates perfectly
# drives T towards 0 (ever sharper), one it gets all wrong towards infinity.
LOG_T_RANGE = (math.log(0.05), math.log(20.0))


def scaled_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Logits [N, C] divided by ``temperature``, as float32 (their log-softmax is the scaled model's
    log-probabilities)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Class probabilities [N, C] of logits [N, C] at ``temperature`` (1: plain softmax)."""
    return scaled_logits(logits, temperature).softmax(-1)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> float:
    """The temperature T minimising the mean NLL of ``softmax(logits / T)``: LBFGS on log T
    (T stays positive), from T = 1, within :data:`LOG_T_RANGE`.

    Args:
        logits: [N, C] float logits of the validation slides.
        labels: [N] int class indices.

    Raises:
        MsamilError: no validation slide to fit on.
    """
    if len(logits) == 0:
        raise MsamilError("temperature scaling needs validation slides; set splits.val_fraction above 0 "
                          "or turn training.temperature_scaling off")
    z = logits.detach().double().cpu()
    y = torch.as_tensor(labels, dtype=torch.long).cpu()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(z / log_t.clamp(*LOG_T_RANGE).exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().clamp(*LOG_T_RANGE).exp())


def checkpoint_temperature(ckpt: dict, where: str) -> float:
    """The temperature of a fold's checkpoint: its ``temperature`` (1.0 for checkpoints from
    before temperature scaling). A checkpoint trained with ``temperature_scaling`` that lacks
    one fails naming ``where``, so its probabilities are never silently left unscaled."""
    temperature = ckpt.get("temperature")
    if temperature is None:
        if (ckpt.get("config") or {}).get("temperature_scaling"):
            raise MsamilError(f"{where}: trained with temperature_scaling but holds no temperature; retrain the fold")
        return 1.0
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise MsamilError(f"{where}: its temperature {temperature!r} is not a positive number; retrain the fold")
    return float(temperature)
