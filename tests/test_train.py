import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from newstune.config import validate
from newstune.errors import NewstuneError
from newstune.modeling.fast_dropout import FastDropout
from newstune.modeling.frozen_prefix import encoder_model
from newstune.modeling.infer import predict_logits
from newstune.reporting.report import evaluate_run
from newstune.rundir.run import load_run, write_run_header
from newstune.training.checkpoint import load_weights
from newstune.training.train import CHECKPOINT, Trainer, resolve_precision, resume, train

from .conftest import TOPICS, synthetic_rows, tiny_config, write_csv


def run_tiny(tiny_models, tiny_data, tmp_path, name="run", arch="bert", **overrides):
    config = validate(tiny_config(tiny_models[arch], tiny_data, **overrides))
    return train(config, tmp_path / name)


def test_end_to_end_run_directory(tiny_models, tiny_data, tmp_path):
    run_dir, metrics = run_tiny(tiny_models, tiny_data, tmp_path)
    for name in ("config.yaml", "label_map.json", "metrics.json", "metrics.jsonl", "confusion_test.png",
                 "training_curves.png", "train.log", "model/adapter_config.json", "model/adapter_model.safetensors"):
        assert (run_dir / name).exists(), name
    # TensorBoard holds every logged training loss (fails when the writer is never given the scalars)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    logged = [h for h in (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
              if h["kind"] == "train"]
    assert [e.step for e in events.Scalars("train/loss")] == [h["step"] for h in logged]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([h["loss"] for h in logged], rel=1e-6)
    assert set(metrics) >= {"validation", "test", "efficiency", "threshold"}
    assert metrics["test"]["accuracy"] > 0.75, "keyword topics are easy: the loop must learn them"
    eff = metrics["efficiency"]
    assert eff["trainable_params"] > 0 and eff["saved_model_mb"] > 0 and eff["latency_ms_median"] > 0
    assert eff["train_tokens_per_s"] > 0 and 0 <= eff["padding_fraction"] < 1
    assert set(metrics["test"]["per_class"]) == {"business", "science", "sports"}
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history if h["kind"] == "eval"] == [0, 1, 2, 3]


