"""Every recipe in recipes/ trains a few steps, in bf16 where the CPU has it (what `precision: auto` picks) and in
fp32, on its own real data with a tiny encoder of the recipe's architecture (the real weights are not needed to
find a recipe that cannot train: `lora.bias: all` crashed at the first bf16 step)."""

from __future__ import annotations

from pathlib import Path

import pytest

from newstune.config import load_config
from newstune.modeling.infer import cpu_has_native_bf16
from newstune.training.train import train

from .conftest import SHARED_DATA, needs_shared_data

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))
PRECISIONS = ["auto", "fp32"] if cpu_has_native_bf16() else ["fp32"]


@pytest.mark.slow
@needs_shared_data()
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_recipe_trains_a_few_steps(recipe, precision, tiny_models, tmp_path):
    raw = load_config(recipe)
    arch = "mpnet" if "mpnet" in raw.model.name else "bert"
    overrides = [f"model.name={tiny_models[arch]}", "data.max_length=32",
                 "data.max_train_rows=48", "data.max_eval_rows=24",
                 "train.batch_size=8", f"train.precision={precision}", "train.threads=1",
                 "eval.latency_samples=0", "eval.extra=[]", "data.augment.eda=false"]
    if raw.lora.top_layers:
        overrides.append("lora.top_layers=1")  # the tiny encoder has 2 layers
    if raw.data.name == "files" or raw.data.augment.synthetic_file:
        pytest.skip("needs the user's own files")
    config = load_config(recipe, overrides)
    if config.data.dir is None and config.data.name not in ("files",):
        folder = {"liar_subjects": "liar"}.get(config.data.name, config.data.name)
        config.data.dir = SHARED_DATA / folder
    run_dir, metrics = train(config, tmp_path / "run", stop_after_steps=2)
    assert metrics == {}  # stopped on purpose after two optimizer steps, resumably
    assert (run_dir / "checkpoints" / "last.safetensors").is_file()
