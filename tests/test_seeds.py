import json
import os
import shutil

import pytest
import yaml

from newstune.config import validate
from newstune.errors import NewstuneError
from newstune.reporting.seed_table import spread
from newstune.training.seeds import SUMMARY_FILE, finish_seeds, train_seeds
from newstune.training.train import train

from .conftest import tiny_config
from .test_train import cli


def tiny_recipe(tiny_models, tiny_data, **overrides):
    return validate(tiny_config(tiny_models["bert"], tiny_data, **{"train.epochs": 1, **overrides}))


def test_each_seed_is_its_own_run_and_the_summary_is_their_mean(tiny_models, tiny_data, tmp_path):
    group, summary = train_seeds(tiny_recipe(tiny_models, tiny_data), 2, tmp_path / "group")
    runs = [json.loads((group / f"seed-{seed}" / "metrics.json").read_text()) for seed in (7, 8)]
    losses = [run["test"]["loss"] for run in runs]
    assert losses[0] != losses[1], "the second run must use the next seed"
    assert summary["test"]["loss"]["values"] == pytest.approx(losses)
    assert summary["test"]["loss"]["mean"] == pytest.approx(sum(losses) / 2)
    assert summary["test"]["loss"]["std"] == pytest.approx(abs(losses[0] - losses[1]) / 2 ** 0.5)
    assert json.loads((group / SUMMARY_FILE).read_text()) == summary
    assert set(summary["test"]["recall_per_class"]) == {"business", "science", "sports"}
    seed_configs = [yaml.safe_load((group / f"seed-{seed}" / "config.yaml").read_text()) for seed in (7, 8)]
    assert [c["train"]["seed"] for c in seed_configs] == [7, 8]


def test_spread_is_the_sample_standard_deviation():
    figure = spread([0.90, 0.92, 0.94])
    assert figure["mean"] == pytest.approx(0.92)
    assert figure["std"] == pytest.approx(0.02)


def test_an_interrupted_group_finishes_only_what_is_missing(tiny_models, tiny_data, tmp_path):
    group, first = train_seeds(tiny_recipe(tiny_models, tiny_data), 2, tmp_path / "group")
    kept = group / "seed-7" / "metrics.json"
    stamp = os.stat(kept).st_mtime_ns
    shutil.rmtree(group / "seed-8")  # as if stopped before seed 8 began
    again = finish_seeds(group)
    assert os.stat(kept).st_mtime_ns == stamp, "a finished seed run is never retrained or rewritten"
    assert again["test"]["loss"]["values"] == pytest.approx(first["test"]["loss"]["values"], abs=1e-6)


def test_an_existing_group_folder_is_never_overwritten(tiny_models, tiny_data, tmp_path):
    (tmp_path / "group").mkdir()
    (tmp_path / "group" / "notes.txt").write_text("mine")
    with pytest.raises(NewstuneError, match="already exists"):
        train_seeds(tiny_recipe(tiny_models, tiny_data), 2, tmp_path / "group")
    assert (tmp_path / "group" / "notes.txt").read_text() == "mine"


def test_the_cli_refuses_one_seed_in_one_line(tiny_models, tiny_data, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config(tiny_models["bert"], tiny_data)))
    result = cli("train", str(recipe), "--seeds", "0", cwd=tmp_path)
    assert result.returncode != 0 and "a spread needs at least 2 seeds" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_seed_run_stopped_mid_training_is_resumed_not_restarted(tiny_models, tiny_data, tmp_path):
    recipe = tiny_recipe(tiny_models, tiny_data, **{"train.epochs": 2})
    _, whole = train_seeds(recipe, 2, tmp_path / "whole")
    group = tmp_path / "stopped"
    group.mkdir()
    shutil.copy(tmp_path / "whole" / "seeds.yaml", group / "seeds.yaml")
    shutil.copytree(tmp_path / "whole" / "seed-7", group / "seed-7")
    second = recipe.model_copy(deep=True)
    second.train.seed = 8
    train(second, group / "seed-8", stop_after_steps=5)  # a checkpoint, no metrics: as if stopped
    assert not (group / "seed-8" / "metrics.json").exists()
    resumed = finish_seeds(group)
    assert resumed["test"]["loss"]["values"] == pytest.approx(whole["test"]["loss"]["values"], abs=1e-5)


