"""Metrics (scikit-learn), threshold tuning, and the plots/tables of a run's evaluation."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    hamming_loss,
    log_loss,
    precision_recall_fscore_support,
)

from newstune.decisions import rule as decisions  # noqa: E402
from newstune.decisions.rule import Decision, as_decision  # noqa: E402

THRESHOLD_GRID = np.round(np.arange(0.05, 0.9501, 0.01), 2)
ECE_BINS = 15


def softmax(logits: np.ndarray) -> np.ndarray:
    return decisions.probabilities(logits)


def decide(probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Argmax, or for two classes: class 1 when its probability reaches the tuned threshold."""
    return decisions.labels(probs, Decision(threshold=threshold))


def classification_metrics(labels: np.ndarray, logits: np.ndarray, label_names: list[str],
                           decision: Decision | float | None = None) -> dict:
    """A split's metrics under the run's decision rule (a bare float is a binary threshold)."""
    decision = as_decision(decision)
    labels = np.asarray(labels)
    probs = decisions.probabilities(logits, decision)
    if decision.multi_label:
        return multilabel_metrics(labels, probs, label_names, decision)
    preds = decisions.labels(probs, decision)
    classes = list(range(len(label_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, preds, labels=classes, zero_division=0)
    loss = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean()) if len(labels) else 0.0
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, labels=classes, average="macro", zero_division=0)),
        "loss": loss,
        **{k: v for k, v in calibration_scores(labels, probs, decision).items() if k != "log_loss"},
        "n": int(len(labels)),
        "threshold": decision.threshold,
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(label_names)},
        "confusion_matrix": confusion_matrix(labels, preds, labels=classes).tolist(),
    }


def multilabel_metrics(labels: np.ndarray, probs: np.ndarray, label_names: list[str], decision: Decision) -> dict:
    """Micro/macro-F1, subset accuracy (also reported as `accuracy`), Hamming loss, per-label scores and support."""
    truth = labels.reshape(len(labels), len(label_names)).astype(int)
    preds = decisions.labels(probs, decision)
    precision, recall, f1, support = precision_recall_fscore_support(truth, preds, zero_division=0)
    subset = float(accuracy_score(truth, preds)) if len(truth) else 0.0
    scores = calibration_scores(truth, probs, decision)
    return {
        "accuracy": subset, "subset_accuracy": subset,
        "micro_f1": float(f1_score(truth, preds, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(truth, preds, average="macro", zero_division=0)),
        "hamming_loss": float(hamming_loss(truth, preds)) if len(truth) else 0.0,
        "loss": scores.pop("log_loss"), **scores, "n": int(len(truth)),
        "labels_per_text": {"true": float(truth.sum(1).mean()) if len(truth) else 0.0,
                            "predicted": float(preds.sum(1).mean()) if len(truth) else 0.0},
        "label_thresholds": decision.label_thresholds,
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(label_names)},
    }


def reliability_bins(confidence: np.ndarray, outcome: np.ndarray, bins: int = ECE_BINS) -> list[tuple]:
    """(mean confidence, mean outcome, count) of every non-empty equal-width bin, from scikit-learn's
    calibration_curve; the counts use its own bin rule (searchsorted on the inner edges), so they line up."""
    if len(confidence) == 0:
        return []
    observed, predicted = calibration_curve(outcome, confidence, n_bins=bins, strategy="uniform")
    counts = np.bincount(np.searchsorted(np.linspace(0.0, 1.0, bins + 1)[1:-1], confidence), minlength=bins)
    return list(zip(predicted.tolist(), observed.tolist(), counts[counts > 0].tolist(), strict=True))


