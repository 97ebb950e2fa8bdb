"""What `train()` does after the loop, one step each: the blend with the baseline, the decision rule, the final
scores, the baseline, calibration, efficiency figures, plots and the card. Each step takes what it needs and returns
what it made, so it can be tested alone; `finish` composes them and writes the run folder."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from newstune.config import RunConfig
from newstune.data.batching import tokenize_texts
from newstune.data.registry import HOLDOUT, DatasetBundle, load_eval_set
from newstune.decisions.baseline import ChosenBaseline, choose_baseline, compact, fit_baseline
from newstune.decisions.ensemble import Ensemble, encoder_alone, fit_ensemble, save_ensemble
from newstune.decisions.metrics import (
    calibration_report,
    classification_metrics,
    plot_confusion,
    plot_reliability,
    plot_training_curves,
)
from newstune.decisions.rule import Decision
from newstune.decisions.tuning import fit_decision
from newstune.modeling.infer import median_latency_ms, predict_logits
from newstune.modeling.model import directory_size_bytes, save_model
from newstune.paths import cache_dir
from newstune.reporting.card import write_card
from newstune.rundir.run import MODEL_DIR, write_decision, write_metrics

log = logging.getLogger("newstune")


@dataclass
class TrainedModel:
    """What the loop hands over: the model with its best weights, and what scoring it needs."""

    config: RunConfig
    run_dir: Path
    bundle: DatasetBundle
    model: torch.nn.Module
    tokenizer: object
    encoded: dict[str, list[list[int]]]  # token ids of every split
    precision: str
    device: str
    history: list[dict]  # the loop's metrics.jsonl records

    @property
    def label_names(self) -> list[str]:
        return self.bundle.label_names

    @property
    def multi_label(self) -> bool:
        return bool(self.bundle.info.get("multi_label"))

    def labels(self, split: str) -> np.ndarray:
        return np.asarray(self.bundle.splits[split].labels)

    def encoder_logits(self, split: str) -> np.ndarray:
        return self.logits_of_ids(self.encoded[split], progress=True, desc=f"evaluate {split}")

    def logits_of_ids(self, ids: list[list[int]], progress: bool = False, desc: str = "evaluate") -> np.ndarray:
        return predict_logits(self.model, ids, self.tokenizer.pad_token_id, self.config.train.eval_batch_size,
                              self.precision, self.device, progress=progress, desc=desc).numpy()


def blended(logits: np.ndarray, texts: list[str], ensemble: Ensemble | None) -> np.ndarray:
    """The encoder's logits of `texts`, blended with the TF-IDF model when the run has an ensemble."""
    return logits if ensemble is None else ensemble.combine(logits, texts)


def ensemble_step(trained: TrainedModel, val_encoder: np.ndarray,
                  chosen: ChosenBaseline) -> tuple[Ensemble, dict]:
    """eval.ensemble: the TF-IDF model, temperatures and combiner (weight or logistic layer), all chosen on
    validation."""
    start = time.perf_counter()
    ensemble, report = fit_ensemble(trained.bundle, val_encoder, trained.config.train.metric, trained.config.eval,
                                    chosen)
    report["fit_seconds"] = time.perf_counter() - start
    chosen_rule = (f"baseline weight {ensemble.weight:.2f}" if ensemble.stack is None
                   else f"logistic layer, C {ensemble.stack.c:g}")
    log.info("ensemble: %s chosen on validation (%.1f s)", chosen_rule, report["fit_seconds"])
    return ensemble, report


def decision_step(trained: TrainedModel, val_logits: np.ndarray, ensemble: Ensemble | None) -> Decision:
    """The decision rule (calibration, threshold or class bias) fitted on validation logits only."""
    decision = fit_decision(trained.labels("validation"), val_logits, trained.config.eval, trained.multi_label)
    return decision if ensemble is None else replace(decision, ensemble=ensemble.settings())


def baseline_step(trained: TrainedModel, chosen: ChosenBaseline) -> dict:
    """The TF-IDF baseline on the run's own splits (seconds): what the fine-tune must beat."""
    result = compact(fit_baseline(trained.bundle, trained.config.train.metric, trained.config.eval,
                                  with_test=trained.config.eval.test, chosen=chosen))
    log.info("baseline %s: %s", result["model"],
             json.dumps({k: result[k] for k in ("validation", "test") if k in result}))
    return result


def calibration_step(trained: TrainedModel, decision: Decision, logits: dict[str, np.ndarray]) -> dict:
    """ECE, Brier and log loss before and after calibration, per split."""
    report: dict = {"method": decision.calibration, "temperature": decision.temperature}
    for split, split_logits in logits.items():
        report[split] = calibration_report(trained.labels(split), split_logits, decision)
    return report


