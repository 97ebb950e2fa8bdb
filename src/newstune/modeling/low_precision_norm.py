"""LayerNorm that returns the autocast dtype (bf16) while training on CPU (evaluation keeps the plain LayerNorm,
as the saved model will).

CPU autocast runs layer_norm in its input's dtype. In a model whose embeddings are fp32 (a full fine-tune) the
embedding sum is fp32, so the embeddings' LayerNorm returns fp32, each residual add (bf16 sub-layer output + fp32
stream) is fp32 and so is every LayerNorm after it: the whole residual stream stays fp32, and every linear layer
reading it casts the same activations to bf16 on its own (query, key, value, the FFN), with as many casts of the
gradients back. Here a LayerNorm under CPU autocast returns bf16: torch's CPU layer_norm takes fp32 or bf16 inputs
and weights and accumulates in fp32, so the statistics keep fp32 precision and the output is rounded once. The cost
is a residual stream held in bf16, a different numeric path, so it is opt-in (`train.bf16_norm_output`). With
bf16-held frozen weights (LoRA) the stream is bf16 already and this changes nothing. Measured 1.02-1.03x on the AMX
Xeon (docs/performance.md): not adopted by any recipe.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _forward(self: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    if not self.training or x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):  # evaluation as saved
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
