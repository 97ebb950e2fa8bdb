"""Attention dropout moved from the attention probabilities to the attention's output (the context vectors).

On CPU, `scaled_dot_product_attention` with a non-zero dropout leaves its fused flash kernel for the unfused math
path (softmax, a bernoulli mask over every query-key pair, two matmuls): ~16% of a MiniLM LoRA step. Dropping the
context (batch x tokens x hidden, before the output projection) instead keeps the fused kernel and draws far fewer
random numbers. It is a different regulariser (DropKey and dropout on the attention output are the published
relatives), so it is opt-in (`train.attention_dropout: context`).

On CPU the fused kernel's bf16 backward is slower than the math path it would replace (why moving the dropout
alone measured 0.75-0.77x), so a model whose dropout moved trains its attention with `newstune_sdpa`
(`modeling/fp32_attention.py`): the fused kernel in fp32.
"""

from __future__ import annotations

import torch

from newstune.modeling.fp32_attention import use_fp32_training_attention


def move_attention_dropout_to_context(model: torch.nn.Module) -> int:
    """For every BERT-style attention block (`.self` with a dropout, `.output.dense`): the probabilities' dropout
    set to 0 and the same p applied to the input of the output projection; a model on transformers' SDPA then
    trains with `newstune_sdpa` (fp32 fused attention on CPU). Returns how many blocks changed; MPNet and others
    without that layout are left alone (0). Call it after LoRA wraps the projections and before use_fast_dropout
    (which then swaps the new Dropout modules like any other)."""
    changed = 0
    for block in model.modules():
        attention, output = getattr(block, "self", None), getattr(block, "output", None)
        if not isinstance(getattr(attention, "dropout", None), torch.nn.Module) or not hasattr(output, "dense"):
            continue
        p = attention.dropout.p
        if p == 0:
            continue
        attention.dropout.p = 0.0  # the attention interface passes dropout.p to SDPA: 0 keeps the fused kernel
        output.add_module("context_dropout", torch.nn.Dropout(p).train(output.training))  # a new module trains
        # looked up at call time, so that use_fast_dropout's replacement module is the one applied
        output.dense.register_forward_pre_hook(lambda _, args, owner=output: (owner.context_dropout(args[0]),
                                                                              *args[1:]))
        changed += 1
    if changed:
        use_fp32_training_attention(model)
    return changed
