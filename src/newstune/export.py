"""Export a run: LoRA merged into the base weights as a plain HF model folder, optionally ONNX (+ int8).

The export is built in a temporary folder next to the target and renamed only when every agreement check passes
(or --force keeps it anyway), so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from newstune.errors import NewstuneError
from newstune.evaluate import softmax
from newstune.infer import predict_logits
from newstune.model import merge_lora
from newstune.run import load_run

CHECK_TEXTS = [
    "Stocks rallied after the central bank held interest rates steady.",
    "The striker scored twice as the home team won the cup final.",
    "Scientists unveiled a new chip that could speed up machine learning.",
    "Leaders met in Geneva to discuss the ceasefire.",
    "Says the governor cut school funding by 40 percent.",
]


def _agreement(reference: np.ndarray, other: np.ndarray) -> dict:
    ref_probs, other_probs = softmax(reference), softmax(other)
    mismatches = int((reference.argmax(1) != other.argmax(1)).sum())
    return {"max_abs_logit_diff": float(np.abs(reference - other).max()),
            "max_abs_prob_diff": float(np.abs(ref_probs - other_probs).max()),
            "same_argmax": mismatches == 0, "argmax_mismatches": mismatches}


def failed_checks(checks: dict, tolerance: float) -> list[str]:
    """One phrase per failed check: another predicted class on any check text, or merged logits off by > tolerance."""
    failures = []
    for name, check in checks.items():
        if not check["same_argmax"]:
            failures.append(f"'{name}' predicts another class than the adapter model on {check['argmax_mismatches']} "
                            f"of {len(CHECK_TEXTS)} check texts (max prob diff {check['max_abs_prob_diff']:.3f})")
        elif name == "merged" and check["max_abs_logit_diff"] > tolerance:
            failures.append(f"'merged' logits differ from the adapter model's by "
                            f"{check['max_abs_logit_diff']:.2e} > {tolerance}")
    return failures


def _require(checks: dict, tolerance: float, force: bool) -> None:
    failures = failed_checks(checks, tolerance)
    if failures and not force:
        raise NewstuneError(f"export check failed: {'; '.join(failures)}; nothing was written "
                            "(--force keeps the export anyway)")


def export_merged(run_dir: Path, out_dir: Path, onnx: bool = False, quantize: bool = False,
                  tolerance: float = 1e-4, force: bool = False) -> dict:
    """Writes out_dir (a from_pretrained folder, no peft needed) and returns the agreement checks.

    A failed check raises and writes nothing unless force is set; then out_dir is kept with the checks recorded.
    """
    if out_dir.exists():
        raise NewstuneError(f"export folder {out_dir} already exists; choose another --merged")
    if quantize and not onnx:
        raise NewstuneError("--quantize applies to the ONNX export: add --onnx")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # only ever a leftover partial export of this same name
    try:
        checks = _export_into(staging, run_dir, onnx, quantize, tolerance, force)
        if out_dir.exists():
            raise NewstuneError(f"export folder {out_dir} appeared while exporting; choose another --merged")
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return checks


def _export_into(folder: Path, run_dir: Path, onnx: bool, quantize: bool, tolerance: float, force: bool) -> dict:
    run = load_run(run_dir, as_trained=False)
    ids = run.tokenizer(CHECK_TEXTS, truncation=True, max_length=run.config.data.max_length)["input_ids"]
    pad = run.tokenizer.pad_token_id
    reference = predict_logits(run.model, ids, pad).numpy()
    merged = merge_lora(run.model)
    merged.save_pretrained(folder, safe_serialization=True)
    run.tokenizer.save_pretrained(folder)
    (folder / "newstune.json").write_text(json.dumps({"run": str(run_dir), "threshold": run.threshold,
                                                      "label_names": run.label_names}, indent=1))
    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    checks = {"merged": _agreement(reference, predict_logits(plain, ids, pad).numpy())}
    _require(checks, tolerance, force)
    if onnx:
        checks.update(export_onnx(plain, run.tokenizer, folder, ids, reference, quantize))
        _require(checks, tolerance, force)
    (folder / "export_checks.json").write_text(json.dumps(checks, indent=1))
    return checks


def export_onnx(model: torch.nn.Module, tokenizer, out_dir: Path, ids: list[list[int]], reference: np.ndarray,
                quantize: bool) -> dict:
    try:
        import onnxruntime as ort
    except ImportError:
        raise NewstuneError("ONNX export needs onnx and onnxruntime: pip install 'newstune[export]'") from None
    path = out_dir / "model.onnx"
    sample = tokenizer(CHECK_TEXTS[:2], padding=True, return_tensors="pt")
    torch.onnx.export(model, (sample["input_ids"], sample["attention_mask"]), str(path),
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                    "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    checks = {"onnx": _agreement(reference, _onnx_logits(ort, path, ids, tokenizer.pad_token_id))}
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = out_dir / "model.int8.onnx"
        quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8)
        checks["onnx_int8"] = _agreement(reference, _onnx_logits(ort, quantized, ids, tokenizer.pad_token_id))
    return checks


def _onnx_logits(ort, path: Path, ids: list[list[int]], pad: int) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rows = []
    for row in ids:
        feed = {"input_ids": np.asarray([row], dtype=np.int64), "attention_mask": np.ones((1, len(row)), np.int64)}
        rows.append(session.run(["logits"], feed)[0][0])
    return np.asarray(rows)
