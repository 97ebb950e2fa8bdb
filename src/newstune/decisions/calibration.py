"""Temperature scaling (Guo et al. 2017) fitted on validation logits: one scalar, or vector scaling (a temperature
and an offset per class)."""

from __future__ import annotations

import numpy as np
import torch

MIN_T, MAX_T = 0.05, 20.0


def _nll(logits: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> torch.Tensor:
    if multi_label:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.double())
    return torch.nn.functional.cross_entropy(logits, labels.long())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, multi_label: bool = False,
                    per_class: bool = False) -> float | list[float]:
    """The temperature(s) minimising the validation log loss of softmax (or sigmoid) of logits / T; per_class:
    one per class or label, without offsets."""
    return fit_scaling(logits, labels, multi_label, per_class, offsets=False)[0]


def fit_scaling(logits: np.ndarray, labels: np.ndarray, multi_label: bool = False, per_class: bool = False,
                offsets: bool = False) -> tuple[float | list[float], list[float] | None]:
    """(temperature(s), offsets or None) minimising the validation log loss of logits / T + b.

    LBFGS on log T keeps T positive; a fit that does not lower the loss below T = 1, b = 0 keeps those.
    """
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels))
    width = z.shape[1] if per_class else 1
    log_t = torch.zeros(width, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=offsets)
    if len(z):
        params = [log_t, bias] if offsets else [log_t]
        optimizer = torch.optim.LBFGS(params, lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = _nll(z / log_t.exp() + bias, y, multi_label)
            loss.backward()
            return loss

        optimizer.step(closure)
    with torch.no_grad():
        t = log_t.exp().clamp(MIN_T, MAX_T)
        if not len(z) or _nll(z / t + bias, y, multi_label) >= _nll(z, y, multi_label):
            t, bias = torch.ones_like(t), torch.zeros_like(bias)
    values = [round(float(v), 6) for v in t]
    return (values if per_class else values[0]), ([round(float(v), 6) for v in bias] if offsets else None)