def test_mlflow_local_store_receives_the_recipe_and_every_figure(tiny_models, tiny_data, tmp_path, monkeypatch):
    """Fails if train.report_to: [mlflow] logs nothing, logs other values or steps than metrics.jsonl, or loses the
    recipe's parameters; a missing tracker package is one line before any folder exists."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir, _ = run_tiny(tiny_models, tiny_data, tmp_path, **{"train.epochs": 1, "train.report_to": ["mlflow"]})
    assert not (run_dir / "tensorboard").exists()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.run_name == run_dir.name and run.data.params["train.lr"] == "0.03"
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_losses = [(h["step"], h["loss"]) for h in history if h["kind"] == "train"]
    logged = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert [s for s, _ in sorted(logged)] == [s for s, _ in train_losses]
    assert [v for _, v in sorted(logged)] == pytest.approx([v for _, v in train_losses])
    assert [m.value for m in client.get_metric_history(run.info.run_id, "validation/accuracy")] == pytest.approx(
        [h["accuracy"] for h in history if h["kind"] == "eval"])
    monkeypatch.setattr("newstune.training.trackers.PACKAGES", {"mlflow": "no_such_tracker_package"})
    with pytest.raises(NewstuneError, match="report_to: mlflow is not installed"):
        run_tiny(tiny_models, tiny_data, tmp_path, "missing", **{"train.report_to": ["mlflow"]})
    assert not (tmp_path / "missing").exists()


def test_same_seed_same_losses(tiny_models, tiny_data, tmp_path):
    _, first = run_tiny(tiny_models, tiny_data, tmp_path, "a", **{"train.epochs": 1})
    _, second = run_tiny(tiny_models, tiny_data, tmp_path, "b", **{"train.epochs": 1})
    assert first["validation"]["loss"] == pytest.approx(second["validation"]["loss"], abs=1e-6)


@pytest.mark.parametrize("arch", ["roberta", "mpnet"])
def test_other_architectures_train(tiny_models, tiny_data, tmp_path, arch):
    # Fails when an architecture's LoRA targets or head do not train (chance is 0.33 on three balanced topics).
    # 8 epochs: the random tiny RoBERTa learns slowly, and 4 left it at 0.43-0.65 depending on dropout draws;
    # with 8 both reach 0.95-1.0 whatever the padding width (measured 2026-12-06).
    _, metrics = run_tiny(tiny_models, tiny_data, tmp_path, arch=arch, **{"train.epochs": 8})
    assert metrics["test"]["n"] == 60
    assert metrics["test"]["accuracy"] > 0.8


def test_reloaded_run_gives_the_same_logits(tiny_models, tiny_data, tmp_path, monkeypatch):
    run_dir, metrics = run_tiny(tiny_models, tiny_data, tmp_path, **{"train.precision": "bf16"})
    # reloaded in bf16 as it was evaluated, also on a CPU that only emulates bf16 (there load_run would pick fp32)
    monkeypatch.setattr("newstune.modeling.infer.cpu_has_native_bf16", lambda: True)
    loaded = load_run(run_dir)
    ids = loaded.tokenizer(["goal match team today", "stock market profit"])["input_ids"]
    first = predict_logits(loaded.model, ids, loaded.tokenizer.pad_token_id, precision=loaded.precision)
    again = load_run(run_dir)
    second = predict_logits(again.model, ids, again.tokenizer.pad_token_id, precision=again.precision)
    assert torch.equal(first, second)
    evaluated, _ = evaluate_run(run_dir, "test", [])
    assert evaluated["test"]["accuracy"] == pytest.approx(metrics["test"]["accuracy"])


@pytest.mark.parametrize("native", [True, False])
def test_a_bf16_run_is_computed_in_fp32_where_bf16_is_not_native(tiny_models, tiny_data, tmp_path, monkeypatch,
                                                                   native):
    # A run trained on a bf16 CPU and shared to an AVX2-only one: bf16 is emulated there (MiniLM's forward 6.5x slower).
    # Fails if load_run keeps bf16 there, or computes fp32 with other weights than the bf16-rounded frozen ones.
    run_dir, _ = run_tiny(tiny_models, tiny_data, tmp_path, **{"train.precision": "bf16"})
    monkeypatch.setattr("newstune.modeling.infer.cpu_has_native_bf16", lambda: native)
    loaded = load_run(run_dir)
    dtypes = {p.dtype for p in loaded.model.parameters()}
    if native:
        assert (loaded.precision, loaded.backend_reason) == ("bf16", "PyTorch")
        assert torch.bfloat16 in dtypes  # weights held in bf16, as evaluated after training
        return
    assert loaded.precision == "fp32" and "no native bf16" in loaded.backend_reason
    assert dtypes == {torch.float32}
    frozen = loaded.model.base_model.model.bert.encoder.layer[0].intermediate.dense.weight
    assert torch.equal(frozen, frozen.to(torch.bfloat16).float())  # the rounded values it was evaluated with
    ids = loaded.tokenizer(["goal match team today", "stock market profit"])["input_ids"]
    monkeypatch.setattr("newstune.modeling.infer.cpu_has_native_bf16", lambda: True)
    as_bf16 = load_run(run_dir)
    torch.testing.assert_close(
        predict_logits(loaded.model, ids, loaded.tokenizer.pad_token_id, precision=loaded.precision),
        predict_logits(as_bf16.model, ids, as_bf16.tokenizer.pad_token_id, precision=as_bf16.precision),
        atol=5e-2, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_is_fused_unless_switched_off(tiny_models, tiny_data, fused):
    # fails if train.fused_adamw stops reaching the optimizer (the pinned losses pass either way, rtol 1e-3)
    trainer = Trainer(validate(tiny_config(tiny_models["bert"], tiny_data, **{"train.fused_adamw": fused})), None)
    trainer.setup()
    assert bool(trainer.optimizer.defaults["fused"]) is fused


def test_full_finetuning_trains_every_weight(tiny_models, tiny_data, tmp_path):
    _, metrics = run_tiny(tiny_models, tiny_data, tmp_path, **{"lora.method": "full", "train.lr": 1e-3,
                                                                "train.epochs": 1})
    assert metrics["efficiency"]["trainable_params"] == metrics["efficiency"]["total_params"]


def test_auto_class_weights_reach_the_loss(tiny_models, tmp_path):
    from .conftest import synthetic_rows, write_csv

    rows = synthetic_rows(300, 1)
    skewed = [r for r in rows if r[1] != "science"] + [r for r in rows if r[1] == "science"][:20]
    write_csv(tmp_path / "train.csv", skewed)
    write_csv(tmp_path / "valid.csv", synthetic_rows(30, 2))
    write_csv(tmp_path / "test.csv", synthetic_rows(30, 3))
    trainer = Trainer(validate(tiny_config(tiny_models["bert"], tmp_path, **{"train.class_weights": "auto"})), None)
    trainer.setup()
    counts = np.bincount(trainer.bundle.splits["train"].labels)
    expected = counts.sum() / (3 * counts)
    np.testing.assert_allclose(trainer.loss_fn.weight.numpy(), expected, rtol=1e-6)
    assert trainer.loss_fn.weight[trainer.label_names.index("science")] > 3


def test_best_epoch_weights_are_restored(tiny_models, tiny_data, tmp_path):
    # Validation rows carry the next topic's label: the better the model learns the training rows, the worse its
    # validation loss, so the first epoch is the best one on every CPU (a bouncing high-lr curve was not: its best
    # epoch depended on the CPU's GEMM kernels and was the last one on an AVX2-only CPU).
    data = tmp_path / "rotated"
    data.mkdir()
    for name in ("train.csv", "test.csv"):
        shutil.copy(tiny_data / name, data / name)
    topics = list(TOPICS)
    rotate = {label: topics[(i + 1) % len(topics)] for i, label in enumerate(topics)}
    write_csv(data / "valid.csv", [(text, rotate[label]) for text, label in synthetic_rows(60, 2)])
    run_dir, metrics = run_tiny(tiny_models, data, tmp_path, **{
        "train.epochs": 3, "lora.method": "full", "train.lr": 3e-3, "train.metric": "loss",
        "eval.calibration": "none"})  # the raw loss, as the epochs logged it
    evals = [r for r in metrics_history(run_dir) if r["kind"] == "eval"]
    best = min(evals, key=lambda r: r["loss"])
    assert best["epoch"] == metrics["best_epoch"] != evals[-1]["epoch"], "precondition: best epoch is not the last"
    assert metrics["validation"]["loss"] == pytest.approx(best["loss"], abs=1e-6)
    assert metrics["validation"]["loss"] < evals[-1]["loss"] - 1e-4
    # and the saved model is the best epoch's (fails if the last epoch's weights were saved after the restore)
    assert evaluate_run(run_dir, "validation", [])[0]["validation"]["loss"] == pytest.approx(best["loss"], abs=1e-4)


def test_early_stopping_stops_after_patience(tiny_models, tiny_data, tmp_path):
    run_dir, metrics = run_tiny(tiny_models, tiny_data, tmp_path, **{
        "train.epochs": 6, "train.lr": 1e-7, "train.early_stopping_patience": 1, "train.metric": "accuracy"})
    # lr 1e-7 changes nothing: epoch 0 is best, epoch 1 does not improve, patience 1 stops there
    assert [r["epoch"] for r in metrics_history(run_dir) if r["kind"] == "eval"] == [0, 1]
    assert metrics["efficiency"]["epochs_run"] == 2


def metrics_history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# Training losses of the tiny BERT task (seed 7, fp32, full fine-tune at lr 3e-3), logged every 10 steps over three
# epochs. The model learns the task (loss 1.10 -> 0.32, validation accuracy 1.0), so the pin holds learning and not
# only numerics: a refactor that changes batch order, init, loss, optimizer or scheduler cannot pass silently, and
# one that stops the weights from moving (a detached loss, a zero lr) fails the curve as well as the values.
# Re-pinned when CPU batches stopped being padded to a multiple of 8 (dropout masks have another shape) and AdamW
# became fused.
PINNED_LOSSES = [1.1006, 1.1074, 1.0865, 0.8924, 0.6166, 0.4963, 0.3839, 0.3584, 0.3208]
LEARNING = {"train.epochs": 3, "train.log_every_steps": 10, "lora.method": "full", "train.lr": 3e-3}


def test_loss_values_are_pinned_also_after_resume(tiny_models, tiny_data, tmp_path):
    run_dir, metrics = run_tiny(tiny_models, tiny_data, tmp_path, "straight", **LEARNING)
    straight = [r["loss"] for r in metrics_history(run_dir) if r["kind"] == "train"]
    np.testing.assert_allclose(straight, PINNED_LOSSES, rtol=1e-3)
    assert metrics["validation"]["accuracy"] == 1.0
    config = validate(tiny_config(tiny_models["bert"], tiny_data, **LEARNING))
    cut_dir, stopped = train(config, tmp_path / "cut", stop_after_steps=40)  # stopped inside the second epoch
    assert stopped == {}
    resume(cut_dir)
    resumed = [r["loss"] for r in metrics_history(cut_dir) if r["kind"] == "train"]
    np.testing.assert_allclose(resumed, PINNED_LOSSES, rtol=1e-3)


def test_evaluations_every_n_steps_leave_training_unchanged(tiny_models, tiny_data, tmp_path, monkeypatch):
    # A constant lr makes validation loss bounce: the best evaluation (step 36) is not at an epoch's end.
    overrides = {"train.epochs": 2, "train.lr": 0.05, "train.scheduler": "constant", "train.warmup_ratio": 0.0,
                 "train.metric": "loss", "eval.calibration": "none"}
    plain_dir, _ = run_tiny(tiny_models, tiny_data, tmp_path, "plain", **overrides)
    # each evaluation moves the clock an hour on: evaluation time must stay out of train_seconds
    hours = {"passed": 0.0}
    real_clock, real_evaluate = time.perf_counter, Trainer.evaluate_split

    def slow_evaluate(self, *args, **kwargs):
        hours["passed"] += 3600.0
        return real_evaluate(self, *args, **kwargs)

    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + hours["passed"])
    monkeypatch.setattr(Trainer, "evaluate_split", slow_evaluate)
    run_dir, metrics = run_tiny(tiny_models, tiny_data, tmp_path, **overrides, **{"train.eval_every_steps": 12})
    assert metrics["efficiency"]["train_seconds"] < 600
    history = metrics_history(run_dir)
    evals = [r for r in history if r["kind"] == "eval"]
    # 30 steps an epoch: every 12th step, and the end of epoch 0; epoch 1 ends on step 60, evaluated once
    assert [r["step"] for r in evals] == [12, 24, 30, 36, 48, 60]
    assert all(a["train_seconds"] < b["train_seconds"] for a, b in zip(evals, evals[1:]))
    # the RNG and the training mode untouched by each evaluation: the same losses as without them
    np.testing.assert_allclose([r["loss"] for r in history if r["kind"] == "train"],
                               [r["loss"] for r in metrics_history(plain_dir) if r["kind"] == "train"], rtol=1e-5)
    best = min(evals, key=lambda r: r["loss"])
    assert best["step"] % 30 != 0, "precondition: the best evaluation is inside an epoch"
    assert metrics["best_step"] == best["step"]
    assert metrics["validation"]["loss"] == pytest.approx(best["loss"], abs=1e-6)


def test_a_checkpoint_holds_the_evaluation_of_its_step(tiny_models, tiny_data, tmp_path, monkeypatch):
    saved = []
    real_save = Trainer._save_checkpoint

    def recording_save(self):
        saved.append((self.state.global_step, self.state.last_eval_step))
        real_save(self)

    monkeypatch.setattr(Trainer, "_save_checkpoint", recording_save)
    run_tiny(tiny_models, tiny_data, tmp_path, **{"train.epochs": 1, "train.eval_every_steps": 12,
                                                 "train.checkpoint_every_steps": 12})
    assert saved == [(12, 12), (24, 24), (30, 30)]


def test_early_stopping_inside_an_epoch(tiny_models, tiny_data, tmp_path):
    run_dir, metrics = run_tiny(tiny_models, tiny_data, tmp_path, **{
        "train.epochs": 6, "train.lr": 1e-7, "train.early_stopping_patience": 1, "train.metric": "accuracy",
        "train.eval_every_steps": 10, "train.log_every_steps": 1})
    history = metrics_history(run_dir)
    assert [r["step"] for r in history if r["kind"] == "eval"] == [10, 20]
    assert max(r["step"] for r in history if r["kind"] == "train") == 20
    assert metrics["efficiency"]["epochs_run"] == pytest.approx(20 / 30, abs=0.01)
    _, meta = load_weights(run_dir / CHECKPOINT)
    assert meta["state"]["stopped_early"], "a resume from this checkpoint must not train on"


def test_resume_matches_uninterrupted(tiny_models, tiny_data, tmp_path):
    _, full = run_tiny(tiny_models, tiny_data, tmp_path, "full", **{"train.checkpoint_every_steps": 4})
    config = validate(tiny_config(tiny_models["bert"], tiny_data, **{"train.checkpoint_every_steps": 4}))
    cut_dir, stopped = train(config, tmp_path / "stopped", stop_after_steps=21)
    assert stopped == {} and not (cut_dir / "metrics.json").exists()
    _, resumed = resume(cut_dir)
    for split in ("validation", "test"):
        assert resumed[split]["loss"] == pytest.approx(full[split]["loss"], abs=1e-5)
        assert resumed[split]["accuracy"] == full[split]["accuracy"]


def test_existing_output_dir_is_never_overwritten(tiny_models, tiny_data, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "metrics.json").write_text("{}")
    with pytest.raises(NewstuneError, match="already exists"):
        run_tiny(tiny_models, tiny_data, tmp_path, "taken")
    assert (tmp_path / "taken" / "metrics.json").read_text() == "{}"


def test_binary_threshold_is_tuned_and_stored(tiny_models, tmp_path):
    from .conftest import synthetic_rows, write_csv

    data = tmp_path / "bin"
    data.mkdir()
    for name, seed in (("train.csv", 1), ("valid.csv", 2), ("test.csv", 3)):
        write_csv(data / name, [r for r in synthetic_rows(150, seed) if r[1] != "science"])
    config = validate(tiny_config(tiny_models["bert"], data, **{"train.epochs": 1}))
    run_dir, metrics = train(config, tmp_path / "binary")
    assert 0.05 <= metrics["threshold"] <= 0.95
    assert metrics["test"]["threshold"] == metrics["threshold"]
    assert load_run(run_dir).threshold == metrics["threshold"]


@pytest.mark.parametrize("native_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_precision_auto_follows_the_cpu(monkeypatch, native_bf16, expected):
    monkeypatch.setattr("newstune.training.train.cpu_has_native_bf16", lambda: native_bf16)
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(NewstuneError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", "cpu")


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "newstune.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_errors_are_one_clear_line(tmp_path):
    (tmp_path / "r.yaml").write_text("data: {name: ag_news}\nmodel: {name: minilm}\ntrain: {epochz: 1}\n")
    result = cli("train", "r.yaml", cwd=tmp_path)
    assert result.returncode != 0
    assert "unknown config key 'train.epochz'" in result.stderr
    assert "Traceback" not in result.stderr
    result = cli("evaluate", str(tmp_path), cwd=tmp_path)
    assert result.returncode != 0 and "not a newstune run directory" in result.stderr
    result = cli("ensemble", str(tmp_path), "--combiner", "stacked", cwd=tmp_path)
    assert result.returncode != 0 and "--combiner stacked: choose weighted, logistic or auto" in result.stderr


def test_threshold_tuning_finds_the_separating_point():
    from newstune.decisions.metrics import classification_metrics, tune_threshold

    probs_true = np.array([0.2, 0.3, 0.35, 0.4, 0.6, 0.7])
    labels = np.array([0, 0, 1, 1, 1, 1])
    logits = np.log(np.stack([1 - probs_true, probs_true], axis=1))
    threshold, f1 = tune_threshold(labels, logits)
    assert 0.3 < threshold <= 0.35 and f1 == pytest.approx(1.0)
    assert classification_metrics(labels, logits, ["f", "t"], threshold)["accuracy"] == 1.0


def test_gradient_accumulation_halves_optimizer_steps(tiny_models, tiny_data, tmp_path):
    _, plain = run_tiny(tiny_models, tiny_data, tmp_path, "plain", **{"train.epochs": 1})
    _, accumulated = run_tiny(tiny_models, tiny_data, tmp_path, "accum", **{"train.epochs": 1, "train.grad_accum": 2})
    assert plain["efficiency"]["optimizer_steps"] == 30
    assert accumulated["efficiency"]["optimizer_steps"] == 15


def _prepared_trainer(config: dict, run_dir: Path) -> Trainer:
    trainer = Trainer(validate(config), run_dir)
    trainer.setup()
    run_dir.mkdir()
    write_run_header(run_dir, trainer.config, trainer.label_names)
    return trainer


@pytest.mark.parametrize("arch", ["bert", "mpnet"])
def test_cached_frozen_layers_follow_the_plain_loss_curve(tiny_models, tiny_data, tmp_path, arch):
    overrides = {"lora.top_layers": 1, "lora.dropout": 0.1, "train.epochs": 2, "train.log_every_steps": 1}
    plain = _prepared_trainer(tiny_config(tiny_models[arch], tiny_data, **overrides), tmp_path / "plain")
    # The plain path with dropout off below the LoRA layer is what the cached path computes.
    encoder = encoder_model(plain.model)
    for module in [*encoder.embeddings.modules(), *encoder.encoder.layer[0].modules()]:
        if isinstance(module, (torch.nn.Dropout, FastDropout)):
            module.p = 0.0
    plain.fit()
    cached = _prepared_trainer(tiny_config(tiny_models[arch], tiny_data, **overrides,
                                           **{"train.cache_frozen_layers": True}), tmp_path / "cached")
    assert cached.prefix.depth == 1 and cached.prefix.nbytes > 0
    lower_calls = []
    encoder_model(cached.model).encoder.layer[0].register_forward_hook(
        lambda module, args, out: lower_calls.append(module.training))
    cached.fit()
    assert lower_calls and not any(lower_calls), "training must not run the frozen lower layer (evaluation does)"
    losses = [[r["loss"] for r in t.state.history if r["kind"] == "train"] for t in (plain, cached)]
    assert len(losses[0]) == len(losses[1]) == 60
    # Same batches and the same dropout draws in the upper layer: equal up to fp32 rounding.
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    val = [[r["loss"] for r in t.state.history if r["kind"] == "eval"] for t in (plain, cached)]
    np.testing.assert_allclose(val[1], val[0], rtol=1e-4, atol=1e-5)


def test_cached_frozen_layers_need_lora_on_upper_layers_only(tiny_models, tiny_data):
    with pytest.raises(NewstuneError, match="lora.top_layers"):
        validate(tiny_config(tiny_models["bert"], tiny_data, **{"train.cache_frozen_layers": True}))
    config = validate(tiny_config(tiny_models["bert"], tiny_data, **{"lora.top_layers": 3}))
    with pytest.raises(NewstuneError, match="top_layers=3 but the model has 2 layers"):
        Trainer(config, Path("unused")).setup()


def test_fast_dropout_drops_p_and_rescales():
    layer = FastDropout(0.1).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(0)
    out = layer(x)
    dropped = (out == 0).float().mean().item()
    assert dropped == pytest.approx(0.1, abs=0.002)
    assert torch.allclose(out[out != 0], torch.tensor(1 / 0.9))
    out.sum().backward()
    assert torch.equal(x.grad, out.detach()), "the gradient is the same mask and scale"
    torch.manual_seed(0)
    assert torch.equal(layer(x), out), "masks come from torch's seeded generator"
    assert layer.eval()(x) is x


def test_fast_dropout_keeps_the_exact_scale_in_bf16():
    # fails if the scale is rounded to bf16 before the multiply (1/0.9 -> 1.109375: every kept value 0.15% small)
    torch.manual_seed(0)
    x = torch.randn(1000, 1000).bfloat16()
    out = FastDropout(0.1).train()(x)
    kept = out != 0
    assert out.dtype == torch.bfloat16
    ratio = (out[kept].double() / x[kept].double()).mean().item()
    assert ratio == pytest.approx(1 / 0.9, rel=3e-4)


def test_fast_dropout_trains_like_torch_dropout(tiny_models, tiny_data, tmp_path):
    overrides = {"lora.dropout": 0.1, "train.epochs": 8, "eval.calibration": "none"}  # the model's own loss
    _, fast = run_tiny(tiny_models, tiny_data, tmp_path, "fast", **overrides)
    _, plain = run_tiny(tiny_models, tiny_data, tmp_path, "plain", **overrides, **{"train.fast_dropout": False})
    assert fast["efficiency"]["fast_dropout"] and not plain["efficiency"]["fast_dropout"]
    # Different masks from the same distribution: the runs agree in outcome, not step by step. On this tiny task
    # the final validation loss varies 0.07-0.49 from seed to seed with either dropout (8 seeds), so each run must
    # learn the task (an untrained head's loss is ln 3 = 1.10), not match the other's loss.
    for metrics in (fast, plain):
        assert metrics["validation"]["accuracy"] >= 0.9 and metrics["validation"]["loss"] < 0.4


def test_bf16_frozen_weights_follow_the_autocast_loss_curve(tiny_models, tiny_data, tmp_path):
    overrides = {"train.precision": "bf16", "train.epochs": 1, "train.log_every_steps": 1, "train.fast_dropout": False}
    held = _prepared_trainer(tiny_config(tiny_models["bert"], tiny_data, **overrides), tmp_path / "held")
    recast = _prepared_trainer(tiny_config(tiny_models["bert"], tiny_data, **overrides,
                                           **{"train.bf16_frozen_weights": False}), tmp_path / "recast")
    assert (held.frozen_dtype, recast.frozen_dtype) == ("bf16", "fp32")
    for trainer in (held, recast):
        trainer.fit()
    losses = [[r["loss"] for r in t.state.history if r["kind"] == "train"] for t in (held, recast)]
    # The matmuls run in bf16 either way; holding the weights in bf16 also rounds the frozen LayerNorm and embedding
    # weights (step 1 differs by ~0.3%). Over the first epoch the curves agree within 2%; at this tiny model's high
    # lr the onset of learning is chaotic, so later steps may drift further apart in either direction.
    assert len(losses[0]) == 30
    np.testing.assert_allclose(losses[0], losses[1], rtol=2e-2)


class PlantedPickle:
    """Unpickling this runs code: what a crafted checkpoint in a shared run folder would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_planted_pickle_checkpoint_is_refused(tiny_models, tiny_data, tmp_path):
    config = validate(tiny_config(tiny_models["bert"], tiny_data, **{"train.epochs": 1}))
    run_dir, _ = train(config, tmp_path / "shared", stop_after_steps=5)
    marker = tmp_path / "code-ran"
    torch.save({"state": PlantedPickle(marker)}, run_dir / "checkpoints" / "last.pt")
    with pytest.raises(NewstuneError, match="never loads pickles"):
        resume(run_dir)
    assert not marker.exists()


