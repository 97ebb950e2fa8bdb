"""The attention of a training step on CPU run in SDPA's fused kernel in fp32 (`newstune_sdpa`).

The fused kernel's bf16 *backward* is slow on the CPUs measured (torch 2.13; AMX Xeon, 2026-12-07,
`benchmarks/attention_kernels.py`: forward + backward of MiniLM's attention at 16 x 64 tokens 19.2 ms in bf16 against
5.0 ms in fp32 with the casts, and the dropout math path 12.8 ms), while its bf16 forward alone is the faster one
(0.67 vs 1.15 ms). So in training, on a CPU, with 16-bit inputs and no dropout inside the attention, the attention
runs transformers' SDPA in fp32 and returns the inputs' dtype; evaluation, inference, GPUs and dropout inside the
attention get transformers' SDPA unchanged. It is registered with transformers' AttentionInterface (the library's
own hook for an attention function) under its own name, so no model uses it unless switched to it; transformers does
not save the name in a model's config.json, so a saved model loads on plain SDPA.
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


def use_fp32_training_attention(model: torch.nn.Module) -> bool:
    """Switch a transformers model on SDPA (inside PEFT's or torch.compile's wrapper) to `newstune_sdpa`."""
    task_model = getattr(model, "_orig_mod", model)
    task_model = task_model.get_base_model() if hasattr(task_model, "get_base_model") else task_model
    if getattr(task_model.config, "_attn_implementation", None) != "sdpa":
        return False
    task_model.set_attn_implementation(FP32_TRAINING_SDPA)
    return task_model.config._attn_implementation == FP32_TRAINING_SDPA  # transformers may refuse and only warn
