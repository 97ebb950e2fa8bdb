"""One-vs-rest logistic regression on TF-IDF for a multi-label recipe, on exactly the recipe's splits.

The baseline gets the same treatment as the newstune run: C chosen on validation, per-label thresholds tuned on
validation (newstune's own tune_label_thresholds), test evaluated once with newstune's metrics.

    python benchmarks/multilabel_baseline.py recipes/liar_subjects/minilm_lora.yaml --data-dir ../shared/data/liar \
        [--run /work/runs/liar_subjects_minilm] --output docs/results/liar_subjects/baseline.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.multiclass import OneVsRestClassifier

from newstune.config import load_config
from newstune.data.registry import load_dataset
from newstune.decisions.metrics import multilabel_metrics
from newstune.decisions.rule import Decision
from newstune.decisions.tuning import tune_label_thresholds

C_GRID = (1.0, 4.0, 16.0)
KEYS = ("micro_f1", "macro_f1", "subset_accuracy", "hamming_loss", "ece", "n")


def fit(texts: list[str], labels: np.ndarray, c: float) -> tuple[TfidfVectorizer, OneVsRestClassifier]:
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    features = vectorizer.fit_transform(texts)
    model = OneVsRestClassifier(LogisticRegression(C=c, solver="liblinear", max_iter=2000)).fit(features, labels)
    return vectorizer, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--run", type=Path, help="a newstune run of the recipe, for the side-by-side figures")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    config = load_config(args.recipe, [f"data.dir={args.data_dir}"] if args.data_dir else [])
    bundle = load_dataset(config.data, config.train.seed)
    split = {name: (part.texts, np.asarray(part.labels)) for name, part in bundle.splits.items()}
    best = None
    for c in C_GRID:
        vectorizer, model = fit(*split["train"], c)
        probs = model.predict_proba(vectorizer.transform(split["validation"][0]))
        score = f1_score(split["validation"][1], probs >= 0.5, average="micro", zero_division=0)
        if best is None or score > best[0]:
            best = (score, c, vectorizer, model, probs)
    _, c, vectorizer, model, val_probs = best
    decision = Decision(multi_label=True, label_thresholds=tune_label_thresholds(split["validation"][1], val_probs))
    test_probs = model.predict_proba(vectorizer.transform(split["test"][0]))
    test = multilabel_metrics(split["test"][1], test_probs, bundle.label_names, decision)
    at_half = multilabel_metrics(split["test"][1], test_probs, bundle.label_names, Decision(multi_label=True))
    result = {"baseline": "OneVsRest(LogisticRegression) on TF-IDF word 1-2grams", "C": c,
              "rows": bundle.info["rows"], "test_tuned_thresholds": {k: test[k] for k in KEYS},
              "test_threshold_0.5": {k: at_half[k] for k in KEYS}}
    if args.run:
        run_test = json.loads((args.run / "metrics.json").read_text())["test"]
        result["newstune_test"] = {k: run_test[k] for k in KEYS}
    print(json.dumps(result, indent=1))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
