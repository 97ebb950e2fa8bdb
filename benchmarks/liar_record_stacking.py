"""LIAR's speaker record as numbers next to the encoder: a logistic layer over a trained run's logit and the record.

For each run (or each seed of a seed group) the run's model scores validation and test. A logistic regression is
fitted on validation only, over the encoder's margin (logit of "true" minus logit of "fake") and the leak-free
speaker record as numbers (`train_record`: five shares and log(1 + rated statements)); its threshold is tuned on
validation for macro-F1 and test is scored once. The control fits the same layer on the margin alone, so a gain
over the control is the record's, not a re-fitted threshold's. C is chosen by 5-fold cross-validation on validation.

    python benchmarks/liar_record_stacking.py runs/liar_meta runs/liar_history --data-dir ../shared/data/liar
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import f1_score

from newstune.data.batching import tokenize_texts
from newstune.data.registry import LIAR_BINARY, find_file, load_dataset, read_liar
from newstune.data.speaker_record import record_numbers, with_speaker_records
from newstune.decisions.metrics import tune_threshold
from newstune.modeling.infer import predict_logits
from newstune.paths import cache_dir
from newstune.reporting.seed_table import group_runs, mean_spread, spread
from newstune.rundir.run import is_seed_group, load_run, read_metrics
from newstune.tables import markdown_table

SPLITS = (("train", "train.tsv"), ("validation", "valid.tsv"), ("test", "test.tsv"))


def margins(run_dir: Path, data_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(logit of class 1 minus class 0, labels) for validation and test, in the files' row order."""
    run = load_run(run_dir)
    if run.label_names != ["fake", "true"]:
        raise SystemExit(f"{run_dir}: a binary LIAR run is needed (labels {run.label_names})")
    data = run.config.data.model_copy(update={"dir": data_dir})
    bundle = load_dataset(data, run.config.train.seed)
    out = {}
    for split in ("validation", "test"):
        ids = tokenize_texts(run.tokenizer, bundle.splits[split].texts, data.max_length, cache_dir() / "tokens")
        logits = predict_logits(run.model, ids, run.tokenizer.pad_token_id, 64, run.precision).numpy()
        out[split] = (logits[:, 1] - logits[:, 0], np.asarray(bundle.splits[split].labels))
    return out


def stacked_f1(valid_x: np.ndarray, valid_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    model = LogisticRegressionCV(Cs=[0.1, 1.0, 10.0], cv=5, scoring="neg_log_loss", max_iter=3000)
    model.fit(valid_x, valid_y)
    threshold, _ = tune_threshold(valid_y, model.predict_log_proba(valid_x))
    return float(f1_score(test_y, (model.predict_proba(test_x)[:, 1] >= threshold).astype(int), average="macro"))


def score_run(run_dir: Path, data_dir: Path, record: dict[str, np.ndarray], file_labels: dict[str, np.ndarray]) -> dict:
    scored = margins(run_dir, data_dir)
    for split, (_, labels) in scored.items():
        if not np.array_equal(labels, file_labels[split]):  # the record rows must be the scored rows, in order
            raise SystemExit(f"{run_dir}: the {split} rows differ from the LIAR file's ({len(labels)} scored)")
    (valid_m, valid_y), (test_m, test_y) = scored["validation"], scored["test"]
    both = {split: np.column_stack([scored[split][0], record[split]]) for split in scored}
    return {"run": str(run_dir),
            "encoder": read_metrics(run_dir)["test"]["macro_f1"],
            "margin_layer": stacked_f1(valid_m[:, None], valid_y, test_m[:, None], test_y),
            "margin_plus_record": stacked_f1(both["validation"], valid_y, both["test"], test_y)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="LIAR binary runs or seed groups")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    raw = {split: read_liar(find_file(args.data_dir, [name], split)).to_dict("records") for split, name in SPLITS}
    record = {split: record_numbers(rows) for split, rows in with_speaker_records(raw, "train_record").items()}
    file_labels = {split: np.array([LIAR_BINARY[row["label"]] == "true" for row in rows], dtype=int)
                   for split, rows in raw.items()}
    results, table = [], []
    for path in args.runs:
        rows = [score_run(run_dir, args.data_dir, record, file_labels)
                for run_dir in (group_runs(path) if is_seed_group(path) else [path])]
        results += rows
        cells = [mean_spread(spread([row[key] for row in rows])) for key in
                 ("encoder", "margin_layer", "margin_plus_record")]
        table.append([path.name, str(len(rows)), *cells])
    print(markdown_table(["runs", "seeds", "encoder (its own rule)", "logistic layer on the margin",
                          "+ record numbers"], table))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
