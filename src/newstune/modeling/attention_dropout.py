"""Attention dropout moved from the attention probabilities to the attention's output (the context vectors).

On CPU, `scaled_dot_product_attention` with a non-zero dropout leaves its fused flash kernel for the unfused math
path (softmax, a bernoulli mask over every query-key pair, two matmuls): ~16% of a MiniLM LoRA step. Dropping the
context (batch x tokens x hidden, before the output projection) instead keeps the fused kernel and draws far fewer
random numbers. It is a different regulariser (DropKey and dropout on the attention output are the published
relatives), so it is opt-in (`train.attention_dropout: context`).

On CPU the fused kernel's bf16 backward is slower than the math path it would replace (why moving the dropout
alone measured 0.75-0.77x), so a model whose dropout moved trains its attention with `newstune_sdpa`
(`modeling/fp32_attention.py`): the fused kernel in fp32. MPNet's attention is transformers' eager code with a relative
position bias; its dropout moves the same way, and it then trains through the fused kernel with the bias as the mask
(`modeling/mpnet_sdpa.py`).
"""

from __future__ import annotations

import torch

from newstune.modeling.fp32_attention import use_fp32_training_attention
from newstune.modeling.mpnet_sdpa import fused_training_attention, is_mpnet_attention


def move_attention_dropout_to_context(model: torch.nn.Module) -> int:
    """For every BERT-style attention block (`.self` with a dropout, `.output.dense`) and every MPNet one (`.attn`
    with q, k, v, o and a dropout): the probabilities' dropout set to 0 and the same p applied to the input of the
    output projection; a model on transformers' SDPA then trains with `newstune_sdpa`, an MPNet attention with its
    fused fp32 path (both: CPU only). Returns how many blocks changed; other layouts are left alone (0). Call it after
    LoRA wraps the projections and before use_fast_dropout (which then swaps the new Dropout modules like any
    other)."""
    bert_style = 0
    mpnet = 0
    for block in model.modules():
        attention, output = getattr(block, "self", None), getattr(block, "output", None)
        if isinstance(getattr(attention, "dropout", None), torch.nn.Module) and hasattr(output, "dense"):
            bert_style += _move(attention.dropout, output, output.dense)
        elif is_mpnet_attention(getattr(block, "attn", None)) and _move(block.attn.dropout, block.attn, block.attn.o):
            fused_training_attention(block.attn)
            mpnet += 1
    if bert_style:
        use_fp32_training_attention(model)
    return bert_style + mpnet


def _move(dropout: torch.nn.Module, owner: torch.nn.Module, projection: torch.nn.Module) -> bool:
    """Dropout p moved from `dropout` (set to 0) to a new `owner.context_dropout` applied to `projection`'s input."""
    p = dropout.p
    if p == 0:
        return False
    dropout.p = 0.0  # the attention passes dropout.p to SDPA: 0 keeps the fused kernel
    owner.add_module("context_dropout", torch.nn.Dropout(p).train(owner.training))  # a new module trains
    # looked up at call time, so that use_fast_dropout's replacement module is the one applied
    projection.register_forward_pre_hook(lambda _, args: (owner.context_dropout(args[0]), *args[1:]))
    return True
