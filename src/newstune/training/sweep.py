"""Search over configs: `compare` trains fixed variants of one recipe; `sweep` searches a grid with Optuna."""

from __future__ import annotations

import functools
import itertools
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from newstune.config import RunConfig, apply_overrides, dump_config, load_config, parse_override, validate
from newstune.errors import NewstuneError
from newstune.reporting.report import run_row, write_report
from newstune.tables import markdown_table

if TYPE_CHECKING:
    import optuna

    AfterTrial = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]

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
    from newstune.modeling.model import build_model, count_parameters

    labels = load_dataset(config.data, config.train.seed).label_names
    return count_parameters(build_model(config.model, config.lora, labels).model)["trainable"]


def config_for(base_raw: dict, params: dict) -> RunConfig:
    raw = apply_overrides(json.loads(json.dumps(base_raw)), [f"{k}={json.dumps(v)}" for k, v in params.items()])
    return validate(raw, "sweep")


MAX_RETRY = 2  # a configuration whose training fails this many more times is reported as failed
HEARTBEAT_S, GRACE_S = 30, 90  # a trial whose worker sent no heartbeat for GRACE_S was killed: it is re-queued
SETTLED = ("ok", "skipped", "failed")


class TrainingFailed(Exception):
    """A trial's training run failed (reason in its FAILED file): the trial becomes FAIL and is re-queued."""


