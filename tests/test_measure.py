"""compare / report / profile / sweep on tiny models."""

import json
import time

import optuna
import pytest
import torch
import yaml

from newstune.modeling.first_token import run_last_layer_on_first_token
from newstune.reporting.report import report_runs, run_row
from newstune.training.profile import analytic_train_flops, op_category
from newstune.training.sweep import compare, parse_grid, parse_variant, sweep

from .conftest import tiny_config


@pytest.mark.parametrize("name, phase, category", [
    ("aten::addmm", "forward", "gemm"), ("aten::mm", "backward", "gemm"), ("aten::linear", None, "gemm"),
    ("aten::bmm", "forward", "attention"), ("aten::_softmax", "forward", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "forward", "attention"),
    ("aten::native_layer_norm", "forward", "norm_elementwise"), ("aten::gelu", "forward", "norm_elementwise"),
    ("aten::native_dropout", "forward", "norm_elementwise"), ("aten::add_", "backward", "norm_elementwise"),
    ("aten::_foreach_mul_", "optimizer", "optimizer"), ("aten::mul_", "optimizer", "optimizer"),
    ("aten::stack", "data", "data"), ("aten::embedding_dense_backward", "backward", "norm_elementwise"),
    ("aten::nonzero", "forward", "other"),
])
def test_op_categories(name, phase, category):
    assert op_category(name, phase) == category


def tiny_bert_classifier(frozen: bool):
    """A random BERT classifier with eager attention; `frozen`: weights frozen, but gradients flow to the
    embeddings' output, as they do to LoRA adapters below: the backward computes input gradients only."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=256, max_position_embeddings=64, num_labels=3, attn_implementation="eager")
    model = BertForSequenceClassification(config)
    if frozen:
        model.requires_grad_(False)
        model.bert.embeddings.register_forward_hook(lambda module, inputs, output: output.requires_grad_())
    return model


def counted_flops(model, lengths: list[int], backward: bool) -> tuple[int, int]:
    """FlopCounterMode's FLOPs (encoder layers, whole model) summed over one text per length, unpadded."""
    from torch.utils.flop_counter import FlopCounterMode

    encoder = total = 0
    for n in lengths:
        with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(backward):
            logits = model(input_ids=torch.randint(5, 100, (1, n))).logits
            if backward:
                logits.sum().backward()
        encoder += sum(counter.get_flop_counts()["BertForSequenceClassification.bert.encoder"].values())
        total += counter.get_total_flops()
    return encoder, total


def test_analytic_forward_flops_match_flop_counter():
    model = tiny_bert_classifier(frozen=False).eval()
    lengths = [17, 40]
    encoder, total = counted_flops(model, lengths, backward=False)
    # a cached layer runs forward only, so caching all of them leaves the forward FLOPs
    forward = analytic_train_flops(model.config, lengths, cached_layers=model.config.num_hidden_layers)
    assert forward == encoder
    # the rest of the count is the pooler (2 x hidden^2 per text) and the classifier (2 x hidden x labels);
    # embeddings are lookups and adds, no matmul FLOPs
    assert total - encoder == len(lengths) * 2 * 64 * (64 + 3)
    assert forward == pytest.approx(total, rel=0.01)


@pytest.mark.parametrize("full_finetune", [False, True])
def test_analytic_training_flops_match_flop_counter(full_finetune):
    model = tiny_bert_classifier(frozen=not full_finetune).train()
    lengths = [17, 40]
    encoder, total = counted_flops(model, lengths, backward=True)
    # LoRA: linears' backward = input gradients only (x2 in all); attention's QK^T and AV multiply two activations,
    # so their backward costs two forwards even with every weight frozen (x3 in all)
    assert analytic_train_flops(model.config, lengths, full_finetune=full_finetune) == encoder
    assert encoder == pytest.approx(total, rel=0.02)  # pooler and head: forward + backward


def test_analytic_flops_of_the_first_token_last_layer_match_flop_counter():
    model = tiny_bert_classifier(frozen=True).train()
    assert run_last_layer_on_first_token(model)
    lengths = [17, 40]
    encoder, _ = counted_flops(model, lengths, backward=True)
    # keys and values for every token, query, attention row, output and feed-forward for token 0, in the last layer
    assert analytic_train_flops(model.config, lengths, first_token_last_layer=True) == encoder
    assert encoder < 0.7 * analytic_train_flops(model.config, lengths)


