"""`newstune calibrate RUN`: fit a finished run's decision rule again on its validation split (for runs trained
before calibration existed, or to switch method), re-evaluate, and keep the previous metrics.json beside it."""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from newstune.data.batching import tokenize_texts
from newstune.data.registry import HOLDOUT, load_dataset
from newstune.decisions.ensemble import encoder_alone, fit_ensemble, save_ensemble
from newstune.decisions.metrics import calibration_report, classification_metrics, plot_reliability
from newstune.decisions.tuning import fit_decision
from newstune.errors import NewstuneError
from newstune.paths import cache_dir
from newstune.reporting.card import write_card
from newstune.rundir.run import METRICS_FILE, LoadedRun, load_run, read_metrics, write_decision, write_metrics


def split_logits(run: LoadedRun, texts: list[str], batch_size: int = 64, blend: bool = True) -> np.ndarray:
    """The logits the run's decision rule reads (blend=False: the encoder's alone, even where the run blends)."""
    ids = tokenize_texts(run.tokenizer, texts, run.config.data.max_length, cache_dir() / "tokens")
    if blend:
        return run.logits(texts, ids, batch_size, progress=True)
    return run.scorer.logits(ids, batch_size, progress=True, throughput=True)


def keep_previous(run_dir: Path) -> Path | None:
    """A copy of the current metrics.json under a new timestamped name (never over an earlier copy)."""
    current = run_dir / METRICS_FILE
    if not current.is_file():
        return None
    backup = run_dir / f"metrics.before-calibrate-{time.strftime('%Y%m%d-%H%M%S')}.json"
    n = 1
    while backup.exists():
        backup = run_dir / f"metrics.before-calibrate-{time.strftime('%Y%m%d-%H%M%S')}-{n}.json"
        n += 1
    shutil.copy2(current, backup)
    return backup


def calibrate_run(run_dir: Path, method: str | None = None, tune_class_bias: bool | None = None,
                  data_dir: Path | None = None, ensemble: str | None = None, combiner: str | None = None) -> dict:
    """Refit on validation (never test), evaluate validation, test and holdout with the new rule, write everything.

    ensemble: "tfidf" fits the blend with the TF-IDF model (`newstune ensemble RUN`), "none" drops it, None keeps
    what the run has (and refits its weight). combiner: weighted, logistic or auto (None: the run's
    eval.ensemble_combiner)."""
    run = load_run(Path(run_dir))
    if combiner is None and run.ensemble is not None and run.config.eval.ensemble_combiner != "auto":
        combiner = run.ensemble.combiner  # what `newstune ensemble --combiner` last fitted, not the recipe's default
    if not (run.run_dir / METRICS_FILE).is_file():
        raise NewstuneError(f"{run.run_dir} has no metrics.json (training did not finish); finish it first: "
                            f"newstune train --resume {run.run_dir}")
    settings = run.config.eval.model_copy(update={k: v for k, v in (("calibration", method),
                                                                     ("tune_class_bias", tune_class_bias),
                                                                     ("ensemble_combiner", combiner))
                                                  if v is not None})
    data = run.config.data if data_dir is None else run.config.data.model_copy(update={"dir": data_dir})
    bundle = load_dataset(data, run.config.train.seed)
    if bundle.label_names != run.label_names:
        raise NewstuneError(f"the data's labels {bundle.label_names} differ from the run's {run.label_names}; "
                            "point --data-dir at the data the run was trained on")
    metrics = read_metrics(run.run_dir)
    splits = ["validation", *(["test"] if run.config.eval.test else []),
              *([HOLDOUT] if HOLDOUT in metrics and HOLDOUT in bundle.splits else [])]
    encoder = {split: split_logits(run, bundle.splits[split].texts, blend=False) for split in splits}
    labels = {split: np.asarray(bundle.splits[split].labels) for split in splits}
    multi_label = bool(bundle.info.get("multi_label"))
    blend = run.ensemble is not None if ensemble is None else ensemble == "tfidf"
    logits, report = encoder, None
    if blend:
        fitted, report = fit_ensemble(bundle, encoder["validation"], run.config.train.metric, settings)
        logits = {split: fitted.combine(encoder[split], bundle.splits[split].texts) for split in splits}
    decision = fit_decision(labels["validation"], logits["validation"], settings, multi_label)
    if blend:
        report["encoder_alone"] = encoder_alone(labels, encoder, run.label_names, settings, multi_label)
        decision = replace(decision, ensemble=fitted.settings())
    for split in splits:
        metrics[split] = classification_metrics(labels[split], logits[split], run.label_names, decision)
    final = "test" if "test" in splits else "validation"
    metrics.update({"threshold": decision.threshold, "decision": decision.to_dict(),
                    "calibration": {"method": decision.calibration, "temperature": decision.temperature,
                                    **{s: calibration_report(labels[s], logits[s], decision)
                                       for s in ("validation", final)}}})
    metrics.pop("ensemble", None)
    if report is not None:
        metrics["ensemble"] = report
    backup = keep_previous(run.run_dir)
    if blend:
        save_ensemble(run.run_dir, fitted)
    write_decision(run.run_dir, decision)
    write_metrics(run.run_dir, metrics)
    plot_reliability(labels[final], logits[final], decision, run.run_dir / f"reliability_{final}.png",
                     f"{run.config.name}: {final}")
    write_card(run.run_dir)
    return {"metrics": metrics, "previous_metrics": str(backup) if backup else None}
