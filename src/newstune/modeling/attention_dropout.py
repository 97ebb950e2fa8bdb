"""Attention dropout moved from the attention probabilities to the attention's output (the context vectors), and
the fused attention kernel run in fp32 while training on a CPU.

On CPU, `scaled_dot_product_attention` with a non-zero dropout leaves its fused flash kernel for the unfused math
path (softmax, a bernoulli mask over every query-key pair, two matmuls): ~16% of a MiniLM LoRA step. Dropping the
context (batch x tokens x hidden, before the output projection) instead keeps the fused kernel and draws far fewer
random numbers. It is a different regulariser (DropKey and dropout on the attention output are the published
relatives), so it is opt-in (`train.attention_dropout: context`).

The fused kernel's bf16 *backward* is slow on the CPUs measured (torch 2.13; AMX Xeon, 2026-12-07, 12 heads of 32,
batch 16 x 64 tokens: forward + backward 14.8 ms in bf16 against 3.1 ms in fp32 with the casts, while the bf16
forward alone is faster, 0.58 vs 1.0 ms). That is why moving the dropout alone was measured slower (0.77x on a
Zen 4): the fused bf16 kernel replaced a faster math path. So while training on a CPU with 16-bit activations and no
dropout inside the attention, the attention here runs the fused kernel in fp32 (`newstune_sdpa`, registered with
transformers' AttentionInterface: the library's own hook for an attention function); evaluation and inference keep
transformers' SDPA in the model's precision, where the bf16 forward is the faster one.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

FP32_TRAINING_SDPA = "newstune_sdpa"


def sdpa_fp32_when_training_on_cpu(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                   value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                   **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention; in training on a CPU with bf16/fp16 inputs and no dropout, computed in fp32
    (the fused kernel's fast path there) and returned in the inputs' dtype."""
    if not (module.training and dropout == 0 and query.device.type == "cpu"
            and query.dtype in (torch.bfloat16, torch.float16)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, **kwargs)
    dtype = query.dtype
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()  # a boolean mask stays boolean
    with torch.autocast("cpu", enabled=False):  # autocast would cast the fp32 inputs straight back to bf16
        output, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                                 dropout=dropout, **kwargs)
    return output.to(dtype), weights


AttentionInterface.register(FP32_TRAINING_SDPA, sdpa_fp32_when_training_on_cpu)
AttentionMaskInterface.register(FP32_TRAINING_SDPA, sdpa_mask)  # the same masks as transformers' SDPA


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


def use_fp32_training_attention(model: torch.nn.Module) -> bool:
    """Switch a transformers model on SDPA (inside PEFT's or torch.compile's wrapper) to `newstune_sdpa`."""
    task_model = getattr(model, "_orig_mod", model)
    task_model = task_model.get_base_model() if hasattr(task_model, "get_base_model") else task_model
    if getattr(task_model.config, "_attn_implementation", None) != "sdpa":
        return False
    task_model.set_attn_implementation(FP32_TRAINING_SDPA)
    return True
