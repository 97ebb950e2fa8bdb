"""The results table over seed groups (and single runs): one row each, every figure as mean ± spread."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from newstune.errors import NewstuneError
from newstune.rundir.run import (
    GROUP_FILE,
    METRICS_FILE,
    is_seed_group,
    read_config,
    read_metrics,
    require_run,
    seed_run_dir,
)
from newstune.tables import markdown_table

HEADER = ["run", "dataset", "model", "method", "seeds", "test accuracy", "test macro-F1", "validation macro-F1",
          "train minutes", "trainable params", "precision", "leaky"]
SPLIT_FIGURES = ("accuracy", "macro_f1", "micro_f1", "loss")
BASELINE_FIGURES = ("accuracy", "macro_f1", "micro_f1")
EFFICIENCY_FIGURES = ("train_seconds", "epoch_seconds_mean", "train_samples_per_s", "train_tokens_per_s",
                      "peak_rss_mb")


def group_runs(group: Path) -> list[Path]:
    """The seed run folders of a group, in seed order."""
    spec = yaml.safe_load((Path(group) / GROUP_FILE).read_text())
    return [seed_run_dir(Path(group), seed) for seed in spec["seeds"]]


def summarize(run_dirs: list[Path]) -> dict:
    """Mean, sample standard deviation and per-seed values of each split figure, class recall and speed figure."""
    metrics = [read_metrics(run_dir) for run_dir in run_dirs]
    labels = [sorted(m.get("test", m.get("validation", {})).get("per_class", {})) for m in metrics]
    for run_dir, run_labels in zip(run_dirs, labels):
        if run_labels != labels[0]:
            raise NewstuneError(f"{run_dir} has other classes than {run_dirs[0]}; summarise runs of one recipe")
    summary: dict = {"runs": [str(run_dir) for run_dir in run_dirs], "n": len(run_dirs)}
    for split in ("validation", "test", "holdout"):
        if all(split in m for m in metrics):
            figures = {name: spread([m[split][name] for m in metrics]) for name in SPLIT_FIGURES
                       if all(name in m[split] for m in metrics)}
            classes = metrics[0][split].get("per_class", {})
            figures["recall_per_class"] = {label: spread([m[split]["per_class"][label]["recall"] for m in metrics])
                                           for label in classes}
            summary[split] = figures
    baselines = [m.get("baseline", {}) for m in metrics]
    summary["baseline"] = {split: {name: spread([b[split][name] for b in baselines]) for name in BASELINE_FIGURES
                                   if all(name in b.get(split, {}) for b in baselines)}
                           for split in ("validation", "test") if all(split in b for b in baselines)}
    summary["efficiency"] = {name: spread([m["efficiency"][name] for m in metrics])
                             for name in EFFICIENCY_FIGURES if all(name in m.get("efficiency", {}) for m in metrics)}
    summary["leaky"] = any(m.get("leaky") for m in metrics)
    return summary


def spread(values: list[float]) -> dict:
    array = np.asarray(values, dtype=float)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "values": [float(v) for v in array]}


def summary_rows(summary: dict) -> list[list[str]]:
    """Terminal/markdown rows: split, figure, mean ± std, per-seed values."""
    rows = []
    for split in ("validation", "test", "holdout"):
        for name in SPLIT_FIGURES:
            if name in summary.get(split, {}):
                rows.append([split, name, *_cells(summary[split][name])])
    for split, figures in summary.get("baseline", {}).items():
        for name, figure in figures.items():
            rows.append([f"baseline {split}", name, *_cells(figure)])
    for name, figure in summary["efficiency"].items():
        rows.append(["train", name, *_cells(figure)])
    return rows


def _cells(figure: dict) -> list[str]:
    digits = 4 if abs(figure["mean"]) < 10 else 1
    return [mean_spread(figure, digits=digits), " ".join(f"{v:.{digits}f}" for v in figure["values"])]


def mean_spread(figure: dict | None, scale: float = 1.0, digits: int = 4) -> str:
    """'mean ± std' of a spread() figure ('-' when absent; no spread for one value)."""
    if figure is None:
        return "-"
    mean, std = figure["mean"] * scale, figure["std"] * scale
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(figure["values"]) > 1 else f"{mean:.{digits}f}"


def seed_row(path: Path) -> dict:
    """A group's (or a single run's) configuration and the mean and spread of its figures."""
    runs = group_runs(path) if is_seed_group(path) else [require_run(path)]
    unfinished = [str(run) for run in runs if not (run / METRICS_FILE).is_file()]
    if unfinished:
        raise NewstuneError(f"{path}: unfinished run(s) {unfinished}; finish them with newstune train --resume "
                            f"{path}")
    config = read_config(runs[0])
    summary = summarize(runs)
    metrics = read_metrics(runs[0])
    lora = config.lora
    method = "full" if lora.method != "lora" else (
        f"LoRA r={lora.r} {','.join(lora.target_modules or ['qv'])}"
        + (f" top {lora.top_layers}" if lora.top_layers else "")
        + (" cached" if config.train.cache_frozen_layers else ""))
    name = Path(path).name if not Path(path).name.startswith("seed-") else f"{Path(path).parent.name}/{Path(path).name}"
    return {"run": name, "dataset": config.data.name, "model": config.model.name, "method": method,
            "seeds": [read_config(run).train.seed for run in runs], "summary": summary,
            "trainable_params": metrics["efficiency"]["trainable_params"],
            "precision": metrics["efficiency"]["precision"], "leaky": summary["leaky"]}


def cells(row: dict) -> list[str]:
    summary = row["summary"]
    test, validation = summary.get("test", {}), summary.get("validation", {})
    return [row["run"], row["dataset"], row["model"], row["method"], str(len(row["seeds"])),
            mean_spread(test.get("accuracy")), mean_spread(test.get("macro_f1")),
            mean_spread(validation.get("macro_f1")),
            mean_spread(summary["efficiency"].get("train_seconds"), 1 / 60, 1), f"{row['trainable_params']:,}",
            row["precision"], "LEAKY" if row["leaky"] else "no"]


def write_seed_table(paths: list[Path], out_dir: Path) -> list[dict]:
    """results.md / results.json and a quality plot with error bars; prints the table."""
    from rich.console import Console
    from rich.table import Table

    rows = [seed_row(Path(path)) for path in paths]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(markdown_table(HEADER, [cells(row) for row in rows]) + "\n")
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    table = Table(title="results (mean ± sample std over seeds)")
    for title in HEADER:
        table.add_column(title, overflow="fold")
    for row in rows:
        table.add_row(*cells(row))
    Console(width=220).print(table)
    plot_quality(rows, out_dir / "results.png")
    return rows


def plot_quality(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = [row for row in rows if "test" in row["summary"]]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(max(5, 1.5 * len(rows)), 3.8))
    for offset, key in ((-0.2, "accuracy"), (0.2, "macro_f1")):
        figures = [row["summary"]["test"][key] for row in rows]
        ax.bar([i + offset for i in range(len(rows))], [f["mean"] for f in figures], 0.4,
               yerr=[f["std"] for f in figures], capsize=3, label=key)
    ax.set_xticks(range(len(rows)), [row["run"] for row in rows], rotation=15, fontsize=8)
    ax.set_title("test figures, mean ± std over seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