def recipe_file(tmp_path, tiny_models, tiny_data, **overrides):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_models["bert"], tiny_data, **{"train.epochs": 1, **overrides})))
    return path


def test_parse_variant_and_grid():
    assert parse_variant("lora_r8:lora.r=8,train.lr=1e-3") == ("lora_r8", ["lora.r=8", "train.lr=1e-3"])
    assert parse_grid(["lora.r=4,8", "lora.target_modules=qv,qkv"]) == {"lora.r": [4, 8],
                                                                       "lora.target_modules": ["qv", "qkv"]}


def test_compare_reports_failed_variant_and_finishes_the_others(tiny_models, tiny_data, tmp_path):
    recipe = recipe_file(tmp_path, tiny_models, tiny_data)
    rows = compare(recipe, [], ["lora:lora.method=lora", "broken:lora.target_modules=[nope]",
                                "full:lora.method=full,train.lr=1e-3"], tmp_path / "cmp")
    status = {r["run"]: r["status"] for r in rows}
    assert status == {"lora": "ok", "broken": "failed", "full": "ok"}
    broken = next(r for r in rows if r["run"] == "broken")
    assert "matches no linear module" in broken["reason"]
    for name in ("comparison.md", "comparison.csv", "comparison.json", "quality.png", "time.png", "memory.png",
                 "curves.png"):
        assert (tmp_path / "cmp" / name).is_file(), name
    ok = {r["run"]: r for r in rows if r["status"] == "ok"}
    assert ok["full"]["trainable"] > ok["lora"]["trainable"]
    assert "failed" in (tmp_path / "cmp" / "comparison.md").read_text()
    again = report_runs([tmp_path / "cmp" / "lora", tmp_path / "cmp" / "full"], tmp_path / "rep")
    assert [r["accuracy"] for r in again] == [ok["lora"]["accuracy"], ok["full"]["accuracy"]]