def expected_calibration_error(confidence: np.ndarray, outcome: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over equal-width confidence bins of |mean outcome - mean confidence|, weighted by the bin's share."""
    points = reliability_bins(confidence, outcome, bins)
    gaps = sum(count * abs(observed - predicted) for predicted, observed, count in points)
    return float(gaps / max(len(confidence), 1))


def confidence_outcome(labels: np.ndarray, probs: np.ndarray, decision: Decision) -> tuple[np.ndarray, np.ndarray]:
    """What ECE bins: the top class's probability and whether it is right; multi-label: every label's probability
    and whether the label applies."""
    if decision.multi_label:
        return probs.ravel(), labels.ravel().astype(float)
    return probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(float)


def calibration_scores(labels: np.ndarray, probs: np.ndarray, decision: Decision) -> dict:
    """ECE (15 bins), Brier score and log loss of the probabilities."""
    if len(labels) == 0:
        return {"ece": 0.0, "brier": 0.0, "log_loss": 0.0}
    probs = np.clip(probs, 1e-12, 1 - 1e-12)
    if decision.multi_label:
        truth, flat = labels.ravel(), probs.ravel()
        brier, loss = brier_score_loss(truth, flat, labels=[0, 1]), log_loss(truth, flat, labels=[0, 1])
    else:
        classes = list(range(probs.shape[1]))
        brier = brier_score_loss(labels, probs, labels=classes)
        loss = log_loss(labels, probs / probs.sum(1, keepdims=True), labels=classes)
    return {"ece": expected_calibration_error(*confidence_outcome(labels, probs, decision)), "brier": float(brier),
            "log_loss": float(loss)}


def calibration_report(labels: np.ndarray, logits: np.ndarray, decision: Decision) -> dict:
    """ECE, Brier and log loss of the raw probabilities (before) and of the calibrated ones (after)."""
    labels = np.asarray(labels)
    before = calibration_scores(labels, decisions.probabilities(logits, decision.uncalibrated()), decision)
    after = calibration_scores(labels, decisions.probabilities(logits, decision), decision)
    return {**{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()}}


def tune_threshold(labels: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """The threshold on P(class 1) in 0.05..0.95 that maximises macro-F1 (ties: the one nearest 0.5)."""
    probs = softmax(np.asarray(logits, dtype=np.float64))
    best = (0.5, -1.0)
    for threshold in sorted(THRESHOLD_GRID, key=lambda t: abs(t - 0.5)):
        score = f1_score(labels, decide(probs, threshold), average="macro", zero_division=0)
        if score > best[1] + 1e-12:
            best = (float(threshold), float(score))
    return best


def plot_confusion(matrix: list[list[int]], label_names: list[str], path: Path, title: str) -> None:
    cm = np.asarray(matrix)
    size = max(4.0, 0.45 * len(label_names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(label_names)), label_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(label_names)), label_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(label_names) <= 12:
        for (i, j), value in np.ndenumerate(cm):
            ax.text(j, i, str(value), ha="center", va="center",
                    color="white" if value > cm.max() / 2 else "black", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(labels: np.ndarray, logits: np.ndarray, decision: Decision, path: Path, title: str) -> None:
    """Reliability diagram: observed frequency against predicted probability, before and after calibration."""
    labels = np.asarray(labels)
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    for name, rule, style in (("before", decision.uncalibrated(), "s--"), ("after", decision, "o-")):
        probs = decisions.probabilities(logits, rule)
        confidence, outcome = confidence_outcome(labels, probs, decision)
        points = reliability_bins(confidence, outcome)
        ece = expected_calibration_error(confidence, outcome)
        ax.plot([p[0] for p in points], [p[1] for p in points], style, label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("predicted probability (label probabilities)" if decision.multi_label else "confidence")
    ax.set_ylabel("observed frequency" if decision.multi_label else "accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training_curves(history: list[dict], path: Path, title: str = "") -> None:
    """Train loss per logged step and validation metrics per evaluation."""
    steps = [h for h in history if h.get("kind") == "train"]
    evals = [h for h in history if h.get("kind") == "eval"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    # markers, so that a run with a single logged point still shows it
    left.plot([h["step"] for h in steps], [h["loss"] for h in steps], ".-", label="train loss")
    left.plot([h["step"] for h in evals], [h["loss"] for h in evals], "o-", label="validation loss")
    left.set_xlabel("optimizer step")
    left.legend()
    for key in ("accuracy", "macro_f1"):
        right.plot([h["step"] for h in evals], [h[key] for h in evals], "o-", label=f"validation {key}")
    right.set_xlabel("optimizer step")
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def metrics_table(metrics: dict, label_names: list[str]) -> list[list[str]]:
    """Rows for a terminal table: one per split, with per-class recall."""
    rows = []
    for split in ("validation", "test", *sorted(k for k in metrics if k.startswith("extra:"))):
        if split not in metrics:
            continue
        m = metrics[split]
        recalls = " ".join(f"{m['per_class'][n]['recall']:.2f}" for n in label_names[:8])
        rows.append([split, f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}", f"{m['loss']:.4f}", str(m["n"]), recalls])
    return rows
