"""The results table over seed groups (and single runs): one row each, every figure as mean ± spread."""

from __future__ import annotations

import json
from pathlib import Path

from newstune.errors import NewstuneError
from newstune.run import METRICS_FILE, read_config, read_metrics, require_run
from newstune.seeds import group_runs, is_seed_group, mean_spread, summarize
from newstune.tables import markdown_table

HEADER = ["run", "dataset", "model", "method", "seeds", "test accuracy", "test macro-F1", "validation macro-F1",
          "train minutes", "trainable params", "precision", "leaky"]


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
