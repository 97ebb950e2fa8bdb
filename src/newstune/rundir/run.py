"""A run directory, the unit users share: create it safely, read its config/labels/metrics, load its model."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from newstune.config import RunConfig, dump_config, validate
from newstune.decisions.ensemble import Ensemble, load_ensemble
from newstune.decisions.rule import Decision
from newstune.errors import NewstuneError
from newstune.modeling.backends import Scorer, choose_export, export_scorer, torch_scorer
from newstune.modeling.first_token import run_last_layer_on_first_token
from newstune.modeling.infer import bf16_is_native
from newstune.modeling.model import hold_frozen_in, load_saved_model, load_tokenizer
from newstune.rundir.files import check_export, check_labels, check_metrics

CONFIG_FILE = "config.yaml"
LABELS_FILE = "label_map.json"
METRICS_FILE = "metrics.json"
DECISION_FILE = "decision.json"
MODEL_DIR = "model"
EXPORTS_DIR = "exports"
EXPORT_CHECKS_FILE = "export_checks.json"
GROUP_FILE = "seeds.yaml"  # the recipe and its seeds: marks a folder as a seed group (train --seeds), not a run


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


def seed_run_dir(group: Path, seed: int) -> Path:
    """The run of one seed inside a seed group (train --seeds)."""
    return Path(group) / f"seed-{seed}"


def is_seed_group(path: Path) -> bool:
    return (Path(path) / GROUP_FILE).is_file()


def require_run(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise NewstuneError(f"{run_dir} is not a newstune run directory (no {CONFIG_FILE}); "
                            "pass a folder made by `newstune train`")
    return run_dir


def read_config(run_dir: Path) -> RunConfig:
    import yaml

    path = require_run(run_dir) / CONFIG_FILE
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise NewstuneError(f"{path}: not valid YAML ({err.__class__.__name__}); the file was changed or damaged: "
                            "ask the run's author for the original") from None
    if not isinstance(raw, dict):
        raise NewstuneError(f"{path}: expected a mapping of config sections; the file was changed or damaged: "
                            "ask the run's author for the original")
    return validate(raw, str(path))


def read_json(path: Path, fix: str) -> object:
    """A run file's JSON, or one line naming the file when it is not JSON (UTF-8)."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError):
        raise NewstuneError(f"{path}: not valid JSON; the file was changed or damaged: {fix}") from None
    except OSError as err:
        raise NewstuneError(f"{path}: cannot be read ({err.strerror}); {fix}") from None


def read_labels(run_dir: Path) -> list[str]:
    path = Path(run_dir) / LABELS_FILE
    if not path.is_file():
        raise NewstuneError(f"{path} is missing; a run needs its label list: ask the run's author for it")
    return check_labels(read_json(path, "restore it from the run's author"), path)


def read_metrics(run_dir: Path) -> dict:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return {}
    return check_metrics(read_json(path, "re-create it with `newstune evaluate RUN`"), path)


def write_metrics(run_dir: Path, metrics: dict) -> None:
    write_atomically(Path(run_dir) / METRICS_FILE, json.dumps(metrics, indent=2))


def write_new_json(path: Path, data: dict) -> None:
    """A result file that must not replace an earlier one."""
    path = Path(path)
    if path.exists():
        raise NewstuneError(f"{path} already exists; choose another --output (results are never overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(data, indent=2) + "\n")


def write_atomically(path: Path, text: str) -> None:
    """Written under a temporary name and renamed: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def read_decision(run_dir: Path, metrics: dict | None = None) -> Decision:
    """The run's decision rule; a run made before decision.json existed keeps its binary threshold, nothing else."""
    path = Path(run_dir) / DECISION_FILE
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            raise NewstuneError(f"{path}: not valid JSON; re-create it with `newstune calibrate RUN`") from None
        return Decision.from_dict(data, str(path))
    metrics = read_metrics(run_dir) if metrics is None else metrics
    return Decision(threshold=metrics.get("threshold"))


def write_decision(run_dir: Path, decision: Decision) -> None:
    write_atomically(Path(run_dir) / DECISION_FILE, json.dumps(decision.to_dict(), indent=1))


def export_dir(run_dir: Path, backend: str, precision: str) -> Path:
    return Path(run_dir) / EXPORTS_DIR / f"{backend}-{precision}"


def read_exports(run_dir: Path) -> list[dict]:
    """The checks of every finished backend export in the run, each with its `folder`."""
    found = []
    for checks_file in sorted((Path(run_dir) / EXPORTS_DIR).glob(f"*/{EXPORT_CHECKS_FILE}")):
        checks = read_json(checks_file, f"delete {checks_file.parent} and export again")
        found.append({**check_export(checks, checks_file), "folder": str(checks_file.parent)})
    return found


@dataclass
class LoadedRun:
    run_dir: Path
    config: RunConfig
    label_names: list[str]
    model: torch.nn.Module | None  # None when an export computes the logits
    tokenizer: object
    threshold: float | None
    precision: str
    scorer: Scorer | None = None
    backend_reason: str = "PyTorch"
    decision: Decision = field(default_factory=Decision)  # how logits become probabilities and labels
    ensemble: Ensemble | None = None  # decision.json blends the encoder with the run's TF-IDF model

    def __post_init__(self) -> None:
        if self.decision == Decision() and self.threshold is not None:
            self.decision = Decision(threshold=self.threshold)

    @property
    def backend(self) -> str:
        return self.scorer.name if self.scorer is not None else f"torch-{self.precision}"

    def logits(self, texts: list[str], input_ids: list[list[int]], batch_size: int = 64, progress: bool = False,
               desc: str = "predict") -> np.ndarray:
        """The logits the decision rule reads: the backend's, blended with the TF-IDF model where the run has one.

        `texts` are the cleaned texts that `input_ids` tokenize (the linear model reads words, not tokens)."""
        logits = self.scorer.logits(input_ids, batch_size, progress=progress, desc=desc, throughput=True)
        return logits if self.ensemble is None else self.ensemble.combine(logits, texts)


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:160] + "...") if len(text) > 160 else text or err.__class__.__name__


