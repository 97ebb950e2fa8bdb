"""A run directory, the unit users share: create it safely, read its config/labels/metrics, load its model."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from newstune.config import RunConfig, dump_config, validate
from newstune.errors import NewstuneError
from newstune.model import hold_frozen_in, load_saved_model, load_tokenizer

CONFIG_FILE = "config.yaml"
LABELS_FILE = "label_map.json"
METRICS_FILE = "metrics.json"
MODEL_DIR = "model"


def planned_run_dir(config: RunConfig, output_dir: Path | None = None) -> Path:
    """runs/<name>-<timestamp>, or exactly output_dir."""
    return output_dir or config.output_dir / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_new_run_dir(path: Path) -> None:
    """Fails, before any work, when `path` exists (results are never overwritten) or could not be created."""
    if path.exists():
        raise NewstuneError(f"output directory {path} already exists; choose another --output-dir "
                            "(or --resume it to continue that run)")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NewstuneError(f"cannot create output directory {path}: {parent} is a file; choose another --output-dir")
    try:
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as err:
        raise NewstuneError(f"cannot create output directory {path}: {parent} is not writable "
                            f"({err.strerror}); choose another --output-dir") from None


def create_run_dir(path: Path) -> Path:
    check_new_run_dir(path)
    try:
        path.mkdir(parents=True)
    except OSError as err:
        raise NewstuneError(f"cannot create output directory {path} ({err.strerror}); choose another --output-dir") \
            from None
    return path


def write_run_header(run_dir: Path, config: RunConfig, label_names: list[str]) -> None:
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(dump_config(config))
    (run_dir / LABELS_FILE).write_text(json.dumps(label_names, indent=1))


def require_run(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise NewstuneError(f"{run_dir} is not a newstune run directory (no {CONFIG_FILE}); "
                            "pass a folder made by `newstune train`")
    return run_dir


def read_config(run_dir: Path) -> RunConfig:
    import yaml

    run_dir = require_run(run_dir)
    return validate(yaml.safe_load((run_dir / CONFIG_FILE).read_text()), str(run_dir / CONFIG_FILE))


def read_labels(run_dir: Path) -> list[str]:
    return json.loads((Path(run_dir) / LABELS_FILE).read_text())


def read_metrics(run_dir: Path) -> dict:
    path = Path(run_dir) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_metrics(run_dir: Path, metrics: dict) -> None:
    tmp = Path(run_dir) / (METRICS_FILE + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(Path(run_dir) / METRICS_FILE)


@dataclass
class LoadedRun:
    run_dir: Path
    config: RunConfig
    label_names: list[str]
    model: torch.nn.Module
    tokenizer: object
    threshold: float | None
    precision: str


def load_run(run_dir: Path, device: str = "cpu", as_trained: bool = True) -> LoadedRun:
    """The run's best model; as_trained keeps the dtype layout it was evaluated in (else plain fp32)."""
    run_dir = require_run(run_dir)
    config = read_config(run_dir)
    if not (run_dir / MODEL_DIR).is_dir():
        raise NewstuneError(f"{run_dir} has no saved model yet (training did not finish); "
                            f"resume it: newstune train --resume {run_dir}")
    labels = read_labels(run_dir)
    metrics = read_metrics(run_dir)
    precision = metrics.get("efficiency", {}).get("precision", "fp32")
    model = load_saved_model(run_dir / MODEL_DIR, config.model.name, labels, config.model.attn_implementation)
    if not as_trained:
        precision = "fp32"
    elif metrics.get("efficiency", {}).get("frozen_weights_dtype") == "bf16":
        hold_frozen_in(model, torch.bfloat16)
    model.to(device).eval()
    tokenizer = load_tokenizer(str(run_dir / MODEL_DIR))
    return LoadedRun(run_dir, config, labels, model, tokenizer, metrics.get("threshold"), precision)