def sweep(recipe: Path, overrides: list[str], grid_items: list[str], out_dir: Path | None,
          max_trainable: int | None, sampler: str = "grid", trials: int | None = None, metric: str | None = None,
          resume: bool = False, max_retry: int = MAX_RETRY, storage: str | None = None, engine: str = "local",
          workers: int | None = None, address: str | None = None, cpus_per_trial: int = 1) -> list[dict]:
    """Optuna study in out_dir/study.db (or the database at `storage`, shared by several machines): interruptible
    and resumable; parallel workers may share it. A failed or killed training is retried up to max_retry times.
    engine "ray" runs each trial's training as a Ray task, `workers` at once."""
    base = load_config(recipe, overrides)
    base_raw = yaml.safe_load(dump_config(base))
    grid = parse_grid(grid_items)
    if not grid:
        raise NewstuneError("a sweep needs at least one --grid key=v1,v2,...")
    metric = metric or base.train.metric
    out_dir = out_dir or base.output_dir / f"sweep-{base.name}"
    if engine == "ray":
        from newstune.distributed.cluster import require_ray

        require_ray()  # before the sweep folder exists
    if out_dir.exists() and not resume and storage is None:  # with --storage, machines join one study
        raise NewstuneError(f"sweep folder {out_dir} exists; add --resume to continue it or choose --output-dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    budget = filter_budget(base_raw, combos, max_trainable, out_dir)
    study, retry = open_study(out_dir, base.name, grid, sampler, base.train.seed, metric, max_retry, storage)
    points = combos if sampler == "grid" else []  # random/tpe try `trials` configurations, not all of them
    target = len(points) or trials or 0
    with trial_runner(engine, address, workers, cpus_per_trial) as (train, n_jobs):
        if engine == "ray" and base.train.threads is None:  # trials sharing a machine share its cores
            overrides = [*overrides, f"train.threads={cpus_per_trial}"]
        objective = make_objective(recipe, overrides, grid, budget, out_dir, metric, train)
        run_until_settled(study, objective, functools.partial(requeue, retry=retry), points, target, max_retry,
                          n_jobs)
    return summarise_sweep(study, out_dir, recipe, metric, base_raw, grid, points, max_retry)


@contextmanager
def trial_runner(engine: str, address: str | None, workers: int | None,
                 cpus_per_trial: int) -> Iterator[tuple[Callable | None, int]]:
    """(how a trial trains: None = train_in_subprocess here, trials at once)."""
    if engine != "ray":
        yield None, workers or 1
        return
    from newstune.distributed.sweep import ray_trials

    with ray_trials(lambda: train_in_subprocess, address, workers, cpus_per_trial) as runner:
        yield runner


def storage_url(out_dir: Path, storage: str | None) -> str:
    return storage or f"sqlite:///{out_dir / 'study.db'}"


def open_study(out_dir: Path, name: str, grid: dict, sampler: str, seed: int, metric: str,
               max_retry: int, storage: str | None = None) -> tuple[optuna.Study, AfterTrial]:
    """The study and its retry callback; the storage's heartbeats re-queue the trials of a killed worker."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # optuna >= 4.9 renamed the callback
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
            callback = {"heartbeat_stale_trial_callback": retry}
        else:
            retry = optuna.storages.RetryFailedTrialCallback(max_retry=max_retry)
            callback = {"failed_trial_callback": retry}
        rdb = _rdb_storage(storage_url(out_dir, storage), callback)
    samplers = {"grid": lambda: optuna.samplers.GridSampler(grid, seed=seed),
                "random": lambda: optuna.samplers.RandomSampler(seed=seed),
                "tpe": lambda: optuna.samplers.TPESampler(seed=seed)}
    study = optuna.create_study(study_name=name, storage=rdb, load_if_exists=True,
                                direction="minimize" if metric == "loss" else "maximize", sampler=samplers[sampler]())
    return study, retry


def _rdb_storage(url: str, callback: dict) -> optuna.storages.RDBStorage:
    import optuna
    import sqlalchemy

    try:
        return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S, **callback)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as err:
        shown = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True) if "://" in url else url
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise NewstuneError(f"cannot open the study storage --storage {shown}: {first[:200]}; check the URL, that "
                            "the database is reachable and its driver installed (PostgreSQL: psycopg2)") from None


def make_objective(recipe: Path, overrides: list[str], grid: dict, budget: dict, out_dir: Path,
                   metric: str, train: Callable | None = None) -> Callable[[optuna.Trial], float]:
    import optuna

    def objective(trial: optuna.Trial) -> float:
        params = {key: trial.suggest_categorical(key, values) for key, values in grid.items()}
        key = params_key(params)
        if key in budget["skipped"]:
            trial.set_user_attr("skipped", budget["skipped"][key])
            raise optuna.TrialPruned(f"over the trainable-parameter budget: {budget['skipped'][key]:,}")
        run_dir = out_dir / f"trial-{trial.number:03d}"
        if run_dir.exists():
            run_dir = out_dir / f"trial-{trial.number:03d}-{int(time.time())}"
        # A retry inherits the user attributes of the try it repeats.
        for name, value in {"run_dir": str(run_dir), "trainable": budget["counts"].get(key), "failure": None,
                            "interrupted": False}.items():
            trial.set_user_attr(name, value)
        override_list = [f"{k}={json.dumps(v)}" for k, v in params.items()] + ["eval.test=false"]
        try:
            trained = (train or train_in_subprocess)(recipe, [*overrides, *override_list], run_dir,
                                          out_dir / f"{run_dir.name}.log")
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        if not trained:
            reason = (run_dir / "FAILED").read_text().strip()
            trial.set_user_attr("failure", reason)
            raise TrainingFailed(reason)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        validation = {k: metrics["validation"][k] for k in ("accuracy", "macro_f1", "loss")}
        trial.set_user_attr("validation", validation)
        trial.set_user_attr("trainable", metrics["efficiency"]["trainable_params"])
        return validation[metric]

    return objective


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial, retry: AfterTrial) -> None:
    """After a trial: a failed one is re-queued by optuna's retry callback (which stops after max_retry);
    an interrupted one as it was, since a user's Ctrl-C is no failed try."""
    import optuna

    if trial.state != optuna.trial.TrialState.FAIL:
        return
    if not trial.user_attrs.get("interrupted"):
        retry(study, trial)
        return
    study.add_trial(optuna.create_trial(state=optuna.trial.TrialState.WAITING, params=trial.params,
                                        distributions=trial.distributions, system_attrs=trial.system_attrs))


def run_until_settled(study: optuna.Study, objective: Callable[[optuna.Trial], float], after_trial: AfterTrial,
                      combos: list[dict], target: int, max_retry: int, n_jobs: int = 1) -> None:
    """Runs trials until all grid points (random/tpe: `target` configurations) are ok, skipped or failed
    max_retry + 1 times. One study.optimize cannot: GridSampler stops it as soon as every grid point has a finished
    trial, FAIL included, so a retry queued after that waits for the next call."""
    import optuna

    for _ in range(target * (max_retry + 1) + 1):  # every call runs a try; no sweep needs more
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        for outcome in trial_outcomes(study, max_retry).values():
            if outcome["status"] == "stopped":  # interrupted, or its process died before re-queuing it
                after_trial(study, outcome["trial"])
        outcomes = trial_outcomes(study, max_retry)
        queued = sum(o["status"] == "queued" for o in outcomes.values())
        fresh = sum(params_key(p) not in outcomes for p in combos) if combos else target - len(outcomes)
        if queued + max(fresh, 0) == 0:
            return
        study.optimize(objective, n_trials=queued + max(fresh, 0), catch=(TrainingFailed,), callbacks=[after_trial],
                       n_jobs=n_jobs)


def params_key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def trial_outcomes(study: optuna.Study, max_retry: int) -> dict[str, dict]:
    """Each tried configuration: its status, deciding trial and failed tries. Status: ok, skipped, failed
    (max_retry + 1 failed tries), queued, running, or stopped (last try failed or was interrupted; not re-queued)."""
    trials_of: dict[str, list] = {}
    for trial in study.get_trials(deepcopy=False):
        if trial.params:
            trials_of.setdefault(params_key(trial.params), []).append(trial)
    return {key: outcome(trials, max_retry) for key, trials in trials_of.items()}


def outcome(trials: list[optuna.trial.FrozenTrial], max_retry: int) -> dict:
    from optuna.trial import TrialState

    failures = [t for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")]
    for state, status in ((TrialState.COMPLETE, "ok"), (TrialState.PRUNED, "skipped"),
                          (TrialState.WAITING, "queued"), (TrialState.RUNNING, "running")):
        matching = [t for t in trials if t.state == state]
        if matching:
            return {"status": status, "trial": matching[-1], "failures": failures}
    status = "failed" if len(failures) > max_retry else "stopped"
    return {"status": status, "trial": trials[-1], "failures": failures}


def pending_grid_points(study: optuna.Study, combos: list[dict], max_retry: int = MAX_RETRY) -> list[dict]:
    """Grid points not settled: neither trained (ok), budget-skipped, nor failed max_retry + 1 times."""
    outcomes = trial_outcomes(study, max_retry)
    return [p for p in combos if outcomes.get(params_key(p), {}).get("status") not in SETTLED]


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


def outcome_rows(study: optuna.Study, combos: list[dict], max_retry: int, metric: str) -> list[dict]:
    """One row per configuration: the trained ones best first, then skipped, failed (with the reason of the last
    failed try) and any not settled."""
    rows, outcomes = [], trial_outcomes(study, max_retry)
    for o in outcomes.values():
        trial, failures = o["trial"], o["failures"]
        row = {"trial": trial.number, **trial.params, "status": o["status"], "failures": len(failures)}
        if o["status"] == "ok":
            row |= {**trial.user_attrs["validation"], "trainable": trial.user_attrs["trainable"],
                    "run_dir": trial.user_attrs["run_dir"]}
        elif o["status"] == "skipped":
            row |= {"trainable": trial.user_attrs["skipped"], "reason": "over the trainable-parameter budget"}
        elif o["status"] == "failed":
            row |= {"reason": failures[-1].user_attrs.get("failure") or "worker killed (heartbeat stopped)",
                    "run_dir": failures[-1].user_attrs.get("run_dir")}
        rows.append(row)
    rows += [{"trial": None, **p, "status": "pending", "failures": 0} for p in combos if params_key(p) not in outcomes]
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["loss"] if metric == "loss" else -r[metric])
    return ok + [r for r in rows if r["status"] != "ok"]


def sweep_table(rows: list[dict]) -> str:
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "run_dir"]
    return markdown_table(keys, [[_cell(r.get(k)) for k in keys] for r in rows]) + "\n"


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "" if value is None else str(value)


