"""Experiment tracking through Accelerate's trackers (`train.report_to`): TensorBoard in the run folder, MLflow, W&B.

Accelerate owns the trackers; newstune only says where each one writes. Its `Accelerator(log_with=...)` would want
the folder when the Accelerator is built, before a run folder exists (a failed start leaves none), so the tracker
objects are made here once the folder is known and handed to `Accelerator.init_trackers`."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from accelerate.tracking import GeneralTracker, MLflowTracker, TensorBoardTracker, WandBTracker

from newstune.config import RunConfig
from newstune.errors import NewstuneError

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
INSTALL = {"tensorboard": "pip install tensorboard", "mlflow": "pip install 'newstune[track]'",
           "wandb": "pip install wandb (and wandb login)"}


def check_trackers(names: list[str]) -> None:
    """Before any work: every tracker named in train.report_to can be imported (one line naming the fix)."""
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise NewstuneError(f"train.report_to: {name} is not installed; {INSTALL[name]}, or drop it from "
                                "train.report_to")


def mlflow_uri(run_dir: Path) -> str:
    """$MLFLOW_TRACKING_URI when set, else a local SQLite store beside the run folder (its parent's mlflow.db), so the
    runs of one output folder land in one store (MLflow 3 refuses its old ./mlruns file store by default)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.resolve().parent / 'mlflow.db'}"


def make_trackers(config: RunConfig, run_dir: Path) -> list[GeneralTracker]:
    """One Accelerate tracker per train.report_to entry, writing for this run."""
    trackers: list[GeneralTracker] = []
    for name in config.train.report_to:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker("tensorboard", run_dir))  # run_dir/tensorboard
        elif name == "mlflow":
            import mlflow

            mlflow.set_tracking_uri(mlflow_uri(run_dir))
            trackers.append(MLflowTracker(experiment_name=config.name, run_name=run_dir.name,
                                          tags={"newstune.run_dir": str(run_dir.resolve())}))
        elif name == "wandb":
            trackers.append(WandBTracker(config.name, name=run_dir.name, dir=str(run_dir)))
    return trackers


def flat_config(config: RunConfig) -> dict[str, str | int | float | bool]:
    """The recipe as `section.key` parameters, the form trackers show as hyperparameters."""
    flat: dict[str, str | int | float | bool] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            flat[prefix] = value if isinstance(value, str | int | float | bool) else str(value)

    walk("", config.model_dump(mode="json"))  # what config.yaml holds
    return flat


def tracked_values(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as tracker scalars: train/loss, validation/accuracy, test/macro_f1, ..."""
    prefix = {"train": "train", "eval": "validation"}.get(record["kind"], record["kind"])
    return {f"{prefix}/{key}": value for key, value in record.items() if isinstance(value, float)}
