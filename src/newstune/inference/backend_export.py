"""Export a run for ONNX Runtime or OpenVINO (fp32 or int8), kept only when it passes its gate on validation.

The gate compares the export with the run's PyTorch model on the validation split: label agreement, accuracy and
macro-F1 change, and both speeds measured in the same process over the same batches. An export losing more than
`tolerance_points` macro-F1 is refused and nothing is written, unless forced. int8 is static post-training
quantization for OpenVINO (NNCF, calibrated on the run's own training texts, never on validation or test) and
dynamic int8 for ONNX Runtime (weights int8, activations quantized per batch).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from newstune.data.batching import tokenize_texts
from newstune.data.registry import load_dataset
from newstune.decisions import rule as decisions
from newstune.decisions.metrics import classification_metrics
from newstune.decisions.rule import Decision
from newstune.errors import NewstuneError
from newstune.modeling.backends import Scorer, export_scorer, require, torch_scorer
from newstune.modeling.first_token import run_last_layer_on_first_token
from newstune.modeling.model import merge_lora
from newstune.paths import cache_dir
from newstune.rundir.run import LoadedRun, export_dir, load_run
from newstune.rundir.staging import staged_folder
from newstune.tables import markdown_table

CHECKS_FILE = "export_checks.json"
CALIBRATION_TEXTS = 300


def export_backend(run_dir: Path, backend: str, int8: bool = False, data_dir: Path | None = None,
                   tolerance_points: float = 0.5, force: bool = False) -> dict:
    """Writes RUN/exports/<backend>-<fp32|int8>/ with the model and its export_checks.json; returns the checks."""
    if backend not in ("onnx", "openvino"):
        raise NewstuneError(f"--backend {backend}: choose onnx or openvino")
    require("onnxruntime" if backend == "onnx" else "nncf" if int8 else "openvino")
    precision = "int8" if int8 else "fp32"
    target = export_dir(run_dir, backend, precision)
    if target.exists():
        raise NewstuneError(f"{target} already exists; delete it to export {backend} {precision} again")
    run = load_run(run_dir)
    data = run.config.data if data_dir is None else run.config.data.model_copy(update={"dir": data_dir})
    bundle = load_dataset(data, run.config.train.seed)
    with staged_folder(target, f"delete it to export {backend} {precision} again") as staging:
        plain = merge_lora(load_run(run_dir, as_trained=False).model).eval()
        if run.config.train.first_token_last_layer:  # traced as inference runs it; the gate below re-checks it
            run_last_layer_on_first_token(plain)
        calibration = _calibration_ids(run, bundle.splits["train"].texts) if int8 else []
        convert = _to_onnx if backend == "onnx" else _to_openvino
        convert(plain, run.tokenizer, staging, calibration)
        checks = gate(run, export_scorer(staging, backend, precision, run.tokenizer.pad_token_id),
                      bundle.splits["validation"], tolerance_points)
        checks["forced"] = force and not checks["passed"]
        (staging / CHECKS_FILE).write_text(json.dumps(checks, indent=1))
        if not checks["passed"] and not force:
            raise NewstuneError(f"{backend} {precision} export refused: {checks['failure']}; nothing was written "
                                "(--force keeps it, and predict/serve still never pick it)")
    return checks


def _calibration_ids(run: LoadedRun, train_texts: list[str]) -> list[list[int]]:
    texts = random.Random(run.config.train.seed).sample(train_texts, min(CALIBRATION_TEXTS, len(train_texts)))
    return run.tokenizer(texts, truncation=True, max_length=run.config.data.max_length)["input_ids"]


def _example_inputs(tokenizer) -> dict[str, torch.Tensor]:
    sample = tokenizer(["A short example headline.", "Another, somewhat longer example text for tracing."],
                       padding=True, return_tensors="pt")
    return {"input_ids": sample["input_ids"], "attention_mask": sample["attention_mask"]}


def _to_onnx(model: torch.nn.Module, tokenizer, folder: Path, calibration: list[list[int]]) -> None:
    example = _example_inputs(tokenizer)
    path = folder / "model.onnx"
    torch.onnx.export(model, (example["input_ids"], example["attention_mask"]), str(path),
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                    "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    if calibration:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        fp32 = folder / "model.fp32.onnx"
        path.rename(fp32)
        quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8)
        fp32.unlink()


def _to_openvino(model: torch.nn.Module, tokenizer, folder: Path, calibration: list[list[int]]) -> None:
    ov = require("openvino")
    converted = ov.convert_model(model, example_input=_example_inputs(tokenizer))
    if calibration:
        nncf = require("nncf")
        items = [{"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
                 for ids in calibration]
        converted = nncf.quantize(converted, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(items))
    ov.save_model(converted, str(folder / "model.xml"), compress_to_fp16=False)


def timed_logits(scorer: Scorer, ids: list[list[int]]) -> tuple[np.ndarray, float]:
    """Logits and texts/s over `ids`, after one warm-up batch; tokenization is outside the timed part."""
    scorer.logits(ids[:64])
    start = time.perf_counter()
    logits = scorer.logits(ids)
    return logits, len(ids) / (time.perf_counter() - start)


def _agreement(reference: np.ndarray, exported: np.ndarray, decision: Decision) -> float:
    """Share of texts given the same label (multi-label: the same label set) under the run's decision rule."""
    ours, theirs = (decisions.labels(decisions.probabilities(logits, decision), decision)
                    for logits in (reference, exported))
    same = ours == theirs
    return float((same.all(axis=1) if same.ndim == 2 else same).mean())


