import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    CamembertConfig,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    XLMRobertaConfig,
)

from newstune.config import validate
from newstune.modeling.fast_dropout import FastDropout
from newstune.modeling.first_token import restore_full_last_layer, run_last_layer_on_first_token
from newstune.modeling.frozen_prefix import encoder_model
from newstune.reporting.report import evaluate_run
from newstune.rundir.run import load_run, write_run_header
from newstune.training.train import Trainer, finish_run

from .conftest import tiny_config


def padded_batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(5, 20, (3, 12))
    ids[:, 0] = 2  # [CLS]
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    mask[1, 3:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


@pytest.mark.parametrize("arch, attention", [("bert", "sdpa"), ("bert", "eager"), ("roberta", "sdpa"),
                                             ("mpnet", None)])
def test_first_token_layer_gives_the_full_layers_logits(tiny_models, arch, attention):
    kwargs = {"attn_implementation": attention} if attention else {}
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models[arch], num_labels=3, **kwargs).eval()
    batch = padded_batch()
    with torch.no_grad():
        full = model(**batch).logits
        assert run_last_layer_on_first_token(model)
        first_only = model(**batch).logits
        # padding masked per row, the position bias (MPNet) for the first query: the same logits
        np.testing.assert_allclose(first_only.numpy(), full.numpy(), atol=1e-6)
        assert model.base_model(**batch).last_hidden_state.shape[1] == 1


SMALL = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=66, pad_token_id=0, num_labels=3)


@pytest.mark.parametrize("config", [ElectraConfig(**SMALL, embedding_size=16), XLMRobertaConfig(**SMALL),
                                    CamembertConfig(**SMALL)], ids=["electra", "xlm-roberta", "camembert"])
def test_the_other_listed_heads_give_the_full_layers_logits(config):
    # Listed in HEADS_READING_TOKEN_0 from their transformers source: fails if one of them stops reading token 0
    # only (the patch would then change its logits) or if its layer is not the BERT layer the patch copies.
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    batch = padded_batch()
    with torch.no_grad():
        full = model(**batch).logits
        assert run_last_layer_on_first_token(model)
        np.testing.assert_allclose(model(**batch).logits.numpy(), full.numpy(), atol=1e-6)
        assert model.base_model(**batch).last_hidden_state.shape[1] == 1


def test_heads_reading_other_tokens_are_left_alone():
    model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=40, dim=32, n_layers=2, n_heads=2,
                                                                 hidden_dim=64))
    assert not run_last_layer_on_first_token(model)
    assert "forward" not in vars(model.distilbert.transformer.layer[-1])


def _trainer_without_dropout(tiny_models, tiny_data, run_dir, arch, on: bool) -> Trainer:
    config = validate(tiny_config(tiny_models[arch], tiny_data, **{
        "train.epochs": 3, "train.log_every_steps": 1, "train.first_token_last_layer": on}))
    trainer = Trainer(config, run_dir)
    trainer.setup()
    run_dir.mkdir()
    write_run_header(run_dir, trainer.config, trainer.label_names)
    for module in trainer.model.modules():  # dropout draws differ in shape; without them the math is the same
        if isinstance(module, (torch.nn.Dropout, FastDropout)):
            module.p = 0.0
    return trainer


@pytest.mark.parametrize("arch", ["bert", "mpnet"])
def test_first_token_layer_follows_the_full_loss_curve(tiny_models, tiny_data, tmp_path, arch):
    full = _trainer_without_dropout(tiny_models, tiny_data, tmp_path / "full", arch, on=False)
    first = _trainer_without_dropout(tiny_models, tiny_data, tmp_path / "first", arch, on=True)
    assert (full.first_token_only, first.first_token_only) == (False, True)
    tokens_out = []
    encoder_model(first.model).encoder.layer[-1].register_forward_hook(
        lambda module, args, out: tokens_out.append((out[0] if isinstance(out, tuple) else out).shape[1]))
    for trainer in (full, first):
        trainer.fit()
    assert tokens_out and set(tokens_out) == {1}, "the last layer must compute token 0 only"
    losses = [[r["loss"] for r in t.state.history if r["kind"] in ("train", "eval")] for t in (full, first)]
    assert len(losses[0]) == 93 and np.mean(losses[0][-10:]) < 0.8 * losses[0][0], "the tiny task must be learnt"
    # forward and backward through the trimmed layer: the same losses up to fp32 rounding
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4, atol=1e-5)


