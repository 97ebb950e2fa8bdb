"""The post-training steps, each alone, on hand-made logits and splits (no training): what `train()` composes."""

import numpy as np
import pytest

from newstune.config import validate
from newstune.data.registry import DatasetBundle
from newstune.data.splits import TextSplit
from newstune.decisions.baseline import choose_baseline
from newstune.training import steps

from .conftest import TOPICS, synthetic_rows, tiny_config

LABELS = list(TOPICS)


def hand_made(tmp_path, tiny_models, test_labels=None, **overrides) -> steps.TrainedModel:
    """A TrainedModel whose splits are synthetic news rows; no model is needed by the steps tested here."""
    def split(n, seed):
        rows = synthetic_rows(n, seed)
        return TextSplit([text for text, _ in rows], [LABELS.index(label) for _, label in rows])

    splits = {"train": split(240, 1), "validation": split(60, 2), "test": split(45, 3)}
    if test_labels is not None:
        splits["test"].labels = test_labels
    config = validate(tiny_config(tiny_models["bert"], tmp_path, **overrides))
    (tmp_path / "run").mkdir(exist_ok=True)
    return steps.TrainedModel(config, tmp_path / "run", DatasetBundle(splits, LABELS), None, None, {}, "fp32", "cpu",
                              [{"kind": "train", "epoch": 0, "step": 5, "loss": 1.0, "lr": 0.1},
                               {"kind": "eval", "epoch": 0, "step": 5, "loss": 0.9, "accuracy": 0.5, "macro_f1": 0.4}])


def noisy_logits(labels, seed, strength=1.5):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(labels), len(LABELS)))
    logits[np.arange(len(labels)), labels] += strength
    return logits * 3.0  # over-confident: temperature scaling has something to fix


def test_decision_step_reads_validation_only(tmp_path, tiny_models):
    """Fails if the decision rule (temperature, threshold, bias) is fitted on any split but validation."""
    first = hand_made(tmp_path, tiny_models)
    scrambled = hand_made(tmp_path, tiny_models, test_labels=list(np.roll(first.labels("test"), 7)))
    val_logits = noisy_logits(first.labels("validation"), 0)
    decision = steps.decision_step(first, val_logits, None)
    assert decision == steps.decision_step(scrambled, val_logits, None)
    assert decision.temperature > 1.0, "over-confident validation logits must get a temperature above 1"


def test_calibration_step_reports_each_split_before_and_after(tmp_path, tiny_models):
    """Fails if a split is missing, or the figures are not computed with the fitted temperature."""
    trained = hand_made(tmp_path, tiny_models)
    logits = {split: noisy_logits(trained.labels(split), i) for i, split in enumerate(("validation", "test"))}
    decision = steps.decision_step(trained, logits["validation"], None)
    report = steps.calibration_step(trained, decision, logits)
    assert report["temperature"] == decision.temperature and set(report) >= {"validation", "test"}
    assert report["validation"]["log_loss_after"] < report["validation"]["log_loss_before"]


def test_baseline_step_scores_test_once_with_settings_from_validation(tmp_path, tiny_models):
    """Fails if the baseline's settings change when test labels change, or if test is scored with eval.test off."""
    trained = hand_made(tmp_path, tiny_models)
    chosen = choose_baseline(trained.bundle, "macro_f1", trained.config.eval)
    result = steps.baseline_step(trained, chosen)
    assert result["test"]["accuracy"] > 0.6 and result["validation"]["accuracy"] > 0.6
    scrambled = hand_made(tmp_path, tiny_models, test_labels=list(np.roll(trained.labels("test"), 7)))
    rescored = steps.baseline_step(scrambled, choose_baseline(scrambled.bundle, "macro_f1", scrambled.config.eval))
    assert rescored["settings"] == result["settings"] and rescored["test"]["accuracy"] < 0.6
    no_test = hand_made(tmp_path, tiny_models, **{"eval.test": False})
    assert "test" not in steps.baseline_step(no_test, choose_baseline(no_test.bundle, "macro_f1", no_test.config.eval))


def test_plots_step_writes_every_picture(tmp_path, tiny_models):
    """Fails if a plot is skipped or written under another name than the card and README link."""
    trained = hand_made(tmp_path, tiny_models)
    logits = noisy_logits(trained.labels("test"), 1)
    decision = steps.decision_step(trained, noisy_logits(trained.labels("validation"), 0), None)
    final = {"confusion_matrix": np.eye(len(LABELS), dtype=int).tolist()}
    steps.plots_step(trained, decision, final, logits, "test")
    for name in ("confusion_test.png", "reliability_test.png", "training_curves.png"):
        assert (trained.run_dir / name).stat().st_size > 1000, name


@pytest.mark.parametrize("blend", [False, True])
def test_blended_is_the_encoder_alone_without_an_ensemble(blend):
    """Fails if a run without an ensemble has its logits changed, or one with an ensemble does not."""
    logits = np.arange(6, dtype=float).reshape(2, 3)

    class Doubling:
        def combine(self, values, texts):
            return values * 2

    out = steps.blended(logits, ["a", "b"], Doubling() if blend else None)
    np.testing.assert_array_equal(out, logits * 2 if blend else logits)
