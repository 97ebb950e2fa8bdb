"""Labelled splits: the TextSplit container, label encoding, stratified hold-outs and class weights."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from newstune.errors import NewstuneError


@dataclass
class TextSplit:
    texts: list[str]
    labels: list[int]
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


def stratified_split(split: TextSplit, fraction: float, seed: int) -> tuple[TextSplit, TextSplit]:
    """Hold out `fraction` of every class (at least one row where a class has two or more).

    Not sklearn's train_test_split(stratify=...): it rejects a class with a single row, rejects a hold-out smaller
    than the number of classes, and may hold out no row of a small class (90/8/2 rows at 10% -> 9/1/0).
    """
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(split.labels):
        by_class.setdefault(label, []).append(index)
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
