"""Export a run: LoRA merged into the base weights as a plain HF model folder, optionally ONNX (+ int8)."""

from __future__ import annotations

import json
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
    return {"max_abs_logit_diff": float(np.abs(reference - other).max()),
            "max_abs_prob_diff": float(np.abs(ref_probs - other_probs).max()),
            "same_argmax": bool((reference.argmax(1) == other.argmax(1)).all())}


def export_merged(run_dir: Path, out_dir: Path, onnx: bool = False, quantize: bool = False,
                  tolerance: float = 1e-4) -> dict:
    """Writes out_dir (a from_pretrained folder, no peft needed) and returns the agreement checks."""
    if out_dir.exists():
        raise NewstuneError(f"export folder {out_dir} already exists; choose another --merged")
    if quantize and not onnx:
        raise NewstuneError("--quantize applies to the ONNX export: add --onnx")
    run = load_run(run_dir, as_trained=False)
    ids = run.tokenizer(CHECK_TEXTS, truncation=True, max_length=run.config.data.max_length)["input_ids"]
    pad = run.tokenizer.pad_token_id
    reference = predict_logits(run.model, ids, pad).numpy()
    merged = merge_lora(run.model)
    merged.save_pretrained(out_dir, safe_serialization=True)
    run.tokenizer.save_pretrained(out_dir)
    (out_dir / "newstune.json").write_text(json.dumps({"run": str(run_dir), "threshold": run.threshold,
                                                       "label_names": run.label_names}, indent=1))
    plain = AutoModelForSequenceClassification.from_pretrained(out_dir).eval()
    checks = {"merged": _agreement(reference, predict_logits(plain, ids, pad).numpy())}
    if checks["merged"]["max_abs_logit_diff"] > tolerance:
        raise NewstuneError(f"merged model disagrees with the adapter model by "
                            f"{checks['merged']['max_abs_logit_diff']:.2e} > {tolerance}")
    if onnx:
        checks.update(export_onnx(plain, run.tokenizer, out_dir, ids, reference, quantize))
    (out_dir / "export_checks.json").write_text(json.dumps(checks, indent=1))
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
