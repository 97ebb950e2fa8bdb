"""Metrics (scikit-learn), threshold tuning, and the plots/tables of a run's evaluation."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support  # noqa: E402

THRESHOLD_GRID = np.round(np.arange(0.05, 0.9501, 0.01), 2)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def decide(probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Argmax, or for two classes: class 1 when its probability reaches the tuned threshold."""
    if threshold is not None and probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).astype(int)
    return probs.argmax(axis=1)


def classification_metrics(labels: np.ndarray, logits: np.ndarray, label_names: list[str],
                           threshold: float | None = None) -> dict:
    labels = np.asarray(labels)
    probs = softmax(np.asarray(logits, dtype=np.float64))
    preds = decide(probs, threshold)
    classes = list(range(len(label_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, preds, labels=classes, zero_division=0)
    loss = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean()) if len(labels) else 0.0
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, labels=classes, average="macro", zero_division=0)),
        "loss": loss,
        "n": int(len(labels)),
        "threshold": threshold,
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(label_names)},
        "confusion_matrix": confusion_matrix(labels, preds, labels=classes).tolist(),
    }


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
