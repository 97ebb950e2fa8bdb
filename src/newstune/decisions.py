"""A run's decision rule: how its logits become probabilities and labels, the same in every consumer.

evaluate, predict, serve and every export backend call `probabilities` and `labels` on the logits they computed,
so a temperature, a binary threshold, per-class biases or per-label thresholds apply everywhere alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from newstune.errors import NewstuneError


@dataclass(frozen=True)
class Decision:
    """Fitted on the validation split after training; the defaults are plain softmax + argmax."""

    temperature: float | list[float] = 1.0  # logits are divided by it: one scalar, or one per class (vector)
    threshold: float | None = None  # binary: class 1 when its probability reaches it
    class_bias: list[float] | None = None  # multi-class: added to the log-probabilities before the argmax
    multi_label: bool = False  # sigmoid per label instead of a softmax over classes
    label_thresholds: list[float] | None = None  # multi-label: a label is on when its probability reaches its own
    calibration: str = "none"  # how the temperature was fitted: none, temperature or vector
    logit_bias: list[float] | None = None  # vector scaling: added to logits / temperature

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "decision") -> Decision:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise NewstuneError(f"{source}: unknown decision key(s) {unknown}; known keys are {sorted(known)} "
                                "(re-create it with `newstune calibrate RUN`)")
        return cls(**data)

    def uncalibrated(self) -> Decision:
        """The same rule on the raw logits (temperature 1), for before/after calibration figures."""
        return Decision(threshold=self.threshold, class_bias=self.class_bias, multi_label=self.multi_label,
                        label_thresholds=self.label_thresholds)  # no temperature, no logit_bias


def as_decision(decision: Decision | float | None) -> Decision:
    """A Decision from a Decision, a binary threshold (the pre-Decision API) or None."""
    return decision if isinstance(decision, Decision) else Decision(threshold=decision)


def probabilities(logits: np.ndarray, decision: Decision | None = None) -> np.ndarray:
    """Softmax over classes (or a sigmoid per label) of logits / temperature (+ logit_bias), in float64."""
    decision = as_decision(decision)
    scaled = np.asarray(logits, dtype=np.float64) / np.asarray(decision.temperature, dtype=np.float64)
    if decision.logit_bias is not None:
        scaled = scaled + np.asarray(decision.logit_bias)
    if decision.multi_label:
        return 1.0 / (1.0 + np.exp(-scaled))
    shifted = scaled - scaled.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def labels(probs: np.ndarray, decision: Decision | None = None) -> np.ndarray:
    """Class indices (n,), or for multi-label a 0/1 matrix (n, labels).

    Multi-label: per-label thresholds (0.5 by default). Binary with a threshold: class 1 when P(class 1) reaches it.
    Otherwise the argmax of log-probabilities plus the class biases (none: the plain argmax).
    """
    decision = as_decision(decision)
    probs = np.asarray(probs, dtype=np.float64)
    if decision.multi_label:
        thresholds = decision.label_thresholds if decision.label_thresholds is not None else 0.5
        return (probs >= np.asarray(thresholds)).astype(int)
    if decision.threshold is not None and probs.shape[1] == 2:
        return (probs[:, 1] >= decision.threshold).astype(int)
    if decision.class_bias is not None:
        return (np.log(np.clip(probs, 1e-12, None)) + np.asarray(decision.class_bias)).argmax(axis=1)
    return probs.argmax(axis=1)


def label_names(decided: np.ndarray, names: list[str], decision: Decision) -> list[str | list[str]]:
    """Each row's label name, or for multi-label the list of label names that are on."""
    if decision.multi_label:
        return [[names[j] for j in np.flatnonzero(row)] for row in decided]
    return [names[int(i)] for i in decided]