def test_checkpoint_files_hold_no_pickle(tiny_models, tiny_data, tmp_path):
    config = validate(tiny_config(tiny_models["bert"], tiny_data, **{"train.epochs": 1}))
    run_dir, _ = train(config, tmp_path / "run", stop_after_steps=5)
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["best_trainable.safetensors", "last.safetensors"] or names == ["last.safetensors"]
    for path in (run_dir / "checkpoints").iterdir():
        assert path.read_bytes()[8:9] == b"{", f"{path.name} is not safetensors (JSON header after the length)"


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tiny_models, tiny_data, tmp_path):
    import signal
    import time

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config(tiny_models["bert"], tiny_data, **{"train.epochs": 400})))
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "newstune.cli", "train", str(recipe), "--output-dir",
                                str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert f"newstune train --resume {run_dir}" in stderr and "Traceback" not in stderr
    with safe_open(str(run_dir / "checkpoints/last.safetensors"), "pt") as handle:
        saved_step = json.loads(handle.metadata()["newstune"])["state"]["global_step"]
    assert saved_step > 0 and not (run_dir / "metrics.json").exists()


@pytest.mark.parametrize("where, message", [
    (lambda tmp: Path("/proc/newstune-run"), "cannot create output directory"),
    (lambda tmp: tmp / "a-file" / "run", "is a file"),
])
def test_unusable_output_dir_fails_before_work(tiny_models, tiny_data, tmp_path, where, message):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(NewstuneError, match=message):
        train(validate(tiny_config(tiny_models["bert"], tiny_data)), where(tmp_path))