def summarise_sweep(study: optuna.Study, out_dir: Path, recipe: Path, metric: str, base_raw: dict, grid: dict,
                    combos: list[dict], max_retry: int) -> list[dict]:
    """sweep.json / sweep.md with every configuration's outcome; for the trained ones the metric plot, and the best
    one's recipe and its (only) test evaluation."""
    rows = outcome_rows(study, combos, max_retry, metric)
    (out_dir / "sweep.json").write_text(json.dumps(rows, indent=1))
    if not rows:
        return rows
    (out_dir / "sweep.md").write_text(sweep_table(rows))
    print(sweep_table(rows))
    done = [r for r in rows if r["status"] == "ok"]
    if done:
        plot_metric_vs_params(done, metric, out_dir / "metric_vs_params.png")
        write_best(done[0], out_dir, recipe, metric, base_raw, list(grid))
    return rows


def plot_metric_vs_params(rows: list[dict], metric: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["trainable"] for r in rows], [r[metric] for r in rows])
    for r in rows:
        ax.annotate(str(r["trial"]), (r["trainable"], r[metric]), fontsize=7)
    ax.set_xlabel("trainable parameters (LoRA + head)")
    ax.set_ylabel(f"validation {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_best(best: dict, out_dir: Path, recipe: Path, metric: str, base_raw: dict, keys: list[str]) -> None:
    best_config = config_for(base_raw, {k: best[k] for k in keys})
    best_config.name = f"{base_raw.get('name') or recipe.stem}_best"
    (out_dir / "best_recipe.yaml").write_text(f"# best of sweep {out_dir} by validation {metric}\n"
                                              + dump_config(best_config))
    test = evaluate_best_on_test(Path(best["run_dir"]))
    (out_dir / "best_test.json").write_text(json.dumps({"trial": best["trial"], "run_dir": best["run_dir"],
                                                        **test}, indent=1))
    print(f"best trial {best['trial']} ({best['run_dir']}): test accuracy {test['accuracy']:.4f}, "
          f"macro-F1 {test['macro_f1']:.4f} (the only test evaluation of this sweep)")


def evaluate_best_on_test(run_dir: Path) -> dict:
    from newstune.reporting.report import evaluate_run

    metrics, _ = evaluate_run(run_dir, "test", [])
    return {k: metrics["test"][k] for k in ("accuracy", "macro_f1", "loss")}