def test_sweep_budget_interrupt_and_resume(tiny_models, tiny_data, tmp_path, monkeypatch):
    recipe = recipe_file(tmp_path, tiny_models, tiny_data)
    grid = ["lora.r=2,4,32", "lora.target_modules=qv"]
    import newstune.training.sweep as sweep_module

    real_train = sweep_module.train_in_subprocess
    calls = []

    def interrupted(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(*args)

    monkeypatch.setattr(sweep_module, "train_in_subprocess", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep(recipe, [], grid, tmp_path / "sw", max_trainable=2_000)
    budget = json.loads((tmp_path / "sw" / "budget.json").read_text())
    assert len(budget["skipped"]) == 1 and list(budget["skipped"].values())[0] > 2_000
    monkeypatch.setattr(sweep_module, "train_in_subprocess", real_train)
    with pytest.raises(Exception, match="exists"):
        sweep(recipe, [], grid, tmp_path / "sw", max_trainable=2_000)
    rows = sweep(recipe, [], grid, tmp_path / "sw", max_trainable=2_000, resume=True)
    # the interrupted configuration was trained again on resume, and a Ctrl-C is no failed try
    assert {r["lora.r"]: (r["status"], r["failures"]) for r in rows} == {2: ("ok", 0), 4: ("ok", 0),
                                                                          32: ("skipped", 0)}
    assert len(calls) == 2 and sorted(r["lora.r"] for r in rows if r["status"] == "ok") == [2, 4]
    study = load_study(tmp_path / "sw")
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert [t.params.get("lora.r") for t in pruned] == [32]
    for name in ("sweep.md", "metric_vs_params.png", "best_recipe.yaml", "best_test.json"):
        assert (tmp_path / "sw" / name).is_file(), name
    trial_runs = [r["run_dir"] for r in rows if r["status"] == "ok"]
    assert all("test" not in json.loads(open(f"{d}/metrics.json").read()) or d == rows[0]["run_dir"]
               for d in trial_runs)


def load_study(sweep_dir):
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{sweep_dir / 'study.db'}")


def flaky_trainer(monkeypatch, fails: int, point: str = "lora.r=4") -> list[str]:
    """The real trainer, except that the first `fails` trainings of one grid point fail (FAILED written, as the
    real one does). Returns the lora.r override of every training call."""
    import newstune.training.sweep as sweep_module

    real_train, calls = sweep_module.train_in_subprocess, []

    def train(recipe, overrides, run_dir, log_path):
        calls.append(next(item for item in overrides if item.startswith("lora.r=")))
        if calls[-1] == point and calls.count(point) <= fails:
            run_dir.mkdir(parents=True)
            (run_dir / "FAILED").write_text(f"RuntimeError: out of memory (try {calls.count(point)})\n")
            return False
        return real_train(recipe, overrides, run_dir, log_path)

    monkeypatch.setattr(sweep_module, "train_in_subprocess", train)
    return calls


def test_sweep_retries_a_failed_training(tiny_models, tiny_data, tmp_path, monkeypatch):
    recipe = recipe_file(tmp_path, tiny_models, tiny_data)
    calls = flaky_trainer(monkeypatch, fails=1)
    rows = sweep(recipe, [], ["lora.r=2,4"], tmp_path / "sw", max_trainable=None)
    assert sorted(calls) == ["lora.r=2", "lora.r=4", "lora.r=4"]
    assert {r["lora.r"]: (r["status"], r["failures"]) for r in rows} == {2: ("ok", 0), 4: ("ok", 1)}
    states = sorted((t.params["lora.r"], t.state.name) for t in load_study(tmp_path / "sw").trials)
    assert states == [(2, "COMPLETE"), (4, "COMPLETE"), (4, "FAIL")]


def test_sweep_reports_a_configuration_that_always_fails(tiny_models, tiny_data, tmp_path, monkeypatch):
    recipe = recipe_file(tmp_path, tiny_models, tiny_data)
    calls = flaky_trainer(monkeypatch, fails=99)
    rows = sweep(recipe, [], ["lora.r=2,4"], tmp_path / "sw", max_trainable=None, max_retry=2)
    assert sorted(calls) == ["lora.r=2"] + ["lora.r=4"] * 3
    assert [(r["lora.r"], r["status"]) for r in rows] == [(2, "ok"), (4, "failed")]
    failed = rows[1]
    assert failed["failures"] == 3 and failed["reason"] == "RuntimeError: out of memory (try 3)"
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text()) == rows
    table = (tmp_path / "sw" / "sweep.md").read_text()
    assert "| failed | 3 |" in table and "out of memory (try 3)" in table
    assert yaml.safe_load((tmp_path / "sw" / "best_recipe.yaml").read_text())["lora"]["r"] == 2
    assert json.loads((tmp_path / "sw" / "best_test.json").read_text())["trial"] == rows[0]["trial"]


def test_pending_grid_points_never_count_a_failure_as_done():
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    from newstune.training.sweep import pending_grid_points, trial_outcomes

    study = optuna.create_study()
    space = {"lora.r": CategoricalDistribution([2, 4, 8])}
    combos = [{"lora.r": 2}, {"lora.r": 4}, {"lora.r": 8}]

    def add(r, state, **user_attrs):
        study.add_trial(create_trial(state=state, params={"lora.r": r}, distributions=space, user_attrs=user_attrs,
                                     value=0.5 if state == TrialState.COMPLETE else None))

    add(2, TrialState.COMPLETE, validation={})
    add(8, TrialState.PRUNED, skipped=9_999)
    add(4, TrialState.FAIL, failure="out of memory")
    assert pending_grid_points(study, combos, max_retry=2) == [{"lora.r": 4}]
    add(4, TrialState.FAIL, interrupted=True)  # Ctrl-C: not a failed try
    add(4, TrialState.FAIL, failure="out of memory")
    assert pending_grid_points(study, combos, max_retry=2) == [{"lora.r": 4}]
    add(4, TrialState.FAIL, failure="out of memory")
    assert pending_grid_points(study, combos, max_retry=2) == []
    statuses = {key: o["status"] for key, o in trial_outcomes(study, max_retry=2).items()}
    assert statuses == {'{"lora.r": 2}': "ok", '{"lora.r": 8}': "skipped", '{"lora.r": 4}': "failed"}


def test_sweep_retries_a_killed_trial(tiny_models, tiny_data, tmp_path, monkeypatch):
    import newstune.training.sweep as sweep_module
    from newstune.config import load_config

    monkeypatch.setattr(sweep_module, "HEARTBEAT_S", 1)
    monkeypatch.setattr(sweep_module, "GRACE_S", 1)
    recipe = recipe_file(tmp_path, tiny_models, tiny_data)
    (tmp_path / "sw").mkdir()
    # what a worker killed mid-training leaves: a RUNNING trial whose heartbeat stopped
    study, _ = sweep_module.open_study(tmp_path / "sw", "tiny", {"lora.r": [2]}, "grid", 7,
                                       load_config(recipe, []).train.metric, 2)
    with pytest.warns(UserWarning, match="Heartbeat"):  # optuna would rather beat inside study.optimize
        killed = study.ask()
    killed.suggest_categorical("lora.r", [2])
    study._storage.record_heartbeat(killed._trial_id)
    time.sleep(2)  # past GRACE_S
    rows = sweep(recipe, [], ["lora.r=2"], tmp_path / "sw", max_trainable=None, resume=True)
    assert [(r["lora.r"], r["status"], r["failures"]) for r in rows] == [(2, "ok", 1)]
    trials = load_study(tmp_path / "sw").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].system_attrs["retry_history"] == [0]  # re-queued by optuna's retry callback