def test_the_results_table_shows_each_group_as_mean_and_spread(tiny_models, tiny_data, tmp_path):
    from newstune.reporting.seed_table import write_seed_table

    group, _ = train_seeds(tiny_recipe(tiny_models, tiny_data), 2, tmp_path / "group")
    single, _ = train(tiny_recipe(tiny_models, tiny_data, **{"lora.r": 2}), tmp_path / "single")
    f1 = [json.loads((group / f"seed-{s}" / "metrics.json").read_text())["test"]["macro_f1"] for s in (7, 8)]
    rows = write_seed_table([group, single], tmp_path / "out")
    table = (tmp_path / "out" / "results.md").read_text().splitlines()
    mean, std = sum(f1) / 2, abs(f1[0] - f1[1]) / 2 ** 0.5
    assert "| group | files | " in table[2] and f"{mean:.4f} ± {std:.4f}" in table[2]
    assert "LoRA r=2 qv" in table[3] and " ± " not in table[3].split("|")[7], "one run has no spread"
    assert [row["seeds"] for row in rows] == [[7, 8], [7]]
    shutil.rmtree(group / "seed-8" / "model")
    (group / "seed-8" / "metrics.json").unlink()
    with pytest.raises(NewstuneError, match="unfinished run"):
        write_seed_table([group], tmp_path / "out2")


def test_a_seed_folder_without_a_checkpoint_is_kept_aside_and_retrained(tiny_models, tiny_data, tmp_path):
    group, whole = train_seeds(tiny_recipe(tiny_models, tiny_data), 2, tmp_path / "group")
    shutil.rmtree(group / "seed-8")
    (group / "seed-8").mkdir()
    (group / "seed-8" / "notes.txt").write_text("killed before its first checkpoint")
    again = finish_seeds(group)
    aside = list(group.glob("seed-8.incomplete-*"))
    assert len(aside) == 1 and (aside[0] / "notes.txt").read_text() == "killed before its first checkpoint"
    assert again["test"]["loss"]["values"] == pytest.approx(whole["test"]["loss"]["values"], abs=1e-6)


def test_resuming_a_plain_run_as_a_group_is_one_clear_error(tiny_models, tiny_data, tmp_path):
    from newstune.training.seeds import train_or_resume

    (tmp_path / "run").mkdir()
    with pytest.raises(NewstuneError, match="not a seed group"):
        train_or_resume(None, 3, None, tmp_path / "run")


def test_the_test_curve_logs_test_scores_that_no_choice_reads(tiny_models, tiny_data, tmp_path):
    run_dir, metrics = train(validate(tiny_config(tiny_models["bert"], tiny_data, **{
        "train.epochs": 3, "eval.test_curve": True, "eval.calibration": "none"})), tmp_path / "run")
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tests = [h for h in history if h["kind"] == "test"]
    evals = [h for h in history if h["kind"] == "eval"]
    assert [h["epoch"] for h in tests] == [0, 1, 2]
    assert [h["train_seconds"] for h in tests] == [h["train_seconds"] for h in evals]
    assert evals[0]["train_seconds"] < evals[1]["train_seconds"] < evals[2]["train_seconds"]
    best = next(h for h in tests if h["epoch"] == metrics["best_epoch"])
    assert best["accuracy"] == pytest.approx(metrics["test"]["accuracy"]), "the best epoch's weights are the run's"
    with pytest.raises(NewstuneError, match="test_curve"):
        validate(tiny_config(tiny_models["bert"], tiny_data, **{"eval.test_curve": True, "eval.test": False}))
