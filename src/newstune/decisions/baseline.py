"""The TF-IDF linear baseline every fine-tune must beat, on the run's own splits.

Word 1-2-grams and char_wb 2-5-grams (scikit-learn's TfidfVectorizer, fitted on the training split only) into a
LinearSVC; for multi-label data one LinearSVC per label (OneVsRestClassifier). LIAR texts that carry the speaker's
record get the record's numbers beside the words. C and the class weighting are chosen on validation by the run's
selection metric, each candidate with the run's own decision rule fitted on validation (temperature, binary
threshold, class biases or per-label thresholds, `tuning.fit_decision`); test is scored once, with the chosen
candidate. The test split is never passed to anything that chooses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix, hstack
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import FeatureUnion
from sklearn.svm import LinearSVC

from newstune.config import EvalSettings
from newstune.data.registry import DatasetBundle
from newstune.data.speaker_record import LIAR_CREDIT_FIELDS, record_numbers_from_text
from newstune.decisions.metrics import classification_metrics
from newstune.decisions.rule import Decision
from newstune.decisions.tuning import fit_decision

DESCRIPTION = "TF-IDF word 1-2 + char_wb 2-5 n-grams, LinearSVC"
C_GRID = (0.1, 0.3, 1.0)
CLASS_WEIGHTS = (None, "balanced")
MIN_DF_ROWS = 1000
RECORD_WIDTH = len(LIAR_CREDIT_FIELDS) + 1  # the record's five shares and log(1 + rated)
SUMMARY_KEYS = ("accuracy", "macro_f1", "micro_f1", "loss", "n")


def vectorizer(n_texts: int, words: bool = True) -> FeatureUnion:
    """sublinear tf on both views, n-grams seen in two or more texts (every n-gram on a small training split);
    fitted on training texts only."""
    min_df = 2 if n_texts >= MIN_DF_ROWS else 1
    views = [("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=min_df, sublinear_tf=True))]
    if words:
        views.insert(0, ("word", TfidfVectorizer(analyzer="word", ngram_range=(1, 2), min_df=min_df,
                                                 sublinear_tf=True)))
    return FeatureUnion(views)


def record_columns(texts: list[str]) -> csr_matrix | None:
    """The LIAR record's numbers (five shares, log(1 + rated)) when every text carries one; else None."""
    rows = [record_numbers_from_text(text) for text in texts]
    if not rows or any(row is None for row in rows):
        return None
    return csr_matrix(np.vstack(rows))


@dataclass
class Features:
    """Fitted on train; turns any split's texts into the baseline's feature matrix."""

    union: FeatureUnion
    with_record: bool

    @classmethod
    def fit(cls, texts: list[str]) -> Features:
        union = vectorizer(len(texts))
        try:
            union.fit(texts)
        except ValueError:  # no word of two or more letters in any text (codes, numbers): characters alone
            union = vectorizer(len(texts), words=False)
            union.fit(texts)
        return cls(union, record_columns(texts) is not None)

    def transform(self, texts: list[str]) -> csr_matrix:
        words = self.union.transform(texts)
        record = record_columns(texts) if self.with_record else None
        if self.with_record and record is None:  # a text without a record: zeros in the record's columns
            record = csr_matrix((len(texts), RECORD_WIDTH))
        return hstack([words, record]).tocsr() if record is not None else words


def classifier(c: float, class_weight: str | None, multi_label: bool):
    svc = LinearSVC(C=c, class_weight=class_weight, max_iter=5000)
    return OneVsRestClassifier(svc) if multi_label else svc


def margins(model, features: csr_matrix) -> np.ndarray:
    """Decision margins as logits, one column per class; binary: [0, margin] so that softmax = sigmoid(margin)."""
    scores = model.decision_function(features)
    if scores.ndim == 1:
        scores = np.stack([np.zeros_like(scores), scores], axis=1)
    return scores


def selection_score(metrics: dict, metric: str) -> float:
    # SVM margins have no likelihood worth selecting on: 'loss' runs choose the baseline by macro-F1.
    return metrics["macro_f1" if metric == "loss" else metric]


def summary(metrics: dict) -> dict:
    return {k: metrics[k] for k in SUMMARY_KEYS if k in metrics}


@dataclass
class ChosenBaseline:
    """The fitted baseline that won on validation: its features, classifier, decision rule and scores."""

    features: Features
    model: object
    c: float
    class_weight: str | None
    decision: Decision
    validation: dict
    validation_logits: np.ndarray
    candidates: list[dict]
    n_features: int
    seconds: float = 0.0  # fitting every candidate and choosing


def choose_baseline(bundle: DatasetBundle, metric: str, settings: EvalSettings) -> ChosenBaseline:
    """Fits every candidate on train and keeps the best by validation `metric`; never reads test."""
    start = time.perf_counter()
    multi_label = bool(bundle.info.get("multi_label"))
    train, valid = bundle.splits["train"], bundle.splits["validation"]
    train_y, valid_y = np.asarray(train.labels), np.asarray(valid.labels)
    features = Features.fit(train.texts)
    train_x, valid_x = features.transform(train.texts), features.transform(valid.texts)
    best, candidates = None, []
    for c in C_GRID:
        for weight in CLASS_WEIGHTS:
            model = classifier(c, weight, multi_label).fit(train_x, train_y)
            logits = margins(model, valid_x)
            decision = fit_decision(valid_y, logits, settings, multi_label)
            metrics = classification_metrics(valid_y, logits, bundle.label_names, decision)
            score = selection_score(metrics, metric)
            candidates.append({"C": c, "class_weight": weight or "none", metric: score})
            if best is None or score > best[0] + 1e-12:
                best = (score, ChosenBaseline(features, model, c, weight, decision, metrics, logits, candidates,
                                              int(train_x.shape[1])))
    best[1].seconds = time.perf_counter() - start
    return best[1]


def fit_baseline(bundle: DatasetBundle, metric: str, settings: EvalSettings, with_test: bool = True,
                 chosen: ChosenBaseline | None = None) -> dict:
    """The baseline's validation (and test) metrics, the chosen settings and every candidate's validation score.

    `chosen`: a choice already made on this bundle (a run that blends with the baseline fits it once)."""
    chosen = chosen or choose_baseline(bundle, metric, settings)
    start = time.perf_counter()
    result = {"model": DESCRIPTION + (" + the speaker record's numbers" if chosen.features.with_record else ""),
              "settings": {"C": chosen.c, "class_weight": chosen.class_weight or "none",
                           "chosen_by": f"validation {metric}"},
              "features": chosen.n_features,
              "candidates": chosen.candidates, "validation": chosen.validation,
              "decision": chosen.decision.to_dict()}
    if with_test:
        test = bundle.splits["test"]
        result["test"] = classification_metrics(np.asarray(test.labels),
                                                margins(chosen.model, chosen.features.transform(test.texts)),
                                                bundle.label_names, chosen.decision)
    result["fit_seconds"] = chosen.seconds + time.perf_counter() - start
    return result


def compact(result: dict) -> dict:
    """What a run's metrics.json keeps of the baseline: headline figures per split, no confusion matrices."""
    return {**{k: v for k, v in result.items() if k not in ("validation", "test", "decision")},
            **{split: summary(result[split]) for split in ("validation", "test") if split in result}}


def gain(metrics: dict, split: str, key: str) -> float | None:
    """The run's figure minus the baseline's on one split (None when either is missing)."""
    baseline = metrics.get("baseline", {}).get(split, {})
    if key not in baseline or key not in metrics.get(split, {}):
        return None
    return metrics[split][key] - baseline[key]