def test_a_failed_start_leaves_no_run_folder(tiny_models, tiny_data, tmp_path):
    config = validate(tiny_config(tiny_models["bert"], tiny_data, **{"data.max_length": 100}))
    with pytest.raises(NewstuneError, match="max_length 100 is longer than this bert model's 64 positions"):
        train(config, tmp_path / "run")
    config = validate(tiny_config(tiny_models["bert"], tiny_data, **{"data.text_columns": ["body"]}))
    with pytest.raises(NewstuneError, match="no column"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_epoch_time_survives_mid_epoch_checkpoints(tiny_models, tiny_data, tmp_path):
    run_dir, metrics = run_tiny(tiny_models, tiny_data, tmp_path, **{"train.epochs": 1,
                                                                      "train.checkpoint_every_steps": 4})
    efficiency = metrics["efficiency"]
    assert efficiency["epoch_seconds_mean"] == pytest.approx(efficiency["train_seconds"], rel=1e-6)
    log_text = (run_dir / "train.log").read_text()
    assert '"kind": "eval"' in log_text and '"kind": "train"' in log_text


def test_frozen_prefix_states_follow_the_mask_also_when_left_padded():
    from newstune.modeling.frozen_prefix import FrozenPrefix

    prefix = FrozenPrefix.__new__(FrozenPrefix)
    prefix.flat = torch.arange(5 * 2, dtype=torch.float32).view(5, 2)  # text 0: rows 0-1, text 1: rows 2-4
    prefix.offsets = [0, 2, 5]
    right = prefix.states([0, 1], torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]), "cpu")
    left = prefix.states([0, 1], torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]]), "cpu")
    assert torch.equal(right[0, :2], prefix.flat[0:2]) and torch.equal(right[1, :3], prefix.flat[2:5])
    assert torch.equal(left[0, 2:], prefix.flat[0:2]) and torch.equal(left[1, 1:], prefix.flat[2:5])
    assert torch.equal(left[0, :2], torch.zeros(2, 2)) and torch.equal(left[1, 0], torch.zeros(2))
    with pytest.raises(NewstuneError, match="cache is stale"):
        prefix.states([0], torch.tensor([[1, 1, 1, 0]]), "cpu")


