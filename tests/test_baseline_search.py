"""The TF-IDF baseline and the budgeted search: what they may read to choose, and what they write."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import yaml

from newstune.config import EvalSettings, load_config
from newstune.data.registry import DatasetBundle, load_dataset
from newstune.data.speaker_record import credit_text, record_numbers, record_numbers_from_text
from newstune.data.splits import TextSplit
from newstune.decisions.baseline import fit_baseline
from newstune.errors import NewstuneError
from newstune.training.search import parse_space, search, smoothed_value, window_means
from newstune.training.train import layer_depth
from tests.conftest import synthetic_rows


def bundle_of(train, valid, test) -> DatasetBundle:
    names = sorted({label for _, label in train})

    def split(rows):
        return TextSplit([t for t, _ in rows], [names.index(label) for _, label in rows])

    return DatasetBundle({"train": split(train), "validation": split(valid), "test": split(test)}, names,
                         {"dataset": "files"})


def test_baseline_learns_the_topics_and_reports_every_candidate():
    bundle = bundle_of(synthetic_rows(300, 1), synthetic_rows(90, 2), synthetic_rows(90, 3))
    result = fit_baseline(bundle, "macro_f1", EvalSettings())
    assert result["test"]["accuracy"] > 0.9  # bug: features or labels misaligned would sit near 1/3
    assert len(result["candidates"]) == 6
    best = max(c["macro_f1"] for c in result["candidates"])
    assert result["validation"]["macro_f1"] == pytest.approx(best)


def test_baseline_never_sees_test_when_choosing():
    """Fails if test texts reach the vectoriser or test labels reach the choice of C / class weight."""
    train, valid, test = synthetic_rows(300, 1), synthetic_rows(90, 2), synthetic_rows(90, 3)
    test = [(f"{text} zzqtestonly", label) for text, label in test]
    original = fit_baseline(bundle_of(train, valid, test), "macro_f1", EvalSettings())
    names = sorted({label for _, label in train})
    rotated = [(text, names[(names.index(label) + 1) % len(names)]) for text, label in test]
    other = fit_baseline(bundle_of(train, valid, rotated), "macro_f1", EvalSettings())
    assert other["settings"] == original["settings"]
    assert other["candidates"] == original["candidates"]
    assert other["test"]["accuracy"] < 0.2 < original["test"]["accuracy"]  # test was scored, with its own labels
    # the vocabulary is the training split's: a word only test texts hold has no column
    assert original["features"] == other["features"]
    words_only = fit_baseline(bundle_of(train, valid, synthetic_rows(90, 3)), "macro_f1", EvalSettings())
    assert words_only["features"] == original["features"]


def test_record_numbers_round_trip_through_the_text():
    counts = {"barely_true_count": 3, "false_count": 1, "half_true_count": 0, "mostly_true_count": 5,
              "pants_fire_count": 2}
    text = f"Says taxes went up. Speaker: x. {credit_text(counts)}"
    assert np.allclose(record_numbers_from_text(text), record_numbers([counts])[0])
    assert record_numbers_from_text("no record here") is None


def test_layer_depth_for_layer_wise_decay():
    assert layer_depth("base_model.model.bert.encoder.layer.5.attention.self.query.weight", 6) == 1
    assert layer_depth("bert.encoder.layer.0.output.dense.weight", 6) == 6
    assert layer_depth("bert.embeddings.word_embeddings.weight", 6) == 7
    assert layer_depth("classifier.weight", 6) == 0


def test_parse_space_rejects_bad_items():
    dims = parse_space(["train.lr=log:1e-5:1e-3", "train.epochs=2,3", "lora.r=int:8:32"])
    assert [d.kind for d in dims] == ["log", "choice", "int"]
    assert dims[1].choices == (2, 3)
    for bad in ("train.lr", "train.lr=log:0:1", "train.lr=float:3:1", "train.lr=log:a:b"):
        with pytest.raises(NewstuneError):
            parse_space([bad])


def tiny_recipe(tmp_path, tiny_models, tiny_data):
    recipe = {"data": {"name": "files", "train_file": str(tiny_data / "train.csv"),
                       "valid_file": str(tiny_data / "valid.csv"), "test_file": str(tiny_data / "test.csv"),
                       "max_length": 32},
              "model": {"name": str(tiny_models["bert"])}, "lora": {"method": "full"},
              "train": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "precision": "fp32", "seed": 0},
              "eval": {"latency_samples": 0}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_search_reads_validation_only_and_writes_a_recipe(tmp_path, tiny_models, tiny_data, monkeypatch):
    """Fails if any trial evaluates the test split, or if the pick is not the best validation value."""
    from newstune.training import train as training

    seen = []
    original = training.Trainer.evaluate_split

    def spy(self, split, decision=None):
        seen.append(split)
        return original(self, split, decision)

    monkeypatch.setattr(training.Trainer, "evaluate_split", spy)
    recipe = tiny_recipe(tmp_path, tiny_models, tiny_data)
    summary = search(recipe, [], ["train.lr=log:1e-4:3e-3", "train.layer_lr_decay=float:0.7:1.0"],
                     tmp_path / "search", trials=4, budget_runs=10, evals_per_epoch=2, pruner="none")
    assert "test" not in seen and "validation" in seen
    complete = [t for t in summary["trials"] if t["state"] == "complete"]
    assert summary["best"]["value"] == max(t["value"] for t in complete)
    assert all(len(t["curve"]) == 4 for t in complete)  # 2 evaluations per epoch x 2 epochs
    best = load_config(tmp_path / "search" / "best.yaml")
    assert best.train.lr == pytest.approx(summary["best"]["params"]["train.lr"])
    assert best.eval.test  # the recipe users run scores test; only the trials did not
    assert json.loads((tmp_path / "search" / "search.json").read_text())["best"]["trial"] == summary["best"]["trial"]
    assert not list((tmp_path / "search").glob("trial-*/checkpoints"))


def test_search_stops_at_its_budget(tmp_path, tiny_models, tiny_data):
    """Fails if the budget is ignored: one full-length run of budget must stop the search after one trial."""
    recipe = tiny_recipe(tmp_path, tiny_models, tiny_data)
    summary = search(recipe, [], ["train.lr=log:1e-4:3e-3"], tmp_path / "search", trials=5, budget_runs=1.0,
                     evals_per_epoch=1, pruner="none")
    assert len(summary["trials"]) == 1
    assert summary["cost_single_runs"] == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("budget", [1.5, 1.4])
def test_search_stops_the_running_trial_at_its_budget(tmp_path, tiny_models, tiny_data, budget):
    """Fails if the trial running when the budget is spent trains on to its end (the 2026-12-07 HuffPost search
    cost 3.81 runs at --budget-runs 3), if a trial starts after it, if the cost passes the budget by more than
    one evaluation interval (here a quarter of a run), or if the cut-short trial is ranked."""
    recipe = tiny_recipe(tmp_path, tiny_models, tiny_data)
    summary = search(recipe, [], ["train.lr=log:1e-4:3e-3"], tmp_path / "search", trials=5, budget_runs=budget,
                     evals_per_epoch=2, pruner="none")
    assert [t["state"] for t in summary["trials"]] == ["complete", "budget"]
    assert budget <= summary["cost_single_runs"] <= budget + 0.25
    assert summary["trials"][1]["epochs_trained"] == pytest.approx(1.0, abs=0.02)  # 2 epochs asked, 1 in budget
    assert "value" not in summary["trials"][1] and summary["best"]["trial"] == 0


def test_search_reports_each_pruner_rung_once(tmp_path, tiny_models, tiny_data):
    """Fails if the end-of-epoch evaluation that follows a periodic one is reported on the same rung again (30
    steps an epoch, 4 evaluations asked: every 7 steps, then the epoch's end at step 30), which optuna ignores
    with a warning per epoch."""
    recipe = tiny_recipe(tmp_path, tiny_models, tiny_data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = search(recipe, [], ["train.lr=log:1e-4:3e-3"], tmp_path / "search", trials=1, budget_runs=5,
                         evals_per_epoch=4, pruner="hyperband")
    assert not [w for w in caught if "already reported" in str(w.message)]
    assert len(summary["trials"][0]["curve"]) == 10  # the curve keeps every evaluation: 5 an epoch


def test_smoothed_value_ranks_a_steady_curve_above_one_spike():
    """Fails if the window is ignored (the spike's 0.577 wins, as in the HuffPost search), if it averages the wrong
    points, or if a curve shorter than the window is not averaged whole."""
    spike = [0.50, 0.52, 0.577, 0.53, 0.53]  # trial 0 of the 2026-12-07 HuffPost search, in shape
    steady = [0.50, 0.55, 0.56, 0.57, 0.56]
    assert max(spike) > max(steady)
    assert smoothed_value(spike, 3) == pytest.approx((0.577 + 0.53 + 0.53) / 3)
    assert smoothed_value(steady, 3) == pytest.approx((0.56 + 0.57 + 0.56) / 3)
    assert smoothed_value(steady, 3) > smoothed_value(spike, 3)
    assert smoothed_value(spike, 1) == 0.577
    assert smoothed_value([0.4, 0.6], 3) == pytest.approx(0.5)
    assert window_means([0.2, 0.4, 0.6, 0.8], 2) == pytest.approx([0.2, 0.3, 0.5, 0.7])


def test_search_smooth_ranks_and_prunes_by_the_window(tmp_path, tiny_models, tiny_data, monkeypatch):
    """Fails if --smooth does not reach the value a trial is ranked by, or the value the pruner reads. The trial's
    validation curve is scripted (a tiny model's is flat, where every window gives the same number)."""
    import optuna

    from newstune.training import train as training

    curve = [0.5, 0.7, 0.55, 0.6]  # best single 0.7; best mean of two 0.625

    def scripted_train(config, run_dir, bundle=None, on_evaluate=None):
        for i, score in enumerate(curve):
            on_evaluate((i + 1) / 2, score)
        return run_dir, {"validation": {"macro_f1": max(curve), "accuracy": max(curve)}}

    reported = []
    original = optuna.Trial.report
    monkeypatch.setattr(optuna.Trial, "report", lambda self, value, step: (reported.append(value),
                                                                           original(self, value, step))[1])
    monkeypatch.setattr(training, "train", scripted_train)
    recipe = tiny_recipe(tmp_path, tiny_models, tiny_data)
    summary = search(recipe, [], ["train.lr=log:1e-4:3e-3"], tmp_path / "search", trials=1, budget_runs=5,
                     evals_per_epoch=2, pruner="none", smooth=2)
    trial = summary["trials"][0]
    assert trial["value"] == pytest.approx(0.625)
    assert trial["best_single"] == pytest.approx(0.7)
    assert reported == pytest.approx([0.5, 0.6, 0.625, 0.575])
    assert "mean of 2 consecutive evaluations" in (tmp_path / "search" / "best.yaml").read_text()


def test_search_smooth_refuses_bad_windows(tmp_path, tiny_models, tiny_data):
    recipe = tiny_recipe(tmp_path, tiny_models, tiny_data)
    with pytest.raises(NewstuneError, match="--smooth 0"):
        search(recipe, [], ["train.lr=log:1e-4:3e-3"], tmp_path / "a", smooth=0)
    with pytest.raises(NewstuneError, match="train.metric"):
        search(recipe, ["train.metric=loss"], ["train.lr=log:1e-4:3e-3"], tmp_path / "b", smooth=3)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_holdout_slice_is_fixed_and_kept_out(tiny_data):
    config = load_config_for_files(tiny_data, holdout_fraction=0.1)
    first = load_dataset(config.data, seed=1)
    second = load_dataset(config.data, seed=2)
    assert first.splits["holdout"].texts == second.splits["holdout"].texts  # same rows whatever the seed
    held = set(first.splits["holdout"].texts)
    assert held.isdisjoint(first.splits["train"].texts)
    assert len(first.splits["holdout"]) == pytest.approx(48, abs=3)


def load_config_for_files(tiny_data, **data):
    from newstune.config import validate

    return validate({"data": {"name": "files", "train_file": str(tiny_data / "train.csv"), **data},
                     "model": {"name": "x"}})


def test_baseline_in_a_trained_run(tmp_path, tiny_models, tiny_data):
    from newstune.reporting.report import run_row
    from newstune.training.train import train

    config = load_config(tiny_recipe(tmp_path, tiny_models, tiny_data))
    run_dir, metrics = train(config, tmp_path / "run")
    assert set(metrics["baseline"]) >= {"validation", "test", "fit_seconds", "settings"}
    assert metrics["baseline"]["test"]["n"] == metrics["test"]["n"]
    row = run_row(run_dir)
    assert row["vs_baseline"] == f"{metrics['test']['macro_f1'] - metrics['baseline']['test']['macro_f1']:+.4f}"
    assert "## Baseline" in (run_dir / "model" / "README.md").read_text()
    off = config.model_copy(deep=True)
    off.eval.baseline = False
    assert "baseline" not in train(off, tmp_path / "run-off")[1]
