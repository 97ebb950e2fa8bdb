"""Search over configs: `compare` trains fixed variants of one recipe; `sweep` searches a grid with Optuna."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from newstune.config import RunConfig, apply_overrides, dump_config, load_config, parse_override, validate
from newstune.errors import NewstuneError
from newstune.report import run_row, write_report

# The seed projects' question: what do AMP and LoRA buy? Full fine-tuning needs a far smaller learning rate.
DEFAULT_VARIANTS = [
    "full_fp32:lora.method=full,train.precision=fp32,train.lr=5e-5",
    "full_amp:lora.method=full,train.precision=auto,train.lr=5e-5",
    "lora_amp:lora.method=lora,train.precision=auto",
]


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """'name:key=value,key=value' -> (name, ['key=value', ...])."""
    if ":" not in spec:
        raise NewstuneError(f"--variant '{spec}' is not name:key=value,... (e.g. lora_r8:lora.r=8)")
    name, body = spec.split(":", 1)
    overrides = [item for item in body.split(",") if item]
    for item in overrides:
        parse_override(item)
    return name, overrides


def train_in_subprocess(recipe: Path, overrides: list[str], run_dir: Path, log_path: Path) -> bool:
    """One training run in its own process, so each run's peak memory is its own. False when it failed."""
    command = [sys.executable, "-m", "newstune.cli", "train", str(recipe), "--output-dir", str(run_dir),
               *(arg for item in overrides for arg in ("--set", item))]
    with log_path.open("w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    if result.returncode == 0:
        return True
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    reason = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "unknown")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "FAILED").write_text(reason[:300] + "\n")
    return False


def compare(recipe: Path, overrides: list[str], variants: list[str] | None, out_dir: Path | None) -> list[dict]:
    config = load_config(recipe, overrides)
    out_dir = out_dir or config.output_dir / f"compare-{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out_dir.exists():
        raise NewstuneError(f"comparison folder {out_dir} already exists; choose another --output-dir")
    parsed = [parse_variant(v) for v in (variants or DEFAULT_VARIANTS)]
    for _, variant_overrides in parsed:
        load_config(recipe, [*overrides, *variant_overrides])  # fail fast on a bad key, before any training
    out_dir.mkdir(parents=True)
    rows = []
    for name, variant_overrides in parsed:
        print(f"== variant {name}: {' '.join(variant_overrides)}", file=sys.stderr, flush=True)
        run_dir = out_dir / name
        train_in_subprocess(recipe, [*overrides, *variant_overrides], run_dir, out_dir / f"{name}.log")
        rows.append(run_row(run_dir, name))
    write_report(rows, out_dir, f"compare {config.name}")
    return rows


# ---------------------------------------------------------------- sweeps


def parse_grid(items: list[str]) -> dict[str, list]:
    """['lora.r=4,8', 'lora.target_modules=qv,qkv'] -> {'lora.r': [4, 8], 'lora.target_modules': ['qv', 'qkv']}."""
    grid = {}
    for item in items:
        if "=" not in item:
            raise NewstuneError(f"--grid '{item}' is not key=v1,v2,...")
        key, values = item.split("=", 1)
        grid[key] = [yaml.safe_load(v) for v in values.split(",")]
    return grid


def trainable_parameters(config: RunConfig) -> int:
    """LoRA + head parameters of a config, counted on the real model before any training."""
    from newstune.data.registry import load_dataset
    from newstune.model import build_model, count_parameters

    labels = load_dataset(config.data, config.train.seed).label_names
    return count_parameters(build_model(config.model, config.lora, labels).model)["trainable"]


def config_for(base_raw: dict, params: dict) -> RunConfig:
    raw = apply_overrides(json.loads(json.dumps(base_raw)), [f"{k}={json.dumps(v)}" for k, v in params.items()])
    return validate(raw, "sweep")