def gate(run: LoadedRun, scorer: Scorer, validation, tolerance_points: float) -> dict:
    """Agreement, quality change and speed of `scorer` against the run's PyTorch model on the validation split."""
    ids = tokenize_texts(run.tokenizer, validation.texts, run.config.data.max_length, cache_dir() / "tokens")
    reference, torch_speed = timed_logits(torch_scorer(run.model, run.tokenizer.pad_token_id, run.precision), ids)
    exported, speed = timed_logits(scorer, ids)
    if run.ensemble is not None:  # the decision rule reads the blend: compare what it will read
        reference, exported = (run.ensemble.combine(z, validation.texts) for z in (reference, exported))
    labels = np.asarray(validation.labels)
    before = classification_metrics(labels, reference, run.label_names, run.decision)
    after = classification_metrics(labels, exported, run.label_names, run.decision)
    f1_delta = 100 * (after["macro_f1"] - before["macro_f1"])
    checks = {
        "backend": scorer.backend, "precision": scorer.precision, "torch_precision": run.precision,
        "tolerance_points": tolerance_points, "passed": f1_delta >= -tolerance_points,
        "validation": {"n": len(ids), "accuracy": after["accuracy"], "macro_f1": after["macro_f1"],
                       "torch_accuracy": before["accuracy"], "torch_macro_f1": before["macro_f1"],
                       "accuracy_delta_points": 100 * (after["accuracy"] - before["accuracy"]),
                       "macro_f1_delta_points": f1_delta,
                       "label_agreement": _agreement(reference, exported, run.decision),
                       "max_abs_logit_diff": float(np.abs(reference - exported).max())},
        "speed": {"texts_per_s": speed, "torch_texts_per_s": torch_speed, "speedup": speed / torch_speed,
                  "threads": torch.get_num_threads()},
    }
    if not checks["passed"]:
        checks["failure"] = (f"validation macro-F1 {after['macro_f1']:.4f} is {-f1_delta:.2f} points below "
                             f"PyTorch's {before['macro_f1']:.4f} (tolerance {tolerance_points} points)")
    return checks


def checks_table(checks: dict) -> str:
    quality, speed = checks["validation"], checks["speed"]
    return markdown_table(
        ["export", "passed", "accuracy", "macro-F1", "change (points)", "same label", "texts/s", "x PyTorch"],
        [[f"{checks['backend']}-{checks['precision']}", str(checks["passed"]), f"{quality['accuracy']:.4f}",
          f"{quality['macro_f1']:.4f}", f"{quality['macro_f1_delta_points']:+.2f}",
          f"{quality['label_agreement']:.2%}", f"{speed['texts_per_s']:.0f}", f"{speed['speedup']:.2f}"]])