def extra_evaluations_step(trained: TrainedModel, decision: Decision, ensemble: Ensemble | None) -> dict:
    """Each configured extra set (e.g. out-of-distribution), scored with the run's decision rule."""
    out = {}
    for extra in trained.config.eval.extra:
        split = load_eval_set(extra.data, extra.label_map, trained.label_names)
        ids = tokenize_texts(trained.tokenizer, split.texts, trained.config.data.max_length, cache_dir() / "tokens")
        logits = blended(trained.logits_of_ids(ids), split.texts, ensemble)
        out[f"extra:{extra.name}"] = classification_metrics(np.asarray(split.labels), logits, trained.label_names,
                                                            decision)
    return out


def efficiency_step(trained: TrainedModel, loop: dict, eval_split: str, eval_seconds: float) -> dict:
    """The loop's figures plus what only the saved model can tell: evaluation speed, size on disk, latency."""
    figures = {**loop, "eval_samples_per_s": len(trained.encoded[eval_split]) / max(eval_seconds, 1e-9),
               "saved_model_mb": directory_size_bytes(trained.run_dir / MODEL_DIR) / 2**20,
               "latency_ms_median": median_latency_ms(trained.model, trained.encoded[eval_split][:50],
                                                      trained.tokenizer.pad_token_id, trained.precision,
                                                      trained.device, trained.config.eval.latency_samples)}
    if trained.device == "cuda":
        figures["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return figures


def plots_step(trained: TrainedModel, decision: Decision, final: dict, final_logits: np.ndarray,
               final_split: str) -> None:
    """Confusion matrix, reliability diagram and training curves as PNGs in the run folder."""
    name, run_dir = trained.config.name, trained.run_dir
    if not trained.multi_label:
        plot_confusion(final["confusion_matrix"], trained.label_names, run_dir / f"confusion_{final_split}.png",
                       f"{name}: {final_split}")
    plot_reliability(trained.labels(final_split), final_logits, decision, run_dir / f"reliability_{final_split}.png",
                     f"{name}: {final_split}")
    plot_training_curves(trained.history, run_dir / "training_curves.png", name)


def finish(trained: TrainedModel, loop: dict, extra_metrics: dict) -> dict:
    """Every post-training step in order; writes the model, decision.json, metrics.json, plots and the card.

    `loop` holds the loop's efficiency figures, `extra_metrics` what the loop alone knows (best epoch, teacher)."""
    cfg = trained.config
    val_texts = trained.bundle.splits["validation"].texts
    val_encoder = trained.encoder_logits("validation")
    chosen = choose_baseline(trained.bundle, cfg.train.metric, cfg.eval) if (
        cfg.eval.baseline or cfg.eval.ensemble != "none") else None  # chosen once, for the blend and the report
    ensemble, ensemble_report = ensemble_step(trained, val_encoder, chosen) if cfg.eval.ensemble != "none" else (
        None, None)
    val_logits = blended(val_encoder, val_texts, ensemble)
    decision = decision_step(trained, val_logits, ensemble)
    validation = classification_metrics(trained.labels("validation"), val_logits, trained.label_names, decision)
    final_split = "test" if cfg.eval.test else "validation"
    start = time.perf_counter()
    final_encoder = trained.encoder_logits(final_split)
    final_logits = blended(final_encoder, trained.bundle.splits[final_split].texts, ensemble)
    final = classification_metrics(trained.labels(final_split), final_logits, trained.label_names, decision)
    eval_seconds = time.perf_counter() - start
    if ensemble_report is not None:
        ensemble_report["encoder_alone"] = encoder_alone(
            {split: trained.labels(split) for split in ("validation", final_split)},
            {"validation": val_encoder, final_split: final_encoder}, trained.label_names, cfg.eval,
            trained.multi_label)
    save_model(trained.model, trained.tokenizer, trained.run_dir / MODEL_DIR)
    logits = {"validation": val_logits, final_split: final_logits}
    metrics = {"validation": validation, **({"test": final} if cfg.eval.test else {}),
               "threshold": decision.threshold, "decision": decision.to_dict(),
               "calibration": calibration_step(trained, decision, logits),
               "efficiency": efficiency_step(trained, loop, final_split, eval_seconds),
               **extra_metrics, "leaky": bool(trained.bundle.info.get("leaky", False))}
    metrics.update(extra_evaluations_step(trained, decision, ensemble))
    if HOLDOUT in trained.encoded and cfg.eval.test:  # scored once, like test; nothing reads it to choose
        holdout = blended(trained.encoder_logits(HOLDOUT), trained.bundle.splits[HOLDOUT].texts, ensemble)
        metrics[HOLDOUT] = classification_metrics(trained.labels(HOLDOUT), holdout, trained.label_names, decision)
    if cfg.eval.baseline:
        metrics["baseline"] = baseline_step(trained, chosen)
    if ensemble is not None:
        metrics["ensemble"] = ensemble_report
        save_ensemble(trained.run_dir, ensemble)
    write_decision(trained.run_dir, decision)
    write_metrics(trained.run_dir, metrics)
    plots_step(trained, decision, final, final_logits, final_split)
    write_card(trained.run_dir)
    return metrics
