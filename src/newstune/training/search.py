"""Budgeted hyperparameter search on the full training set: optuna's TPE proposes a configuration, a Hyperband
(or successive-halving) pruner stops the poor ones from validation scores taken several times per epoch, and the
search stops once its trials have trained as many epochs (passes over the training split, whatever the batch size)
as `budget_runs` full-length runs: the trial running then stops at the evaluation that reaches the budget (state
`budget`, not ranked), so a search costs at most the budget plus one evaluation interval.

Only validation is ever read: every trial runs with `eval.test: false`, so no choice can see the test split.
With `smooth` > 1 a trial is ranked by its best mean of `smooth` consecutive evaluations, and the pruner reads
the mean of the last `smooth`, instead of one evaluation each: on a small validation split one evaluation is
noisy, and the best of ~15 noisy points ranks the luckiest spike first (HuffPost, docs/accuracy.md). optuna's
pruners read one value per rung and have no such option, so the window is kept here.
The winner is written as `best.yaml`, a complete recipe; `newstune train best.yaml --seeds 3` measures it.

`sweep` (sweep.py) trains fixed grids in subprocesses; a search trains in this process because the pruner must
read each evaluation as it happens (optuna's `trial.report` / `should_prune`).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from newstune.config import RunConfig, apply_overrides, dump_config, load_config, validate
from newstune.errors import NewstuneError
from newstune.tables import markdown_table

PRUNERS = ("hyperband", "halving", "none")


@dataclass(frozen=True)
class Dimension:
    """One searched key: 'log:1e-5:3e-4', 'float:0:0.2', 'int:8:64' or a list of choices 'a,b,c'."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple = ()

    def suggest(self, trial):
        if self.kind == "log":
            return trial.suggest_float(self.key, self.low, self.high, log=True)
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_categorical(self.key, list(self.choices))


def parse_space(items: list[str]) -> list[Dimension]:
    """['train.lr=log:1e-5:3e-4', 'train.epochs=2,3'] -> dimensions; one bad item is one clear error."""
    dims = []
    for item in items:
        if "=" not in item:
            raise NewstuneError(f"--space '{item}' is not key=log:LOW:HIGH, key=float:LOW:HIGH, key=int:LOW:HIGH "
                                "or key=v1,v2,...")
        key, spec = item.split("=", 1)
        head, _, rest = spec.partition(":")
        if head in ("log", "float", "int"):
            try:
                low, high = (float(v) for v in rest.split(":"))
            except ValueError:
                raise NewstuneError(f"--space '{item}': expected {head}:LOW:HIGH with two numbers") from None
            if not low < high or (head == "log" and low <= 0):
                raise NewstuneError(f"--space '{item}': need LOW < HIGH (and LOW > 0 for log)")
            dims.append(Dimension(key, head, low, high))
        else:
            choices = tuple(yaml.safe_load(v) for v in spec.split(","))
            dims.append(Dimension(key, "choice", choices=choices))
    if not dims:
        raise NewstuneError("a search needs at least one --space key=...")
    return dims


