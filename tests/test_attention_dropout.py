"""Attention dropout on the context instead of the probabilities: CPU SDPA keeps its fused kernel."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForSequenceClassification, BertConfig, MPNetConfig

from newstune.config import validate
from newstune.modeling.attention_dropout import move_attention_dropout_to_context
from newstune.modeling.fast_dropout import FastDropout, use_fast_dropout
from newstune.modeling.fp32_attention import (
    FP32_TRAINING_SDPA,
    sdpa_fp32_when_training_on_cpu,
    use_fp32_training_attention,
)
from newstune.training.train import Trainer

from .conftest import tiny_config

FUSED = "aten::_scaled_dot_product_flash_attention_for_cpu"
SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
             max_position_embeddings=66, pad_token_id=0, attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.0)


def ops(model: torch.nn.Module, ids: torch.Tensor) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return {event.key for event in prof.key_averages()}


def test_context_dropout_keeps_sdpa_fused_and_leaves_evaluation_alone():
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(BertConfig(**SMALL, num_labels=3),
                                                           attn_implementation="sdpa")
    ids = torch.randint(5, 60, (2, 12))
    model.train()
    assert FUSED not in ops(model, ids)  # dropout on the probabilities: the unfused math path (this CPU build)
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert move_attention_dropout_to_context(model) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)  # no dropout at evaluation either way
    model.train()
    assert FUSED in ops(model, ids)  # fails if SDPA still receives the dropout
    torch.manual_seed(1)
    first = model(input_ids=ids).logits
    torch.manual_seed(2)
    assert not torch.allclose(first, model(input_ids=ids).logits)  # fails if the moved dropout is never applied


def test_fast_dropout_replaces_the_moved_dropout_too():
    model = AutoModelForSequenceClassification.from_config(BertConfig(**SMALL, num_labels=3))
    move_attention_dropout_to_context(model)
    use_fast_dropout(model)
    block = model.bert.encoder.layer[0].attention
    assert isinstance(block.output.context_dropout, FastDropout) and block.output.context_dropout.p == 0.1
    assert block.self.dropout.p == 0.0


def test_layers_of_another_layout_are_left_alone():
    model = AutoModelForSequenceClassification.from_config(MPNetConfig(**SMALL, num_labels=3))
    assert move_attention_dropout_to_context(model) == 0


@pytest.mark.parametrize("where, moved", [("probabilities", False), ("context", True)])
def test_train_attention_dropout_reaches_the_model(tiny_models, tiny_data, where, moved):
    # fails if the setting is ignored by the trainer (or applied when not asked for)
    trainer = Trainer(validate(tiny_config(tiny_models["bert"], tiny_data, **{"train.attention_dropout": where})),
                      None)
    trainer.setup()
    names = [name for name, _ in trainer.model.named_modules()]
    assert any(name.endswith("context_dropout") for name in names) is moved
    assert trainer.loop_figures()["attention_dropout"] == where  # what metrics.json records
    assert trainer.first_token_only  # fails if the first-token layer does not know the fp32 attention's name


class AttentionDtypes(TorchDispatchMode):
    """The dtype of the query every fused or math SDPA call receives."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.__name__ and "backward" not in func.__name__:
            self.seen.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_training_attention_runs_fused_in_fp32_and_evaluation_in_the_models_precision():
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(BertConfig(**SMALL, num_labels=3),
                                                           attn_implementation="sdpa")
    ids = torch.randint(5, 60, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=ids, attention_mask=mask).logits
    move_attention_dropout_to_context(model)
    assert model.config._attn_implementation == FP32_TRAINING_SDPA  # fails if the switch is not made
    model.train()
    with AttentionDtypes() as dtypes, torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert dtypes.seen == [torch.float32, torch.float32]  # fails if training attention stays in bf16
    logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    model.eval()
    with AttentionDtypes() as dtypes, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        after = model(input_ids=ids, attention_mask=mask).logits
    assert dtypes.seen == [torch.bfloat16, torch.bfloat16]  # evaluation: the faster bf16 forward, unchanged
    torch.testing.assert_close(after, before)


def test_fp32_training_attention_gives_sdpas_result():
    # in fp32 (nothing to upcast) and with padding: the function is transformers' SDPA, value for value
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(
        BertConfig(**{**SMALL, "attention_probs_dropout_prob": 0.0}, num_labels=3), attn_implementation="sdpa")
    ids = torch.randint(5, 60, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    model.train()
    reference = model(input_ids=ids, attention_mask=mask).logits
    assert use_fp32_training_attention(model)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, reference)


def test_fp32_training_attention_matches_fp32_sdpa_and_ignores_padded_keys():
    # the function itself, on bf16 inputs and transformers' boolean padding mask (True = attend): fails if the mask
    # is turned into a float (True/False as 1/0 added to the scores), if the result is not the fp32 one rounded
    # once, or if padded keys leak into the output
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 16).bfloat16() for _ in range(3))
    attend = torch.ones(2, 1, 9, 9, dtype=torch.bool)
    attend[1, :, :, 5:] = False
    module = torch.nn.Module().train()
    out, _ = sdpa_fp32_when_training_on_cpu(module, q, k, v, attend, dropout=0.0, scaling=0.25, is_causal=False)
    assert out.dtype == torch.bfloat16
    reference = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attend,
                                                                 scale=0.25).transpose(1, 2)
    torch.testing.assert_close(out.float(), reference, rtol=2**-7, atol=2**-8)
    v2 = v.clone()
    v2[1, :, 5:] = 100.0  # values of padded keys
    out2, _ = sdpa_fp32_when_training_on_cpu(module, q, k, v2, attend, dropout=0.0, scaling=0.25, is_causal=False)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