def sweep(recipe: Path, overrides: list[str], grid_items: list[str], out_dir: Path | None,
          max_trainable: int | None, sampler: str = "grid", trials: int | None = None, metric: str | None = None,
          resume: bool = False) -> list[dict]:
    """Optuna study in out_dir/study.db: interruptible and resumable; parallel workers may share it."""
    import optuna

    base = load_config(recipe, overrides)
    base_raw = yaml.safe_load(dump_config(base))
    grid = parse_grid(grid_items)
    metric = metric or base.train.metric
    out_dir = out_dir or base.output_dir / f"sweep-{base.name}"
    if out_dir.exists() and not resume:
        raise NewstuneError(f"sweep folder {out_dir} exists; add --resume to continue it or choose --output-dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    budget = filter_budget(base_raw, combos, max_trainable, out_dir)
    # Heartbeats let a resumed (or parallel) sweep retry trials of a worker that was killed mid-trial.
    storage = optuna.storages.RDBStorage(f"sqlite:///{out_dir / 'study.db'}", heartbeat_interval=30,
                                         grace_period=90)
    samplers = {"grid": optuna.samplers.RandomSampler, "random": optuna.samplers.RandomSampler,
                "tpe": optuna.samplers.TPESampler}
    study = optuna.create_study(study_name=base.name, storage=storage, load_if_exists=True,
                                direction="minimize" if metric == "loss" else "maximize",
                                sampler=samplers[sampler](seed=base.train.seed))
    optuna.storages.fail_stale_trials(study)

    def objective(trial: optuna.Trial) -> float:
        params = {key: trial.suggest_categorical(key, values) for key, values in grid.items()}
        key = json.dumps(params, sort_keys=True)
        if key in budget["skipped"]:
            trial.set_user_attr("skipped", budget["skipped"][key])
            raise optuna.TrialPruned(f"over the trainable-parameter budget: {budget['skipped'][key]:,}")
        run_dir = out_dir / f"trial-{trial.number:03d}"
        if run_dir.exists():
            run_dir = out_dir / f"trial-{trial.number:03d}-{int(time.time())}"
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("trainable", budget["counts"].get(key))
        override_list = [f"{k}={json.dumps(v)}" for k, v in params.items()] + ["eval.test=false"]
        if not train_in_subprocess(recipe, [*overrides, *override_list], run_dir, out_dir / f"{run_dir.name}.log"):
            raise optuna.TrialPruned((run_dir / "FAILED").read_text().strip())
        metrics = json.loads((run_dir / "metrics.json").read_text())
        validation = {k: metrics["validation"][k] for k in ("accuracy", "macro_f1", "loss")}
        trial.set_user_attr("validation", validation)
        trial.set_user_attr("trainable", metrics["efficiency"]["trainable_params"])
        return -validation["loss"] if metric == "loss" else validation[metric]

    if sampler == "grid":
        # A trial killed outright stays RUNNING until its heartbeat goes stale; re-check after every trial.
        for _attempt in range(2 * len(combos)):
            optuna.storages.fail_stale_trials(study)
            pending = pending_grid_points(study, combos)
            if not pending:
                break
            study.enqueue_trial(pending[0])
            study.optimize(objective, n_trials=1)
    else:
        finished = [t for t in study.trials if t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL]
        study.optimize(objective, n_trials=max(0, (trials or 0) - len(finished)))
    return summarise_sweep(study, out_dir, recipe, overrides, metric, base_raw)


def pending_grid_points(study, combos: list[dict]) -> list[dict]:
    """Grid points not yet done (complete or skipped) nor running; a failed or interrupted one is tried again."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
    taken = {json.dumps(t.params, sort_keys=True) for t in study.trials if t.state in states}
    return [params for params in combos if json.dumps(params, sort_keys=True) not in taken]


def filter_budget(base_raw: dict, combos: list[dict], max_trainable: int | None, out_dir: Path) -> dict:
    """Counts trainable parameters of every configuration before training; those over budget are skipped."""
    counts, skipped = {}, {}
    if max_trainable is not None:
        for params in combos:
            key = json.dumps(params, sort_keys=True)
            counts[key] = trainable_parameters(config_for(base_raw, params))
            if counts[key] > max_trainable:
                skipped[key] = counts[key]
                print(f"skip {params}: {counts[key]:,} trainable > budget {max_trainable:,}", file=sys.stderr)
    (out_dir / "budget.json").write_text(json.dumps({"max_trainable": max_trainable, "counts": counts,
                                                     "skipped": skipped}, indent=1))
    return {"counts": counts, "skipped": skipped}


def summarise_sweep(study, out_dir: Path, recipe: Path, overrides: list[str], metric: str, base_raw: dict) -> list:
    import matplotlib.pyplot as plt
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    rows = sorted(({"trial": t.number, **t.params, **t.user_attrs["validation"],
                    "trainable": t.user_attrs["trainable"], "run_dir": t.user_attrs["run_dir"]} for t in done),
                  key=lambda r: r["loss"] if metric == "loss" else -r[metric])
    (out_dir / "sweep.json").write_text(json.dumps(rows, indent=1))
    if not rows:
        return rows
    keys = [k for k in rows[0] if k not in ("run_dir",)]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |"
              for r in rows]
    (out_dir / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["trainable"] for r in rows], [r[metric] for r in rows])
    for r in rows:
        ax.annotate(str(r["trial"]), (r["trainable"], r[metric]), fontsize=7)
    ax.set_xlabel("trainable parameters (LoRA + head)")
    ax.set_ylabel(f"validation {metric}")
    fig.tight_layout()
    fig.savefig(out_dir / "metric_vs_params.png", dpi=110)
    plt.close(fig)
    best = rows[0]
    best_config = config_for(base_raw, {k: best[k] for k in study.best_trial.params})
    best_config.name = f"{base_raw.get('name') or recipe.stem}_best"
    (out_dir / "best_recipe.yaml").write_text(f"# best of sweep {out_dir} by validation {metric}\n"
                                              + dump_config(best_config))
    test = evaluate_best_on_test(Path(best["run_dir"]))
    (out_dir / "best_test.json").write_text(json.dumps({"trial": best["trial"], "run_dir": best["run_dir"],
                                                        **test}, indent=1))
    print(f"best trial {best['trial']} ({best['run_dir']}): test accuracy {test['accuracy']:.4f}, "
          f"macro-F1 {test['macro_f1']:.4f} (the only test evaluation of this sweep)")
    return rows


def evaluate_best_on_test(run_dir: Path) -> dict:
    from newstune.report import evaluate_run

    metrics, _ = evaluate_run(run_dir, "test", [])
    return {k: metrics["test"][k] for k in ("accuracy", "macro_f1", "loss")}
