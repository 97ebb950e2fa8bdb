"""MPNet's self-attention trained through CPU SDPA's fused kernel in fp32, its relative position bias as the mask.

transformers' MPNet computes its attention in eager code (two matmuls, the relative position bias and the padding
mask added to the scores, softmax, dropout): it has no attention interface, so neither SDPA nor `newstune_sdpa`
(`modeling/fp32_attention.py`, the same idea for BERT-style layers) reaches it. Once its attention dropout has moved
to the context, the attention is exactly SDPA with a float mask (bias + padding mask), and on CPU the fused kernel
runs it in fp32 faster than the eager path runs it in bf16 (`benchmarks/attention_kernels.py`).

The fused kernel computes no gradient for its mask: torch's dispatcher sends SDPA to the unfused math path whenever
the mask requires grad, i.e. when the relative position bias trains (a full fine-tune). So the fused forward is used
only in training, on CPU, with no dropout inside the attention and a bias that is frozen (LoRA, or a cached prefix);
in every other case (evaluation, inference, GPUs, a trained bias, attention weights asked for) the layer runs
transformers' own forward unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def fused_training_attention(attention: torch.nn.Module) -> None:
    """Give one MPNetSelfAttention the fused fp32 path for training on CPU (its own forward everywhere else)."""
    eager = attention.forward  # the bound method of transformers' class

    def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_bias: torch.Tensor | None = None, output_attentions: bool = False, **kwargs):
        if not (attention.training and attention.dropout.p == 0 and not output_attentions
                and hidden_states.device.type == "cpu"
                and not (position_bias is not None and position_bias.requires_grad)):
            return eager(hidden_states, attention_mask, position_bias, output_attentions=output_attentions, **kwargs)
        shape = (*hidden_states.shape[:-1], -1, attention.attention_head_size)
        q, k, v = (projection(hidden_states).view(shape).transpose(1, 2)
                   for projection in (attention.q, attention.k, attention.v))
        mask = None
        for bias in (position_bias, attention_mask):  # both additive and fp32 in transformers' MPNet
            if bias is not None:
                mask = bias.float() if mask is None else mask + bias.float()
        with torch.autocast("cpu", enabled=False):  # autocast would cast the fp32 inputs straight back to bf16
            context = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                     scale=1 / math.sqrt(attention.attention_head_size))
        context = context.to(q.dtype).transpose(1, 2).reshape(*hidden_states.shape[:-1], attention.all_head_size)
        return (attention.o(context),)

    attention.forward = forward


def is_mpnet_attention(module: torch.nn.Module) -> bool:
    """MPNetSelfAttention's layout: q, k, v, o projections and a dropout on the probabilities."""
    return all(hasattr(module, name) for name in ("q", "k", "v", "o", "dropout", "attention_head_size"))
