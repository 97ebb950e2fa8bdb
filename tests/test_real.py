"""Real runs: the real MiniLM on real AG News, and a 2-process `accelerate launch` (marked slow; CI runs them)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from newstune.config import load_config
from newstune.modeling.infer import cpu_has_native_bf16

from .conftest import SHARED_DATA, needs_shared_data, tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@needs_shared_data()
@pytest.mark.parametrize("recipe, floor, max_trainable", [("minilm_lora", 0.85, 23_000_000),
                                                          ("minilm_lora_cached", 0.83, 200_000)])
def test_minilm_lora_on_2000_ag_news_rows(tmp_path, recipe, floor, max_trainable):
    from newstune.training.train import train

    config = load_config(ROOT / f"recipes/ag_news/{recipe}.yaml", [
        f"data.dir={SHARED_DATA / 'ag_news'}", "data.max_train_rows=2000", "data.max_eval_rows=1000",
        "train.epochs=1", "train.batch_size=16", "train.precision=auto", "eval.latency_samples=5"])
    run_dir, metrics = train(config, tmp_path / "ag")
    assert metrics["test"]["n"] == 1000
    assert metrics["test"]["accuracy"] >= floor
    assert metrics["efficiency"]["precision"] == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert metrics["efficiency"]["trainable_params"] < max_trainable
    assert metrics["baseline"]["test"]["n"] == 1000  # the TF-IDF baseline, on the run's own test rows


@pytest.mark.slow
def test_two_process_accelerate_launch(tiny_models, tiny_data, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config(tiny_models["bert"], tiny_data, **{"train.epochs": 8})))
    # accelerate routes multi-process launches through torchrun only with --multi_gpu; without a GPU the
    # processes run data-parallel on CPU with gloo (its --cpu launcher starts a single process).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "newstune.cli", "train", str(recipe), "--output-dir", str(tmp_path / "ddp")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, "\n".join(line for line in result.stderr.splitlines() if "it/s]" not in line)[-6000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["efficiency"]["num_processes"] == 2
    assert metrics["test"]["accuracy"] > 0.6