def trial_config(base_raw: dict, params: dict, evals_per_epoch: int, steps_per_epoch: int) -> RunConfig:
    """The recipe with the trial's values, validation-only, evaluated `evals_per_epoch` times per epoch."""
    raw = apply_overrides(json.loads(json.dumps(base_raw)), [f"{k}={json.dumps(v)}" for k, v in params.items()])
    raw["eval"] = {**raw.get("eval", {}), "test": False, "test_curve": False, "baseline": False,
                   "latency_samples": 0}
    config = validate(raw, "search trial")
    steps = math.ceil(steps_per_epoch / config.train.grad_accum)
    config.train.eval_every_steps = max(1, steps // evals_per_epoch)
    return config


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    return math.ceil(n_rows / batch_size)


def window_means(scores: list[float], window: int) -> list[float]:
    """The mean of each evaluation and the `window - 1` before it (fewer at the start of the curve)."""
    windows = (scores[max(0, i + 1 - window):i + 1] for i in range(len(scores)))
    return [sum(w) / len(w) for w in windows]


def smoothed_value(scores: list[float], window: int) -> float:
    """A trial's value: its best mean of `window` consecutive evaluations (its best evaluation when window is 1,
    or the mean of all when the curve is shorter than the window)."""
    means = window_means(scores, window)
    return max(means[window - 1:] or means[-1:])


def make_pruner(name: str, max_resource: int):
    import optuna

    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_resource, reduction_factor=3)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def search(recipe: Path, overrides: list[str], space_items: list[str], out_dir: Path, trials: int = 20,
           budget_runs: float = 3.0, evals_per_epoch: int = 4, pruner: str = "hyperband",
           seed: int | None = None, timeout_s: float | None = None, smooth: int = 1) -> dict:
    """Run the search; writes out_dir/search.json, search.md and best.yaml, and returns the summary."""
    import optuna

    from newstune.data.registry import load_dataset
    from newstune.training.train import train

    if pruner not in PRUNERS:
        raise NewstuneError(f"--pruner {pruner}: choose one of {', '.join(PRUNERS)}")
    if smooth < 1:
        raise NewstuneError(f"--smooth {smooth}: give the number of consecutive evaluations to average (>= 1)")
    if out_dir.exists():
        raise NewstuneError(f"search folder {out_dir} already exists; choose another --output-dir")
    dims = parse_space(space_items)
    base = load_config(recipe, overrides)
    base_raw = yaml.safe_load(dump_config(base))
    if smooth > 1 and base.train.metric == "loss":
        raise NewstuneError("--smooth averages accuracy or macro-F1 evaluations; set train.metric to accuracy or "
                            "macro_f1 (it is loss), or drop --smooth")
    for dim in dims:  # every searched key must exist and accept its values, before anything trains
        for value in (dim.choices or (dim.low, dim.high)):
            value = int(value) if dim.kind == "int" else value
            validate(apply_overrides(json.loads(json.dumps(base_raw)), [f"{dim.key}={json.dumps(value)}"]),
                     f"--space {dim.key}")
    bundle = load_dataset(base.data, base.train.seed)  # loaded once; every trial trains on the full split
    n_train = len(bundle.splits["train"])
    max_epochs = max([math.ceil(v) for d in dims if d.key == "train.epochs" for v in (d.choices or (d.high,))]
                     or [math.ceil(base.train.epochs)])
    out_dir.mkdir(parents=True)
    sampler = optuna.samplers.TPESampler(seed=base.train.seed if seed is None else seed, n_startup_trials=5)
    study = optuna.create_study(direction="maximize", sampler=sampler,
                                pruner=make_pruner(pruner, evals_per_epoch * max_epochs),
                                study_name=f"search-{base.name}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    records: list[dict] = []
    spent = {"epochs": 0.0}  # passes over the training split, by every trial together
    budget_epochs = budget_runs * max_epochs  # a full-length run trains max_epochs
    metric = base.train.metric
    started = time.perf_counter()

    def objective(trial: optuna.Trial) -> float:
        params = {d.key: d.suggest(trial) for d in dims}
        config = trial_config(base_raw, params, evals_per_epoch,
                              steps_per_epoch(n_train, params.get("train.batch_size", base.train.batch_size)))
        curve: list[tuple[float, float]] = []
        rung_scores: list[float] = []  # one score per rung: what the pruner and the smoothing read
        record = {"trial": trial.number, "params": params, "state": "running", "curve": curve}
        records.append(record)
        trial_start = time.perf_counter()

        def on_evaluate(epochs: float, score: float) -> None:
            curve.append((round(epochs, 3), score))
            if epochs < config.train.epochs - 1e-9 and spent["epochs"] + epochs >= budget_epochs - 1e-9:
                record["state"] = "budget"  # the budget is spent: stop here, unranked (its schedule is cut short)
                raise optuna.TrialPruned(f"stopped at {epochs:.2f} epochs: the budget of {budget_runs} runs is spent")
            rung = round(epochs * evals_per_epoch)
            if curve[:-1] and round(curve[-2][0] * evals_per_epoch) == rung:
                rung_scores[-1] = score  # a later evaluation on the same rung (the epoch's end): it replaces the
                return  # rung's score in the smoothing; the pruner has had this rung already
            rung_scores.append(score)
            reported = window_means(rung_scores, smooth)[-1]
            trial.report(reported, rung)
            if trial.should_prune():
                record["state"] = "pruned"
                raise optuna.TrialPruned(f"pruned at {epochs:.2f} epochs ({metric} {reported:.4f})")

        print(f"== trial {trial.number}: {json.dumps(params)}", file=sys.stderr, flush=True)
        run_dir = out_dir / f"trial-{trial.number:03d}"
        try:
            _, metrics = train(config, run_dir, bundle=bundle, on_evaluate=on_evaluate)
        except optuna.TrialPruned:
            raise
        except Exception:
            record["state"] = "failed"
            raise
        finally:
            trained = curve[-1][0] if curve else 0.0
            spent["epochs"] += trained
            record.update(seconds=round(time.perf_counter() - trial_start, 1), epochs_trained=trained)
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # resume state: a trial is never resumed
        value = metrics["validation"]["macro_f1" if metric == "loss" else metric]
        if smooth > 1:  # the kept checkpoint's score is one evaluation; rank by the window instead
            record["best_single"] = value
            value = smoothed_value(rung_scores, smooth)
        record.update(state="complete", value=value)
        return value

    def stop_at_budget(study: optuna.Study, _trial) -> None:
        if spent["epochs"] >= budget_epochs - 1e-9:  # after a trial stopped at the budget too
            study.stop()

    study.optimize(objective, n_trials=trials, timeout=timeout_s, callbacks=[stop_at_budget], catch=())
    complete = [r for r in records if r["state"] == "complete"]
    if not complete:
        raise NewstuneError(f"search {out_dir}: no trial finished (all pruned or failed); widen --space or "
                            "raise --budget-runs")
    best = max(complete, key=lambda r: r["value"])
    best_raw = apply_overrides(json.loads(json.dumps(base_raw)),
                               [f"{k}={json.dumps(v)}" for k, v in best["params"].items()])
    best_raw["name"] = f"{base.name}_searched"
    (out_dir / "best.yaml").write_text(
        f"# best of {len(records)} trials of `newstune search` on {recipe} (validation {metric}"
        f"{f', mean of {smooth} consecutive evaluations' if smooth > 1 else ''}); "
        "every value chosen on validation\n" + dump_config(validate(best_raw, "best")))
    summary = {"recipe": str(recipe), "pruner": pruner, "smooth": smooth,
               "metric": f"validation {metric}" + (f" (mean of {smooth} evaluations)" if smooth > 1 else ""),
               "evals_per_epoch": evals_per_epoch, "train_rows": n_train, "trials": records, "best": best,
               "cost_single_runs": round(spent["epochs"] / max_epochs, 2), "budget_runs": budget_runs,
               "seconds": round(time.perf_counter() - started, 1)}
    (out_dir / "search.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "search.md").write_text(search_table(summary) + "\n")
    return summary


def search_table(summary: dict) -> str:
    keys = sorted({k for r in summary["trials"] for k in r["params"]})
    rows = [[str(r["trial"]), r["state"], *(_fmt(r["params"].get(k)) for k in keys), f"{r['epochs_trained']:.2f}",
             _fmt(r.get("value")), f"{r.get('seconds', 0):.0f}"] for r in summary["trials"]]
    return markdown_table(["trial", "state", *keys, "epochs trained", summary["metric"], "seconds"], rows)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
