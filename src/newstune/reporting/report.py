"""Evaluate finished runs again (other splits, extra labelled sets) and report them side by side."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from newstune.data.batching import tokenize_texts
from newstune.data.registry import TextSplit, encode_labels, iter_file_rows, load_dataset
from newstune.data.text import clean_text
from newstune.decisions.metrics import classification_metrics, plot_confusion
from newstune.errors import NewstuneError
from newstune.paths import cache_dir
from newstune.rundir.run import LoadedRun, load_run, read_config, read_metrics, write_metrics
from newstune.tables import markdown_table


def evaluate_loaded(run: LoadedRun, split: TextSplit, batch_size: int = 64) -> dict:
    ids = tokenize_texts(run.tokenizer, split.texts, run.config.data.max_length, cache_dir() / "tokens")
    logits = run.logits(split.texts, ids, batch_size, progress=True)
    return classification_metrics(np.asarray(split.labels), logits, run.label_names, run.decision)


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


# ---------------------------------------------------------------- comparing runs

COLUMNS = [("run", "run"), ("dataset", "dataset"), ("model", "model"), ("method", "method"),
           ("precision", "precision"), ("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("recall", "recall/class"),
           ("baseline", "baseline"), ("vs_baseline", "vs baseline"),
           ("loss", "loss"), ("epoch_s", "epoch s"), ("samples_s", "train samples/s"), ("tokens_s", "tokens/s"),
           ("peak_mb", "peak RSS MB"), ("trainable", "trainable params"), ("size_mb", "saved MB"),
           ("latency_ms", "latency ms"), ("eval_s", "eval samples/s")]


def run_row(run_dir: Path, name: str | None = None, split: str = "test") -> dict:
    """One comparison row from a run directory (a failed run gives a row with its reason)."""

    run_dir = Path(run_dir)
    failure = run_dir / "FAILED"
    if failure.is_file():
        return {"run": name or run_dir.name, "status": "failed", "reason": failure.read_text().strip()}
    config = read_config(run_dir)
    metrics = read_metrics(run_dir)
    if split not in metrics:
        return {"run": name or run_dir.name, "status": "failed", "reason": f"no {split} metrics (unfinished run?)"}
    m, eff = metrics[split], metrics["efficiency"]
    method = "LoRA" if config.lora.method == "lora" else "full"
    if config.lora.method == "lora":
        method += f" r={config.lora.r} a={config.lora.alpha:g}"
    return {"run": name or run_dir.name, "status": "ok", "dataset": config.data.name, "model": config.model.name,
            "method": method, "precision": eff["precision"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "recall": " ".join(f"{c['recall']:.2f}" for c in m["per_class"].values()),
            "recall_per_class": {k: c["recall"] for k, c in m["per_class"].items()}, "loss": m["loss"],
            "epoch_s": eff["epoch_seconds_mean"], "samples_s": eff["train_samples_per_s"],
            "tokens_s": eff["train_tokens_per_s"], "peak_mb": eff["peak_rss_mb"], "trainable": eff["trainable_params"],
            "size_mb": eff["saved_model_mb"], "latency_ms": eff["latency_ms_median"],
            "eval_s": eff["eval_samples_per_s"], "history": _history(run_dir), **baseline_cells(metrics, split, config)}


def baseline_cells(metrics: dict, split: str, config) -> dict:
    """The run's TF-IDF baseline on the split, by the run's selection metric, and the run's gain over it."""
    key = "macro_f1" if config.train.metric == "loss" else config.train.metric
    base = metrics.get("baseline", {}).get(split)
    if not base or key not in base:
        return {"baseline": "-", "vs_baseline": "-"}
    return {"baseline": f"{base[key]:.4f} {key}", "vs_baseline": f"{metrics[split][key] - base[key]:+.4f}"}


def _history(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if value < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown(rows: list[dict]) -> str:
    cells = [[_cell(row[key]) for key, _ in COLUMNS] if row["status"] == "ok"
             else [row["run"], f"failed: {row['reason']}"] for row in rows]
    return markdown_table([title for _, title in COLUMNS], cells)


REPORT_FILES = ("comparison.md", "comparison.json", "comparison.csv", "results.md", "results.json")


def refuse_earlier_report(out_dir: Path) -> None:
    """`report` writes into a folder (default ./report): an earlier report there is a result, never overwritten."""
    found = [name for name in REPORT_FILES if (Path(out_dir) / name).exists()]
    if found:
        raise NewstuneError(f"{out_dir} already holds a report ({found[0]}); choose another --output-dir "
                            "(reports are never overwritten)")


def write_report(rows: list[dict], out_dir: Path, console_title: str = "comparison") -> None:
    """comparison.md / .csv / .json and the plots; prints the table."""
    import csv

    from rich.console import Console
    from rich.table import Table

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.md").write_text(markdown(rows) + "\n")
    (out_dir / "comparison.json").write_text(json.dumps(rows, indent=1))
    with (out_dir / "comparison.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["status", "reason", *(k for k, _ in COLUMNS)],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = Table(title=console_title)
    for _, title in COLUMNS:
        table.add_column(title, overflow="fold")
    for row in rows:
        table.add_row(*([_cell(row.get(k, "")) for k, _ in COLUMNS] if row["status"] == "ok"
                        else [row["run"], f"FAILED: {row['reason']}", *[""] * (len(COLUMNS) - 2)]))
    Console(width=220).print(table)
    plot_comparison([r for r in rows if r["status"] == "ok"], out_dir)


def plot_comparison(rows: list[dict], out_dir: Path) -> None:
    import matplotlib.pyplot as plt

    if not rows:
        return
    names = [r["run"] for r in rows]
    for filename, keys, title in (("quality.png", ["accuracy", "macro_f1"], "quality (test)"),
                                  ("time.png", ["epoch_s"], "seconds per epoch"),
                                  ("memory.png", ["peak_mb"], "peak RSS (MB)")):
        fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows)), 3.6))
        width = 0.8 / len(keys)
        for i, key in enumerate(keys):
            positions = [j + i * width for j in range(len(rows))]
            bars = ax.bar(positions, [r[key] for r in rows], width, label=key)
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks([j + width * (len(keys) - 1) / 2 for j in range(len(rows))], names, rotation=15, fontsize=8)
        ax.set_title(title)
        if len(keys) > 1:
            ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / filename, dpi=110)
        plt.close(fig)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for row in rows:
        train = [h for h in row["history"] if h["kind"] == "train"]
        evals = [h for h in row["history"] if h["kind"] == "eval"]
        left.plot([h["step"] for h in train], [h["loss"] for h in train], label=row["run"])
        right.plot([h["step"] for h in evals], [h["macro_f1"] for h in evals], "o-", label=row["run"])
    left.set_title("train loss")
    right.set_title("validation macro-F1")
    for ax in (left, right):
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=110)
    plt.close(fig)


def report_runs(run_dirs: list[Path], out_dir: Path) -> list[dict]:
    rows = [run_row(d) for d in run_dirs]
    write_report(rows, out_dir)
    return rows
