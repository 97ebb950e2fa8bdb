"""One recipe trained over several seeds, summarised as the mean and spread of every figure."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import yaml

from newstune.config import RunConfig, dump_config, validate
from newstune.errors import Interrupted, NewstuneError
from newstune.run import (
    GROUP_FILE,
    METRICS_FILE,
    check_new_run_dir,
    is_seed_group,
    planned_run_dir,
    read_metrics,
    seed_run_dir,
    write_atomically,
)
from newstune.train import CHECKPOINT, resume, train

SUMMARY_FILE = "seeds.json"
SPLIT_FIGURES = ("accuracy", "macro_f1", "micro_f1", "loss")
BASELINE_FIGURES = ("accuracy", "macro_f1", "micro_f1")
EFFICIENCY_FIGURES = ("train_seconds", "epoch_seconds_mean", "train_samples_per_s", "train_tokens_per_s",
                      "peak_rss_mb")


def train_seeds(config: RunConfig, seeds: int, output_dir: Path | None = None) -> tuple[Path, dict]:
    """Trains the recipe with seeds train.seed, train.seed + 1, ... into GROUP/seed-N/; returns GROUP, summary."""
    if seeds < 2:
        raise NewstuneError(f"--seeds {seeds}: a spread needs at least 2 seeds; use plain `newstune train` for one")
    group = planned_run_dir(config, output_dir)
    check_new_run_dir(group)
    group.mkdir(parents=True)
    seed_list = [config.train.seed + i for i in range(seeds)]
    (group / GROUP_FILE).write_text(yaml.safe_dump({"seeds": seed_list, "recipe": yaml.safe_load(dump_config(config))},
                                                   sort_keys=False))
    return group, finish_seeds(group)


def train_or_resume(config: RunConfig | None, seeds: int, output_dir: Path | None,
                    resume_dir: Path | None) -> tuple[Path, dict]:
    """`train --seeds N` (a new group) or `train --resume GROUP` (finish one)."""
    if resume_dir is None:
        return train_seeds(config, seeds, output_dir)
    if not is_seed_group(resume_dir):
        raise NewstuneError(f"{resume_dir} is not a seed group (no {GROUP_FILE}); resume a single run without --seeds")
    planned = yaml.safe_load((resume_dir / GROUP_FILE).read_text())["seeds"]
    if seeds not in (1, len(planned)):
        raise NewstuneError(f"{resume_dir} was started with {len(planned)} seeds; drop --seeds to finish it")
    return resume_dir, finish_seeds(resume_dir)


def group_runs(group: Path) -> list[Path]:
    """The seed run folders of a group, in seed order."""
    spec = yaml.safe_load((Path(group) / GROUP_FILE).read_text())
    return [seed_run_dir(Path(group), seed) for seed in spec["seeds"]]


def finish_seeds(group: Path) -> dict:
    spec = yaml.safe_load((group / GROUP_FILE).read_text())
    for seed in spec["seeds"]:
        run_dir = seed_run_dir(group, seed)
        if (run_dir / METRICS_FILE).is_file():
            continue
        try:
            if (run_dir / CHECKPOINT).is_file():
                resume(run_dir)
                continue
            if run_dir.exists():  # stopped before its first checkpoint: kept aside, never deleted
                run_dir.rename(run_dir.with_name(f"{run_dir.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}"))
            config = validate(spec["recipe"], str(group / GROUP_FILE))
            config.train.seed = seed
            train(config, run_dir)
        except Interrupted:
            raise Interrupted(f"interrupted in {run_dir.name}; continue the group with: newstune train --resume "
                              f"{group}") from None
    summary = summarize(group_runs(group))
    write_atomically(group / SUMMARY_FILE, json.dumps(summary, indent=2))
    return summary


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
