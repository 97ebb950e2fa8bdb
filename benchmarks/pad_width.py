"""Does rounding batch widths up pay on this CPU? Forward + backward time of one training step per batch width.

    python benchmarks/pad_width.py                        # MiniLM full fine-tune, batch 32, widths 49..64
    python benchmarks/pad_width.py --model mpnet --widths 41-48 57-64

`newstune.data.batching.pad_multiple` rounds widths up to a multiple (8 on CUDA, 1 on a CPU). A multiple pays only
if a wider batch costs less than a narrower one: on AMX CPUs the bf16 tiles are 16 rows by 32 columns, so widths that
are multiples of 16 or 32 might run faster per step. Each width is timed on the same random token ids (no padding
inside), in the machine's native precision (bf16 autocast where the CPU has it), rounds alternating upward and
downward over the widths, median over rounds. Prints one line per width and `best_multiple:` -- the multiple m in
{1, 8, 16, 32} whose rounded-up widths give the lowest mean step time over the widths asked for.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from newstune.config import LoraSettings, ModelSettings
from newstune.modeling.infer import autocast_for
from newstune.modeling.model import build_model
from newstune.training.train import resolve_precision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_line  # noqa: E402


def parse_widths(spans: list[str]) -> list[int]:
    widths: list[int] = []
    for span in spans:
        low, _, high = span.partition("-")
        widths.extend(range(int(low), int(high or low) + 1))
    return sorted(set(widths))


def step_seconds(model: torch.nn.Module, width: int, batch: int, precision: str) -> float:
    ids = torch.randint(1000, 20000, (batch, width))
    labels = torch.randint(0, 4, (batch,))
    start = time.perf_counter()
    with autocast_for(precision, "cpu"):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--widths", nargs="+", default=["49-64"], help="spans such as 49-64 or single widths")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    widths = parse_widths(args.widths)
    model = build_model(ModelSettings(name=args.model), LoraSettings(method="full"), ["a", "b", "c", "d"]).model
    model.train()
    precision = resolve_precision("auto", "cpu")
    print(cpu_line())
    print(f"precision: {precision}, threads: {torch.get_num_threads()}, model: {args.model}, "
          f"batch: {args.batch}")
    for width in (widths[0], widths[-1]):  # warm-up: oneDNN builds its kernels per shape
        step_seconds(model, width, args.batch, precision)
    times: dict[int, list[float]] = {w: [] for w in widths}
    for round_index in range(args.rounds):
        for width in widths if round_index % 2 == 0 else reversed(widths):
            times[width].append(step_seconds(model, width, args.batch, precision))
    median = {w: statistics.median(t) for w, t in times.items()}
    print("| width | step ms | ms per token column |")
    print("|---|---|---|")
    for width in widths:
        print(f"| {width} | {median[width] * 1000:.1f} | {median[width] * 1000 / width:.2f} |")
    cost = {}
    for multiple in (1, 8, 16, 32):
        rounded = [-(-w // multiple) * multiple for w in widths]
        if all(r in median for r in rounded):
            cost[multiple] = statistics.mean(median[r] for r in rounded)
    for multiple, seconds in cost.items():
        print(f"multiple {multiple}: mean step {seconds * 1000:.1f} ms over the widths asked for")
    print(f"best_multiple: {min(cost, key=cost.get)}")


if __name__ == "__main__":
    main()
