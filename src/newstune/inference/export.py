"""Export a run: LoRA merged into the base weights as a plain HF model folder (backends: backend_export.py).

The export is built in a temporary folder next to the target and renamed only when every agreement check passes
(or --force keeps it anyway), so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from transformers import AutoModelForSequenceClassification

from newstune.decisions.ensemble import ENSEMBLE_DIR
from newstune.decisions.metrics import softmax
from newstune.errors import NewstuneError
from newstune.modeling.infer import predict_logits
from newstune.modeling.model import merge_lora
from newstune.rundir.run import load_run
from newstune.rundir.staging import staged_folder

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


def export_merged(run_dir: Path, out_dir: Path, tolerance: float = 1e-4, force: bool = False) -> dict:
    """Writes out_dir (a from_pretrained folder, no peft needed) and returns the agreement checks.

    A failed check raises and writes nothing unless force is set; then out_dir is kept with the checks recorded.
    """
    if out_dir.exists():
        raise NewstuneError(f"export folder {out_dir} already exists; choose another --merged")
    with staged_folder(out_dir, "choose another --merged") as staging:
        return _export_into(staging, run_dir, tolerance, force)


def _export_into(folder: Path, run_dir: Path, tolerance: float, force: bool) -> dict:
    run = load_run(run_dir, as_trained=False)
    ids = run.tokenizer(CHECK_TEXTS, truncation=True, max_length=run.config.data.max_length)["input_ids"]
    pad = run.tokenizer.pad_token_id
    reference = predict_logits(run.model, ids, pad).numpy()
    merged = merge_lora(run.model)
    merged.save_pretrained(folder, safe_serialization=True)
    run.tokenizer.save_pretrained(folder)
    (folder / "newstune.json").write_text(json.dumps({"run": str(run_dir), "threshold": run.threshold,
                                                      "decision": run.decision.to_dict(),
                                                      "label_names": run.label_names}, indent=1))
    if run.ensemble is not None:  # the decision above blends in the run's TF-IDF model: ship its files too
        shutil.copytree(run_dir / ENSEMBLE_DIR, folder / ENSEMBLE_DIR)
    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    checks = {"merged": _agreement(reference, predict_logits(plain, ids, pad).numpy())}
    _require(checks, tolerance, force)
    (folder / "export_checks.json").write_text(json.dumps(checks, indent=1))
    return checks
