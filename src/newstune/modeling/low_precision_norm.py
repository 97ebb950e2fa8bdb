"""LayerNorm that returns the autocast dtype (bf16) on CPU instead of fp32.

Under CPU autocast, layer_norm runs in fp32 and returns fp32, so every linear layer that reads a LayerNorm's output
casts the same activations back to bf16 on its own (query, key, value, LoRA's A matrices, the FFN: five casts of one
tensor per attention block, and as many casts of the gradients back). torch's CPU layer_norm accepts a bf16 input
with fp32 (trainable) or bf16 (frozen) weights, accumulates in fp32 and returns bf16: the statistics keep fp32
precision, the output is rounded once. The cost is a residual stream held in bf16 (BERT-style layers normalise it
after every sub-layer), a different numeric path from autocast's, so it is opt-in (`train.bf16_norm_output`).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _forward(self: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return torch.nn.LayerNorm.forward(self, x)
    weight, bias = self.weight, self.bias
    if x.dtype == torch.float32 and weight is not None and weight.dtype != torch.float32:  # frozen bf16 weights
        weight, bias = weight.float(), None if bias is None else bias.float()
    with torch.autocast("cpu", enabled=False):  # a bf16 input takes fp32 or bf16 weights and returns bf16
        out = F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
    return out.to(torch.get_autocast_dtype("cpu"))


def use_low_precision_norm_output(model: torch.nn.Module) -> int:
    """Every torch.nn.LayerNorm returns the autocast dtype on CPU; returns how many changed."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.LayerNorm:
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count