def load_run(run_dir: Path, device: str = "cpu", as_trained: bool = True, backend: str = "torch") -> LoadedRun:
    """The run's best model; as_trained keeps the dtype layout it was evaluated in and, where the run trained with
    train.first_token_last_layer, computes its last layer for token 0 only (else the plain fp32 model). A bf16 run
    on a device without native bf16 is computed in fp32, with the same (bf16-rounded) weights.

    `backend` (auto, torch, onnx, openvino) picks what computes its logits: a passed export of the run, or PyTorch.
    When an export computes them, the PyTorch model is not loaded at all (`model` is None): less memory and start-up.
    """
    run_dir = require_run(run_dir)
    config = read_config(run_dir)
    if not (run_dir / MODEL_DIR).is_dir():
        raise NewstuneError(f"{run_dir} has no saved model yet (training did not finish); "
                            f"resume it: newstune train --resume {run_dir}")
    labels = read_labels(run_dir)
    metrics = read_metrics(run_dir)
    precision = metrics.get("efficiency", {}).get("precision", "fp32")
    emulated = as_trained and precision == "bf16" and not bf16_is_native(device)
    if not as_trained or emulated:
        # a run shared from a CPU with native bf16 onto one without (on an AVX2-only Zen 3 MiniLM's forward ran 6.5x
        # slower under bf16 autocast): its weights, frozen ones still rounded to bf16 as trained, computed in fp32
        precision = "fp32"
    decision = read_decision(run_dir, metrics)
    tokenizer = load_tokenizer(str(run_dir / MODEL_DIR))
    chosen = choose_export(read_exports(run_dir), backend) if device == "cpu" else None
    model, scorer = None, None
    if chosen is None:
        model = _torch_model(run_dir, config, labels, decision, device, as_trained,
                             metrics.get("efficiency", {}).get("frozen_weights_dtype"), precision)
        scorer = torch_scorer(model, tokenizer.pad_token_id, precision)
    else:
        scorer = _export_scorer(run_dir, chosen, tokenizer, len(labels))
    ensemble = None if decision.ensemble is None else load_ensemble(run_dir, decision.ensemble, len(labels),
                                                                    decision.multi_label)
    run = LoadedRun(run_dir, config, labels, model, tokenizer, decision.threshold, precision, decision=decision,
                    ensemble=ensemble, scorer=scorer)
    if chosen is not None:
        run.backend_reason = (f"{chosen['speed']['speedup']:.2f}x PyTorch on validation, macro-F1 "
                              f"{chosen['validation']['macro_f1_delta_points']:+.2f} points")
    elif backend == "auto":
        run.backend_reason = "no passed export is faster than PyTorch (newstune export RUN --backend ...)"
    if chosen is None and emulated:
        run.backend_reason += "; trained in bf16, computed in fp32: this CPU has no native bf16"
    return run


def _torch_model(run_dir: Path, config: RunConfig, labels: list[str], decision: Decision, device: str,
                 as_trained: bool, frozen_dtype: str | None, precision: str) -> torch.nn.Module:
    try:
        model = load_saved_model(run_dir / MODEL_DIR, config.model.name, labels, config.model.attn_implementation,
                                 decision.multi_label)
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise NewstuneError(f"{run_dir / MODEL_DIR}: the saved model cannot be loaded ({one_line(err)}); its files "
                            f"or {LABELS_FILE} were changed or damaged: ask the run's author for the original") \
            from None
    if model.config.num_labels != len(labels):
        raise NewstuneError(f"{run_dir / LABELS_FILE}: names {len(labels)} labels but the saved model has "
                            f"{model.config.num_labels} outputs; the file was changed: restore it from its author")
    if as_trained and frozen_dtype == "bf16":
        hold_frozen_in(model, torch.bfloat16)
        if precision == "fp32":
            model.float()  # the values trained and scored with, in the dtype this CPU computes natively
    model.to(device).eval()
    if as_trained and config.train.first_token_last_layer:
        # inference reads token 0 of the last layer too: the same logits (checked on a batch first) for less work;
        # as_trained=False is the plain model (merged exports save it; backend exports patch it before tracing)
        run_last_layer_on_first_token(model)
    return model


def _export_scorer(run_dir: Path, chosen: dict, tokenizer, n_labels: int) -> Scorer:
    """The export's scorer, its output width checked against the run's labels on one short text."""
    try:
        scorer = export_scorer(Path(chosen["folder"]), chosen["backend"], chosen["precision"], tokenizer.pad_token_id)
        width = scorer.logits(tokenizer(["check"])["input_ids"], 1).shape[1]
    except Exception as err:  # noqa: BLE001 -- onnxruntime's and OpenVINO's own errors derive from Exception only
        raise NewstuneError(f"{chosen['folder']}: the {chosen['backend']} export cannot be loaded "
                            f"({one_line(err)}); delete the folder and export again, or pass --backend torch") \
            from None
    if width != n_labels:
        raise NewstuneError(f"{run_dir / LABELS_FILE}: names {n_labels} labels but the {chosen['backend']} export "
                            f"has {width} outputs; the file was changed: restore it from its author")
    return scorer
