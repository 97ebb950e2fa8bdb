"""What LIAR's speaker record is worth without an encoder: logistic regression, each credit_history mode.

Two classical baselines per mode, on exactly newstune's LIAR splits (binary labels): the record alone (five shares
and log(1 + rated statements)), and TF-IDF over the text newstune trains on (statement + metadata + the record as
text). C is chosen and the threshold tuned on validation for macro-F1; test is scored once. A leaky mode scoring
far above train_record shows what the leak was worth.

    python benchmarks/liar_history_baseline.py --data-dir ../shared/data/liar [--output docs/results/liar/baseline.json]
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
from scipy.sparse import hstack
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from newstune.config import DataConfig
from newstune.data.registry import LIAR_BINARY, find_file, liar_rows, read_liar
from newstune.data.speaker_record import record_numbers, with_speaker_records
from newstune.decisions.metrics import tune_threshold
from newstune.tables import markdown_table

MODES = ("off", "train_record", "exclude_self", "raw")
C_GRID = (0.25, 1.0, 4.0)


def best_on_validation(train_x, train_y, valid_x, valid_y) -> tuple[LogisticRegression, float]:
    """The C and threshold with the best validation macro-F1."""
    best = None
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=3000, class_weight="balanced").fit(train_x, train_y)
        threshold, score = tune_threshold(valid_y, model.predict_log_proba(valid_x))
        if best is None or score > best[2]:
            best = (model, threshold, score)
    return best[0], best[1]


def test_f1(model: LogisticRegression, threshold: float, test_x, test_y) -> float:
    return float(f1_score(test_y, (model.predict_proba(test_x)[:, 1] >= threshold).astype(int), average="macro"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    raw = {split: read_liar(find_file(args.data_dir, [name], split)).to_dict("records")
           for split, name in (("train", "train.tsv"), ("validation", "valid.tsv"), ("test", "test.tsv"))}
    labels = {split: np.array([LIAR_BINARY[r["label"]] == "true" for r in rows], dtype=int)
              for split, rows in raw.items()}
    results = []
    warnings.simplefilter("ignore")
    for mode in MODES:
        config = DataConfig(name="liar", dir=args.data_dir, credit_history=mode)
        texts = {split: [text for text, _ in rows] for split, rows in liar_rows(raw, config).items()}
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit(texts["train"])
        tfidf = {split: vectorizer.transform(texts[split]) for split in raw}
        row = {"mode": mode, "tfidf_text": None, "record_only": None, "tfidf_text_plus_record": None}
        model, threshold = best_on_validation(tfidf["train"], labels["train"], tfidf["validation"],
                                              labels["validation"])
        row["tfidf_text"] = test_f1(model, threshold, tfidf["test"], labels["test"])
        if mode != "off":
            records = {split: record_numbers(rows) for split, rows in with_speaker_records(raw, mode).items()}
            model, threshold = best_on_validation(records["train"], labels["train"], records["validation"],
                                                  labels["validation"])
            row["record_only"] = test_f1(model, threshold, records["test"], labels["test"])
            both = {split: hstack([tfidf[split], records[split]]).tocsr() for split in raw}
            model, threshold = best_on_validation(both["train"], labels["train"], both["validation"],
                                                  labels["validation"])
            row["tfidf_text_plus_record"] = test_f1(model, threshold, both["test"], labels["test"])
        results.append(row)
        print(json.dumps(row))
    table = []
    for row in results:
        cells = [f"{row[k]:.4f}" if row[k] is not None else "-" for k in
                 ("tfidf_text", "record_only", "tfidf_text_plus_record")]
        leaky = " (leaky)" if row["mode"] in ("raw", "exclude_self") else ""
        table.append([f"{row['mode']}{leaky}", *cells])
    print(markdown_table(["credit_history", "TF-IDF on the text", "record only", "TF-IDF + record numbers"], table))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