def _tamper(path: Path, edit) -> None:
    """Rewrite a checkpoint with edit(tensors, meta) applied (what a hand-edited run folder holds)."""
    from newstune.training.checkpoint import save_weights

    tensors, meta = load_weights(path)
    edit(tensors, meta)
    save_weights(path, tensors, meta)


def _rename_one(tensors: dict, meta: dict) -> None:
    key = next(k for k in tensors if k.startswith("trainable."))
    tensors[key.replace("trainable.", "trainable.renamed_")] = tensors.pop(key)


@pytest.mark.parametrize("edit, message", [
    (lambda t, m: m["state"].update(global_step=10**9), "global_step 1000000000 is outside"),
    (lambda t, m: m["state"].update(step_in_epoch=-1), "step_in_epoch -1 is outside"),
    (lambda t, m: m["state"].update(surprise=1), "unknown fields"),
    (lambda t, m: m.pop("optimizer"), "damaged resume state"),
    (lambda t, m: m.pop("state"), "training state is missing"),
    (lambda t, m: m["rng"].update(python="x"), "damaged resume state"),
    (_rename_one, "trainable tensors do not match"),
])
def test_a_tampered_checkpoint_is_refused_with_one_line(tiny_models, tiny_data, tmp_path, edit, message):
    """Fails if a hand-edited checkpoint resumes (a huge step 'finished' a run after 3 steps; renamed tensors
    resumed silently from the initial weights) or crashes with a traceback instead of one clear line."""
    config = validate(tiny_config(tiny_models["bert"], tiny_data))
    run_dir, _ = train(config, tmp_path / "run", stop_after_steps=3)
    _tamper(run_dir / CHECKPOINT, edit)
    with pytest.raises(NewstuneError, match=message):
        resume(run_dir)
    assert not (run_dir / "metrics.json").exists()


def test_a_checkpoint_with_a_huge_header_is_refused(tmp_path):
    path = tmp_path / "last.safetensors"
    path.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    with pytest.raises(NewstuneError, match="not a readable newstune checkpoint"):
        load_weights(path)


def test_checkpoint_names_are_the_same_with_and_without_compile(tiny_models):
    from newstune.training.train import trainable_state

    config = validate(tiny_config(tiny_models["bert"], Path(".")))
    from newstune.modeling.model import build_model

    model = build_model(config.model, config.lora, ["a", "b", "c"]).model
    plain = trainable_state(model)
    wrapped = trainable_state(torch.compile(model))  # named _orig_mod.* by the wrapper; compiled lazily, never run
    assert set(plain) == set(wrapped) and not any("_orig_mod" in k for k in wrapped)
