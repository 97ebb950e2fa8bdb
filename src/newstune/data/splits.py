"""Labelled splits: the TextSplit container, label encoding, stratified hold-outs and class weights.

A multi-label split holds each row's labels as a 0/1 tuple over the label names (a multi-hot row).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from newstune.errors import NewstuneError

Label = int | tuple[int, ...]  # a class index, or a multi-hot row


@dataclass
class TextSplit:
    texts: list[str]
    labels: list[Label]
    origins: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.origins:
            self.origins = ["original"] * len(self.texts)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> TextSplit:
        return TextSplit([self.texts[i] for i in indices], [self.labels[i] for i in indices],
                         [self.origins[i] for i in indices])


def encode_labels(values: list[str], label_names: list[str], where: str) -> list[int]:
    """Label names -> indices into label_names; an unknown name is an error naming `where`."""
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(values) - set(index))
    if unknown:
        raise NewstuneError(
            f"{where}: unknown label value(s) {unknown[:5]}; known labels are {label_names} "
            "(fix the data or set data.label_names)"
        )
    return [index[v] for v in values]


def split_label_set(value: str | tuple[str, ...], separator: str) -> tuple[str, ...]:
    """A multi-label cell as label names: a JSON list (["a", "b"]) or names joined by `separator`; "" is none."""
    if isinstance(value, tuple):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError:
            names = None
        if not isinstance(names, list):
            raise NewstuneError(f"label cell {text[:60]!r} starts with '[' but is not a JSON list of names; "
                                f"write it as [\"a\", \"b\"] or as a{separator}b")
        return tuple(dict.fromkeys(str(name).strip() for name in names if str(name).strip()))
    return tuple(dict.fromkeys(part.strip() for part in text.split(separator) if part.strip()))


def encode_label_sets(values: list[tuple[str, ...]], label_names: list[str], where: str) -> list[tuple[int, ...]]:
    """Label-name sets -> multi-hot rows over label_names; an unknown name is an error naming `where`."""
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted({name for names in values for name in names} - set(index))
    if unknown:
        raise NewstuneError(f"{where}: unknown label value(s) {unknown[:5]}; known labels are {label_names[:20]} "
                            "(fix the data, set data.label_names, or data.top_labels to keep the frequent ones)")
    return [tuple(int(name in names) for name in label_names) for names in values]


def stratum(label: Label) -> int:
    """What a stratified split balances: the class, or for a multi-hot row its first label (-1: none)."""
    if isinstance(label, tuple):
        return label.index(1) if 1 in label else -1
    return label


def stratified_split(split: TextSplit, fraction: float, seed: int) -> tuple[TextSplit, TextSplit]:
    """Hold out `fraction` of every class (at least one row where a class has two or more).

    Not sklearn's train_test_split(stratify=...): it rejects a class with a single row, rejects a hold-out smaller
    than the number of classes, and may hold out no row of a small class (90/8/2 rows at 10% -> 9/1/0).
    """
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(split.labels):
        by_class.setdefault(stratum(label), []).append(index)
    kept, held = [], []
    for label in sorted(by_class):
        indices = by_class[label]
        rng.shuffle(indices)
        n_held = max(round(len(indices) * fraction), 1) if len(indices) > 1 else 0
        held += indices[:n_held]
        kept += indices[n_held:]
    return split.subset(sorted(kept)), split.subset(sorted(held))


def class_weights(labels: list[int], n_classes: int) -> list[float]:
    """sklearn's 'balanced' weights, n_rows / (n_classes * rows of the class); a class with no rows counts one."""
    labels_array = np.asarray(labels, dtype=int)
    present = np.unique(labels_array)
    weights = np.full(n_classes, len(labels_array) / n_classes, dtype=float)
    if len(present):
        # sklearn divides by the number of classes present; rescale to all n_classes.
        balanced = compute_class_weight("balanced", classes=present, y=labels_array)
        weights[present] = balanced * len(present) / n_classes
    return weights.tolist()


def positive_weights(labels: list[tuple[int, ...]]) -> list[float]:
    """Multi-label BCE pos_weight per label: negatives / positives in training (1 where a label has none)."""
    rows = np.asarray(labels, dtype=float)
    positives = rows.sum(axis=0)
    return np.where(positives > 0, (len(rows) - positives) / np.maximum(positives, 1), 1.0).tolist()
