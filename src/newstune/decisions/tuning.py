"""Fitting a run's decision rule on the validation split: calibration first, then thresholds or class biases."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from sklearn.metrics import f1_score

from newstune.config import EvalSettings
from newstune.decisions.calibration import fit_scaling
from newstune.decisions.metrics import THRESHOLD_GRID, confidence_outcome, expected_calibration_error, tune_threshold
from newstune.decisions.rule import Decision, labels, probabilities

BIAS_GRID = np.round(np.linspace(-2.0, 2.0, 21), 2)  # offsets on log-probabilities
BIAS_ROUNDS = 3


def fit_decision(truth: np.ndarray, logits: np.ndarray, settings: EvalSettings, multi_label: bool) -> Decision:
    """Temperature(s) by eval.calibration; then per-label thresholds (multi-label), the binary threshold, or
    per-class biases (eval.tune_class_bias), each tuned for macro-F1 on the calibrated probabilities."""
    truth, logits = np.asarray(truth), np.asarray(logits, dtype=np.float64)
    temperature: float | list[float] = 1.0
    offsets = None
    method = settings.calibration
    if method != "none":
        vector = method == "vector"
        temperature, offsets = fit_scaling(logits, truth, multi_label, per_class=vector, offsets=vector)
        if _ece(truth, logits, Decision(temperature=temperature, multi_label=multi_label, logit_bias=offsets)) > \
                _ece(truth, logits, Decision(multi_label=multi_label)):
            # a lower log loss can still bin worse (small validation sets): the card must not call that calibrated
            temperature, offsets, method = 1.0, None, "none"
    decision = Decision(temperature=temperature, multi_label=multi_label, calibration=method, logit_bias=offsets)
    probs = probabilities(logits, decision)
    if multi_label and settings.tune_threshold:
        return replace(decision, label_thresholds=tune_label_thresholds(truth, probs))
    if probs.shape[1] == 2 and not multi_label and settings.tune_threshold:
        threshold, _ = tune_threshold(truth, np.log(np.clip(probs, 1e-12, None)))
        return replace(decision, threshold=threshold)
    if probs.shape[1] > 2 and not multi_label and settings.tune_class_bias:
        return replace(decision, class_bias=tune_class_bias(truth, probs))
    return decision


def _ece(truth: np.ndarray, logits: np.ndarray, decision: Decision) -> float:
    return expected_calibration_error(*confidence_outcome(truth, probabilities(logits, decision), decision))


def tune_label_thresholds(truth: np.ndarray, probs: np.ndarray) -> list[float]:
    """Per label, the threshold in 0.05..0.95 with the best F1 (ties: nearest 0.5). Macro-F1 is the mean of the
    per-label F1s, so tuning each label alone maximises it."""
    truth = truth.astype(bool)
    best_t = np.full(probs.shape[1], 0.5)
    best_f1 = np.full(probs.shape[1], -1.0)
    for t in sorted(THRESHOLD_GRID, key=lambda t: abs(t - 0.5)):
        on = probs >= t
        tp = (on & truth).sum(0)
        f1 = 2 * tp / np.maximum(on.sum(0) + truth.sum(0), 1)
        better = f1 > best_f1 + 1e-12
        best_t[better], best_f1[better] = t, f1[better]
    best_t[truth.sum(0) == 0] = 0.5  # no positive in validation: nothing to tune on
    return [float(t) for t in best_t]


def tune_class_bias(truth: np.ndarray, probs: np.ndarray) -> list[float]:
    """Offsets on the log-probabilities, one per class, by coordinate ascent on macro-F1 (ties: the smaller offset).
    Starts from none; an offset is kept only where it raises validation macro-F1."""
    n_classes = probs.shape[1]
    bias = np.zeros(n_classes)

    def score(candidate: np.ndarray) -> float:
        decided = labels(probs, Decision(class_bias=candidate.tolist()))
        return f1_score(truth, decided, labels=list(range(n_classes)), average="macro", zero_division=0)

    best = score(bias)
    for _ in range(BIAS_ROUNDS):
        improved = False
        for k in range(n_classes):
            for offset in sorted(BIAS_GRID, key=abs):
                candidate = bias.copy()
                candidate[k] = offset
                value = score(candidate)
                if value > best + 1e-9:
                    bias, best, improved = candidate, value, True
        if not improved:
            break
    return [float(b) for b in bias]
