"""Evaluate finished runs again (other splits, extra labelled sets) and report them side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from newstune.data.batching import tokenize_texts
from newstune.data.registry import TextSplit, encode_labels, iter_file_rows, load_dataset
from newstune.data.text import clean_text
from newstune.errors import NewstuneError
from newstune.evaluate import classification_metrics, plot_confusion
from newstune.model import cache_dir, predict_logits
from newstune.run import LoadedRun, load_run, read_metrics, write_metrics


def evaluate_loaded(run: LoadedRun, split: TextSplit, batch_size: int = 64) -> dict:
    ids = tokenize_texts(run.tokenizer, split.texts, run.config.data.max_length, cache_dir() / "tokens")
    logits = predict_logits(run.model, ids, run.tokenizer.pad_token_id, batch_size, run.precision, progress=True)
    return classification_metrics(np.asarray(split.labels), logits.numpy(), run.label_names, run.threshold)


def read_extra_split(spec: str, run: LoadedRun) -> tuple[str, TextSplit]:
    """NAME=FILE, read with the run's column mapping (data.text_columns / data.label_column)."""
    if "=" not in spec:
        raise NewstuneError(f"--extra-eval '{spec}' is not NAME=FILE (e.g. huffpost_ood=ood.jsonl)")
    name, path = spec.split("=", 1)
    data = run.config.data.model_copy(update={"text_columns": run.config.data.text_columns or ["text"]})
    rows = [(clean_text(text, data.clean), label) for _, text, label in iter_file_rows(Path(path), data)]
    labels = encode_labels([label for _, label in rows], run.label_names, f"{path}")
    return name, TextSplit([text for text, _ in rows], labels)


def evaluate_run(run_dir: Path, split: str, extra_eval: list[str], data_dir: Path | None = None) -> tuple[dict, list]:
    if split not in ("validation", "test"):
        raise NewstuneError(f"--split {split}: choose validation or test")
    run = load_run(Path(run_dir))
    data = run.config.data if data_dir is None else run.config.data.model_copy(update={"dir": data_dir})
    metrics = read_metrics(run.run_dir)
    bundle = load_dataset(data, run.config.train.seed)
    if bundle.label_names != run.label_names:
        raise NewstuneError(f"the data's labels {bundle.label_names} differ from the run's {run.label_names}")
    metrics[split] = evaluate_loaded(run, bundle.splits[split])
    for spec in extra_eval:
        name, extra = read_extra_split(spec, run)
        metrics[f"extra:{name}"] = evaluate_loaded(run, extra)
        plot_confusion(metrics[f"extra:{name}"]["confusion_matrix"], run.label_names,
                       run.run_dir / f"confusion_extra_{name}.png", f"{run.config.name}: {name}")
    write_metrics(run.run_dir, metrics)
    return metrics, run.label_names