@pytest.mark.parametrize("cached", [False, True])
def test_profile_breakdown_and_mfu(tiny_models, tiny_data, tmp_path, monkeypatch, cached):
    from transformers import AutoConfig

    from newstune.config import validate
    from newstune.training.profile import CATEGORIES, profile_run
    from newstune.training.train import Trainer

    masks, train_step = [], Trainer.train_step

    def recording_step(self, batch):
        masks.append(batch["attention_mask"].clone())
        return train_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", recording_step)
    overrides = {"lora.top_layers": 1, "train.cache_frozen_layers": True} if cached else {}
    config = validate(tiny_config(tiny_models["bert"], tiny_data, **overrides))
    result = profile_run(config, steps=3, warmup=1, out_dir=tmp_path / "prof")
    assert result["cached_layers"] == (1 if cached else 0)
    assert len(masks) == 1 + 3
    lengths = [n for mask in masks[1:] for n in mask.sum(1).tolist()]  # the profiled steps follow the warmup
    assert result["tokens"] == sum(lengths) < sum(mask.numel() for mask in masks[1:])
    # a training step runs the layers above the cached ones: an encoder that many layers deep
    trained = AutoConfig.from_pretrained(tiny_models["bert"])
    trained.num_hidden_layers -= result["cached_layers"]
    assert result["first_token_last_layer"]
    flop_per_s = analytic_train_flops(trained, lengths, first_token_last_layer=True) / result["wall_seconds"]
    assert result["achieved_tflops"] == pytest.approx(flop_per_s / 1e12, rel=1e-9)
    assert result["mfu"] == pytest.approx(flop_per_s / (result["matmul_peak_tflops"] * 1e12), rel=1e-9)
    assert result["tokens_per_s"] == pytest.approx(sum(lengths) / result["wall_seconds"], rel=1e-9)
    assert (tmp_path / "prof" / "trace.json").is_file() and (tmp_path / "prof" / "profile.json").is_file()
    assert set(result["category_share"]) == set(CATEGORIES)
    assert sum(result["category_share"].values()) == pytest.approx(1.0)
    assert result["category_ms"]["gemm"] > 0 and result["category_ms"]["optimizer"] > 0
    assert result["phase_ms"]["forward"] > 0 and result["phase_ms"]["backward"] > 0
    assert len(result["top_ops"]) == 20


def test_run_row_of_unfinished_run(tmp_path, tiny_models, tiny_data):
    from newstune.config import validate
    from newstune.training.train import train

    run_dir, _ = train(validate(tiny_config(tiny_models["bert"], tiny_data)), tmp_path / "cut", stop_after_steps=3)
    assert run_row(run_dir)["status"] == "failed"
