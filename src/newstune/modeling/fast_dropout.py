"""Dropout with cheaper masks on CPU: a drop-in for torch.nn.Dropout during training."""

from __future__ import annotations

import torch


class FastDropout(torch.nn.Module):
    """Dropout whose keep-mask compares 16-bit slices of 64-bit random draws with a threshold.

    On CPU, torch's bernoulli_ mask generation is the largest single op of a bf16 LoRA step; this draws a quarter
    as many random numbers. p is honoured to 1/65536; the draws come from torch's seeded generator.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        n = x.numel()
        draws = torch.randint(-2**63, 2**63 - 1, (-(-n // 4),), dtype=torch.int64, device=x.device)
        keep = draws.view(torch.int16)[:n].view(x.shape) >= round(self.p * 65536) - 32768
        return x * keep * (1 / (1 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: torch.nn.Module) -> int:
    """Replace every torch.nn.Dropout (encoder and LoRA) with FastDropout; returns how many."""
    count = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is torch.nn.Dropout:
                setattr(parent, name, FastDropout(child.p))
                count += 1
    return count
