"""A run's decision rule: how its logits become probabilities and labels, the same in every consumer.

evaluate, predict, serve and every export backend call `probabilities` and `labels` on the logits they computed,
so a temperature, a binary threshold, per-class biases or per-label thresholds apply everywhere alike.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from newstune.errors import NewstuneError

ENSEMBLE_KEYS = ("method", "weight", "encoder_temperature", "baseline_temperature")
ENSEMBLE_COMBINERS = ("weighted", "logistic")  # no combiner key: weighted (how every weighted sum is written)


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
    # eval.ensemble: the logits above are the encoder blended with the run's TF-IDF model (newstune.decisions.ensemble):
    # {"method": "tfidf", "weight", "encoder_temperature", "baseline_temperature"}, and "combiner": "logistic" with
    # weight null where a logistic layer (ensemble/stack.safetensors) combines them
    ensemble: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "decision") -> Decision:
        if not isinstance(data, dict):
            raise NewstuneError(f"{source}: expected a JSON object of decision keys; re-create it with "
                                "`newstune calibrate RUN`")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise NewstuneError(f"{source}: unknown decision key(s) {unknown}; known keys are {sorted(known)} "
                                "(re-create it with `newstune calibrate RUN`)")
        problem = _problem(data)
        if problem:
            raise NewstuneError(f"{source}: {problem}; the file was changed or damaged: re-create it with "
                                "`newstune calibrate RUN`")
        return cls(**data)

    def uncalibrated(self) -> Decision:
        """The same rule on the raw logits (temperature 1), for before/after calibration figures."""
        return Decision(threshold=self.threshold, class_bias=self.class_bias, multi_label=self.multi_label,
                        label_thresholds=self.label_thresholds,
                        ensemble=self.ensemble)  # no temperature, no logit_bias


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _problem(data: dict) -> str | None:
    """What is wrong with a decision file's values (a run folder is shared: never trust it), or None.

    A zero temperature gave NaN probabilities and a negative one inverted every label."""
    temperature = data.get("temperature", 1.0)
    temperatures = temperature if isinstance(temperature, list) else [temperature]
    if not temperatures or not all(_finite(t) and t > 0 for t in temperatures):
        return f"temperature must be a positive number or a list of them (got {temperature!r})"
    threshold = data.get("threshold")
    if threshold is not None and not (_finite(threshold) and 0 < threshold < 1):
        return f"threshold must be between 0 and 1 (got {threshold!r})"
    for key in ("class_bias", "logit_bias"):
        value = data.get(key)
        if value is not None and not (isinstance(value, list) and value and all(_finite(v) for v in value)):
            return f"{key} must be a list of numbers (got {value!r})"
    thresholds = data.get("label_thresholds")
    if thresholds is not None and not (isinstance(thresholds, list) and thresholds
                                       and all(_finite(t) and 0 <= t <= 1 for t in thresholds)):
        return f"label_thresholds must be a list of numbers between 0 and 1 (got {thresholds!r})"
    if not isinstance(data.get("multi_label", False), bool):
        return f"multi_label must be true or false (got {data.get('multi_label')!r})"
    ensemble = data.get("ensemble")
    if ensemble is not None:
        if not (isinstance(ensemble, dict) and set(ensemble) - {"combiner"} == set(ENSEMBLE_KEYS)
                and ensemble["method"] == "tfidf"):
            return (f"ensemble must be an object with keys {list(ENSEMBLE_KEYS)} (and a combiner) and method 'tfidf' "
                    f"(got {ensemble!r})")
        combiner = ensemble.get("combiner", "weighted")
        if combiner not in ENSEMBLE_COMBINERS:
            return f"ensemble combiner must be one of {list(ENSEMBLE_COMBINERS)} (got {combiner!r})"
        if combiner == "logistic" and data.get("multi_label"):
            return "a multi-label run cannot combine with a logistic layer (its labels are independent sigmoids)"
        if combiner == "logistic" and ensemble["weight"] is not None:
            return f"a logistic ensemble has no weight: null expected (got {ensemble['weight']!r})"
        if combiner == "weighted" and not (_finite(ensemble["weight"]) and 0 <= ensemble["weight"] <= 1):
            return f"ensemble weight must be between 0 and 1 (got {ensemble['weight']!r})"
        for key in ("encoder_temperature", "baseline_temperature"):
            if not (_finite(ensemble[key]) and ensemble[key] > 0):
                return f"ensemble {key} must be a positive number (got {ensemble[key]!r})"
    if data.get("calibration", "none") not in ("none", "temperature", "vector"):
        return f"calibration must be none, temperature or vector (got {data.get('calibration')!r})"
    return None


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
