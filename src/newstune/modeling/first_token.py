"""The last encoder layer run for the first token only: the one position a sequence-classification head reads.

BERT, RoBERTa and MPNet classifiers read the last layer's output at token 0 (the pooler or the classification
head), yet the layer computes every token: its query projection, attention rows, output projection, LayerNorms and
feed-forward block for all the others are thrown away. Keys and values still need every token; everything else needs
only token 0. The result is the same up to floating-point rounding (dropout draws differ in shape, so a run is not
bit-identical to the full layer when dropout is on). While it is on, the last layer returns one position per text
and no attention weights: nothing in training reads them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from peft import PeftModel

from newstune.modeling.fp32_attention import FP32_TRAINING_SDPA

logger = logging.getLogger(__name__)

# Heads that read only token 0 of the last hidden state.
HEADS_READING_TOKEN_0 = frozenset({
    "BertForSequenceClassification", "RobertaForSequenceClassification", "XLMRobertaForSequenceClassification",
    "CamembertForSequenceClassification", "ElectraForSequenceClassification", "MPNetForSequenceClassification",
})


def run_last_layer_on_first_token(model: torch.nn.Module) -> bool:
    """Make the last encoder layer compute token 0 only; False (and no change) for a model it does not know."""
    task_model = _task_model(model)
    # a decoder's token 0 attends to itself only (causal attention): not what this layer computes
    if type(task_model).__name__ not in HEADS_READING_TOKEN_0 or getattr(task_model.config, "is_decoder", False):
        return False
    layer = _last_layer(task_model)
    sdpa_or_eager = task_model.config._attn_implementation in ("sdpa", "eager", FP32_TRAINING_SDPA)
    if hasattr(layer.attention, "self") and sdpa_or_eager:
        patched = _bert_layer_forward(layer)
    elif hasattr(layer.attention, "attn"):
        patched = _mpnet_layer_forward(layer)
    else:
        return False
    gap = _disagreement(task_model, layer, patched)
    if gap is not None:
        logger.warning("first-token last layer off: on a check batch it disagrees with the full layer (%s); this "
                       "transformers version changed the layer it replaces, training runs the full layer", gap)
        return False
    layer.forward = patched
    return True


def _disagreement(task_model: torch.nn.Module, layer: torch.nn.Module, patched: Callable) -> str | None:
    """None when the patched layer gives the full layer's logits on one padded random batch, else what differs.

    The layer's forward is a copy of transformers' code: a transformers release that changes the layer (its inputs,
    its outputs, the attention interface) must switch this off, never train a different model silently.
    """
    param = next(task_model.parameters())
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, max(6, task_model.config.vocab_size), (2, 12), generator=generator).to(param.device)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # one padded row: the mask path must agree too
    low_precision = param.dtype != torch.float32 or any(p.dtype != param.dtype for p in task_model.parameters())
    was_training = task_model.training
    task_model.eval()
    # accelerate's mixed precision wraps forward in bf16 autocast and keeps the plain one as `_original_forward`:
    # through the wrapper an fp32 model was compared in bf16 against the fp32 tolerance, and the check turned the
    # layer off on rounding alone (an MPNet run on an AMX Xeon, 2026-12-06)
    forward = getattr(task_model, "_original_forward", task_model)
    try:
        with torch.no_grad(), torch.autocast(param.device.type, dtype=torch.bfloat16, enabled=low_precision):
            full = forward(input_ids=ids, attention_mask=mask).logits.float()
            layer.forward = patched
            first = forward(input_ids=ids, attention_mask=mask).logits.float()
    except Exception as err:  # noqa: BLE001 -- any failure of the copied forward is a disagreement, said in one line
        return f"{type(err).__name__}: {' '.join(str(err).split())[:120]}"
    finally:
        vars(layer).pop("forward", None)
        task_model.train(was_training)
    tolerance = (5e-2 if low_precision else 1e-4) * (1 + float(full.abs().max()))
    worst = float((full - first).abs().max())
    return None if worst <= tolerance else f"max |logit difference| {worst:.3g} > {tolerance:.3g}"


def restore_full_last_layer(model: torch.nn.Module) -> None:
    """Undo run_last_layer_on_first_token (a no-op for a model it did not change)."""
    task_model = _task_model(model)
    if type(task_model).__name__ in HEADS_READING_TOKEN_0:
        vars(_last_layer(task_model)).pop("forward", None)


def _task_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model (BertForSequenceClassification, ...) inside torch.compile's and PEFT's wrappers."""
    model = getattr(model, "_orig_mod", model)  # accelerate's unwrap_model keeps the torch.compile wrapper
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _last_layer(task_model: torch.nn.Module) -> torch.nn.Module:
    return getattr(task_model, task_model.base_model_prefix).encoder.layer[-1]


def _heads(x: torch.Tensor, head_size: int) -> torch.Tensor:
    """(batch, tokens, hidden) -> (batch, heads, tokens, head_size)"""
    return x.view(x.shape[0], x.shape[1], -1, head_size).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def _first_query_row(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A (batch, 1 or heads, queries, keys) mask or bias for the first query only."""
    return None if mask is None else mask[:, :, :1]


def _bert_layer_forward(layer: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """BertLayer and its copies (RoBERTa, XLM-R, ELECTRA): attention.self, attention.output, intermediate, output."""
    attention = layer.attention.self

    def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        first = hidden_states[:, :1].contiguous()  # strided, it made frozen (LoRA) linears copy their weight per row
        size = attention.attention_head_size
        context = F.scaled_dot_product_attention(
            _heads(attention.query(first), size), _heads(attention.key(hidden_states), size),
            _heads(attention.value(hidden_states), size), attn_mask=_first_query_row(attention_mask),
            dropout_p=attention.dropout.p if attention.training else 0.0, scale=attention.scaling)
        attention_output = layer.attention.output(_merge_heads(context), first)
        return layer.output(layer.intermediate(attention_output), attention_output)

    return forward


def _mpnet_layer_forward(layer: torch.nn.Module) -> Callable[..., tuple[torch.Tensor]]:
    """MPNetLayer: attention.attn (q, k, v, o) with the encoder's relative position bias added to the scores."""
    attention = layer.attention.attn

    def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_bias: torch.Tensor | None = None, *args, **kwargs):
        first = hidden_states[:, :1].contiguous()  # strided, it made frozen (LoRA) linears copy their weight per row
        size = attention.attention_head_size
        scores = _heads(attention.q(first), size) @ _heads(attention.k(hidden_states), size).transpose(-1, -2)
        scores = scores / size**0.5
        for bias in (_first_query_row(position_bias), _first_query_row(attention_mask)):
            if bias is not None:
                scores = scores + bias
        probabilities = attention.dropout(torch.softmax(scores, dim=-1))
        context = _merge_heads(probabilities @ _heads(attention.v(hidden_states), size))
        attention_output = layer.attention.LayerNorm(layer.attention.dropout(attention.o(context)) + first)
        return (layer.output(layer.intermediate(attention_output), attention_output),)

    return forward
