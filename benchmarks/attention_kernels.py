"""Which attention kernel trains fastest on this CPU? Forward + backward of one attention call per path and shape.

    python benchmarks/attention_kernels.py                  # MiniLM's heads (12 x 32), batches 16-32, 32-128 tokens

The paths a BERT-style layer can take under bf16 autocast: the unfused math path that dropout on the attention
probabilities forces (a bernoulli mask over every query-key pair), the fused flash kernel in bf16 (no dropout inside
the attention), and the fused kernel in fp32 with the casts there and back -- what `train.attention_dropout: context`
trains with on CPU (`newstune.modeling.attention_dropout`). Forward-only times are printed too: inference keeps the
model's precision. Every path runs on the same random q, k, v and padding mask, rounds alternating, median over
rounds. Prints one line per shape and `fp32_fused_vs_bf16_math:` (the geometric mean of the speed-ups over the shapes).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_line  # noqa: E402

SHAPES = [(32, 32), (16, 64), (32, 64), (16, 128)]  # (batch, tokens)


def paths(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
          grad: torch.Tensor) -> dict[str, Callable[[], None]]:
    def bf16_math_dropout() -> None:
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.1).backward(grad)

    def bf16_fused() -> None:
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).backward(grad)

    def fp32_fused_with_casts() -> None:
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float())
        out.to(q.dtype).backward(grad)

    def bf16_forward() -> None:
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def fp32_forward_with_casts() -> None:
        with torch.no_grad():
            F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float()).to(q.dtype)

    return {"bf16_math_dropout": bf16_math_dropout, "bf16_fused": bf16_fused,
            "fp32_fused_with_casts": fp32_fused_with_casts, "bf16_forward": bf16_forward,
            "fp32_forward_with_casts": fp32_forward_with_casts}


def time_ms(fn: Callable[[], None], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10, help="calls per path per round")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(cpu_line())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; heads {args.heads} x {args.head_size}; "
          "ms per call, median over rounds")
    speedups = []
    for batch, tokens in SHAPES:
        q, k, v = (torch.randn(batch, args.heads, tokens, args.head_size, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        mask = torch.zeros(batch, 1, 1, tokens, dtype=torch.bfloat16)
        mask[: batch // 2, :, :, tokens * 3 // 4:] = float("-inf")  # half the rows padded by a quarter
        grad = torch.randn(batch, args.heads, tokens, args.head_size, dtype=torch.bfloat16)
        calls = paths(q, k, v, mask, grad)
        for fn in calls.values():
            fn()  # warm-up
        times: dict[str, list[float]] = {name: [] for name in calls}
        for round_ in range(args.rounds):
            for name in (calls if round_ % 2 == 0 else list(calls)[::-1]):
                times[name].append(time_ms(calls[name], args.repeats))
        median = {name: statistics.median(values) for name, values in times.items()}
        speedups.append(median["bf16_math_dropout"] / median["fp32_fused_with_casts"])
        print(f"batch {batch:3d} x {tokens:3d} tokens: forward+backward -- bf16 math + dropout "
              f"{median['bf16_math_dropout']:.2f}, bf16 fused {median['bf16_fused']:.2f}, fp32 fused + casts "
              f"{median['fp32_fused_with_casts']:.2f}; forward only -- bf16 fused {median['bf16_forward']:.2f}, "
              f"fp32 fused + casts {median['fp32_forward_with_casts']:.2f}")
    print(f"fp32_fused_vs_bf16_math: {math.exp(statistics.mean(math.log(s) for s in speedups)):.2f}x")


if __name__ == "__main__":
    main()