def test_applied_before_compile_and_kept_for_the_final_evaluation(tiny_models, tiny_data, tmp_path):
    compiled = Trainer(validate(tiny_config(tiny_models["bert"], tiny_data, **{"train.compile": True})), None)
    compiled.setup()  # torch.compile wraps lazily: nothing is compiled until a forward
    assert compiled.first_token_only
    compiled_last_layer = encoder_model(compiled.model._orig_mod).encoder.layer[-1]
    restore_full_last_layer(compiled.accelerator.unwrap_model(compiled.model))  # what finish() is given
    assert "forward" not in vars(compiled_last_layer)
    trainer = _trainer_without_dropout(tiny_models, tiny_data, tmp_path / "run", "bert", on=True)
    last_layer = encoder_model(trainer.model).encoder.layer[-1]
    assert "forward" in vars(last_layer)
    trainer.fit()
    metrics = finish_run(trainer)
    # predict and serve run the first-token layer (load_run): latency and the final scores are measured on that
    assert "forward" in vars(last_layer) and metrics["efficiency"]["first_token_last_layer"]
    # fails if load_run leaves inference on the full layer, or if the plain model (as_trained=False, which merged
    # exports save) came back patched
    loaded = load_run(trainer.run_dir)
    assert "forward" in vars(encoder_model(loaded.model).encoder.layer[-1])
    plain = load_run(trainer.run_dir, as_trained=False)
    assert "forward" not in vars(encoder_model(plain.model).encoder.layer[-1])
    ids = loaded.tokenizer(["goal match team today", "stock market profit on the week"])["input_ids"]
    np.testing.assert_allclose(loaded.scorer.logits(ids, 8), plain.scorer.logits(ids, 8), atol=1e-5)
    evaluated, _ = evaluate_run(trainer.run_dir, "test", [])
    assert evaluated["test"]["accuracy"] == metrics["test"]["accuracy"]


def test_a_layer_copy_that_disagrees_switches_itself_off(tiny_models, monkeypatch, caplog):
    """Fails if a first-token forward that no longer matches transformers' layer (a changed release) is installed
    anyway: training would silently run a different model."""
    import newstune.modeling.first_token as first_token

    real = first_token._bert_layer_forward

    def drifted(layer):
        forward = real(layer)
        return lambda *args, **kwargs: forward(*args, **kwargs) * 1.5

    monkeypatch.setattr(first_token, "_bert_layer_forward", drifted)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=3)
    with caplog.at_level("WARNING", logger="newstune.modeling.first_token"):
        assert not run_last_layer_on_first_token(model)
    assert "forward" not in vars(model.bert.encoder.layer[-1])
    assert len(caplog.records) == 1 and "first-token last layer off" in caplog.records[0].getMessage()


def test_the_check_compares_an_fp32_model_in_fp32_under_accelerates_bf16_wrapper(tiny_models):
    # Fails when the check runs through accelerate's autocast-wrapped forward: an fp32 model is then compared in bf16
    # against the fp32 tolerance, and rounding alone switched the layer off (an MPNet run, after training).
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    model = accelerator.prepare(AutoModelForSequenceClassification.from_pretrained(tiny_models["mpnet"],
                                                                                   num_labels=3))
    seen = []
    layer = encoder_model(model).encoder.layer[-1]
    layer.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    assert run_last_layer_on_first_token(accelerator.unwrap_model(model))
    assert seen and not any(seen), "the check's forwards ran under bf16 autocast"
    AcceleratorState._reset_state(reset_partial_state=False)



@pytest.mark.parametrize("arch", ["bert", "mpnet"])
def test_first_token_layer_expands_no_weight_to_the_batch(tiny_models, arch):
    # hidden_states[:, :1] is a strided slice: a linear layer on it falls back to a batched matmul over a copy of
    # its weight per row (~8 ms a MiniLM step on the AMX Xeon). Fails if the slice stops being made contiguous.
    from torch.profiler import profile

    # with LoRA the base projections are frozen: a strided input then takes the batched path (a trained weight,
    # as in a full fine-tune, folds the slice into one matrix product)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models[arch], num_labels=3)
    targets = ["query", "value"] if arch == "bert" else ["q", "v"]
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=targets))
    assert run_last_layer_on_first_token(model)
    layer = encoder_model(model).encoder.layer[-1]
    size = model.config.hidden_size
    hidden = torch.randn(3, 12, size, requires_grad=True)
    with profile(record_shapes=True) as prof:
        out = layer(hidden)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
    weight_shaped = [event.input_shapes for event in prof.events() if event.name == "aten::bmm"
                     and any(list(shape[-2:]) == [size, size] for shape in event.input_shapes if len(shape) == 3)]
    assert not weight_shaped
