"""torch.profiler over N training steps: time per op category, per phase, top ops, memory, and MFU."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, record_function
from transformers import AutoConfig

from newstune.data.registry import load_dataset
from newstune.modeling.weights import resolve_model_path
from newstune.training.train import Trainer

CATEGORIES = ("gemm", "attention", "norm_elementwise", "optimizer", "data", "other")
PHASES = ("data", "forward", "backward", "optimizer")
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::_addmm_activation"}
# In a BERT-style encoder batched matmuls only occur in attention (QK^T and AV); the projections are 2-D mm/addmm.
ATTENTION_OPS = {"aten::bmm", "aten::baddbmm", "aten::softmax", "aten::_softmax", "aten::_softmax_backward_data",
                 "aten::_safe_softmax"}
NORM_ELEMENTWISE = ("layer_norm", "gelu", "dropout", "bernoulli", "add", "mul", "div", "sub", "tanh", "masked_fill",
                    "where", "copy_", "_to_copy", "clamp", "rsub", "neg", "pow", "sqrt", "exp", "fill_", "zero_",
                    "embedding", "threshold", "sum", "mean")


def op_category(name: str, phase: str | None = None) -> str:
    """GEMM / attention / norm+elementwise / optimizer / data / other, from the aten op name (and phase)."""
    if phase == "data":
        return "data"
    if phase == "optimizer" or name.startswith("aten::_foreach") or "adam" in name.lower():
        return "optimizer"
    if name in GEMM_OPS:
        return "gemm"
    if name in ATTENTION_OPS or "scaled_dot_product" in name or "attention" in name:
        return "attention"
    bare = name.removeprefix("aten::").lstrip("_")
    if any(bare.startswith(op) or bare.endswith(op) for op in NORM_ELEMENTWISE) or "layer_norm" in bare:
        return "norm_elementwise"
    return "other"


def matmul_peak_tflops(dtype: torch.dtype = torch.bfloat16, size: int = 2048, seconds: float = 2.0) -> float:
    """Best FLOP/s of one square matmul on this device and dtype: the peak MFU is measured against."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best / 1e12


def analytic_train_flops(config, lengths: list[int], full_finetune: bool = False, cached_layers: int = 0,
                         first_token_last_layer: bool = False) -> float:
    """Forward FLOPs per layer: 2 x linear parameters per token, plus 4 x l x hidden per token (QK^T and AV).
    Backward of the linears: one forward more through frozen weights (input gradients), two with weight gradients
    (full fine-tuning). Attention's matmuls multiply two activations, so their backward always costs two forwards.
    `cached_layers` lower layers run forward only, once (train.cache_frozen_layers); with
    `first_token_last_layer` the last layer projects keys and values for every token and the rest for token 0."""
    hidden, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    key_value = 2 * 2 * hidden * hidden
    query_out_ffn = 2 * (2 * hidden * hidden + 2 * hidden * inter)

    def trained(linear: float, attention: float) -> float:
        return linear * (3 if full_finetune else 2) + attention * 3

    linear = sum((key_value + query_out_ffn) * n for n in lengths)
    attention = sum(4 * n * n * hidden for n in lengths)
    full_layer = trained(linear, attention)
    skipped_in_last_layer = full_layer - trained(sum(key_value * n + query_out_ffn for n in lengths),
                                                 sum(4 * n * hidden for n in lengths)) if first_token_last_layer else 0
    return cached_layers * (linear + attention) + (layers - cached_layers) * full_layer - skipped_in_last_layer


def _phase(event) -> str | None:
    node = event
    while node is not None:
        if node.name.startswith("newstune::"):
            return node.name.removeprefix("newstune::")
        node = node.cpu_parent
    return None


def profiled_steps(trainer, steps: int, warmup: int) -> tuple[torch.profiler.profile, list[int], float]:
    """Runs warmup + steps micro-steps of the trainer's own train_step (grad accumulation, clipping and the
    scheduler included); profiles the last `steps`."""
    trainer.model.train()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    batches = iter(trainer.train_loader)
    lengths: list[int] = []

    def step(record: bool) -> None:
        with record_function("newstune::data"):
            batch = next(batches)
        if record:
            lengths.extend(batch["attention_mask"].sum(1).tolist())
        trainer.train_step(batch)

    for _ in range(warmup):
        step(False)
    with torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step(True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return prof, lengths, seconds


def breakdown(prof: torch.profiler.profile) -> dict:
    """Self time and memory per category, per phase, and the top 20 ops (leaf ops only: no double counting)."""
    by_category: dict[str, float] = defaultdict(float)
    memory: dict[str, int] = defaultdict(int)
    by_phase: dict[str, float] = defaultdict(float)
    phase_category: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    by_op: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.name.startswith("newstune::"):
            by_phase[event.name.removeprefix("newstune::")] += event.cpu_time_total / 1e3
            continue
        phase = _phase(event)
        category = op_category(event.name, phase)
        self_ms = event.self_cpu_time_total / 1e3 + getattr(event, "self_device_time_total", 0) / 1e3
        by_category[category] += self_ms
        phase_category[phase or "other"][category] += self_ms
        memory[category] += max(event.self_cpu_memory_usage, 0)
        by_op[event.name] += self_ms
    total = sum(by_category.values()) or 1.0
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:20]
    return {
        "category_ms": {c: by_category.get(c, 0.0) for c in CATEGORIES},
        "category_share": {c: by_category.get(c, 0.0) / total for c in CATEGORIES},
        "phase_ms": {p: by_phase.get(p, 0.0) for p in PHASES},
        "phase_category_ms": {p: dict(phase_category[p]) for p in PHASES if p in phase_category},
        "category_alloc_mb": {c: memory.get(c, 0) / 2**20 for c in CATEGORIES},
        "top_ops": [{"op": name, "self_ms": ms, "category": op_category(name)} for name, ms in top],
    }


def profile_run(config, steps: int, warmup: int, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=False)
    trainer = Trainer(config, out_dir)
    trainer.setup(load_dataset(config.data, config.train.seed))
    prof, lengths, seconds = profiled_steps(trainer, steps, warmup)
    prof.export_chrome_trace(str(out_dir / "trace.json"))
    dtype = torch.bfloat16 if trainer.precision == "bf16" else torch.float16 if trainer.precision == "fp16" \
        else torch.float32
    peak = matmul_peak_tflops(dtype)
    trained_config = AutoConfig.from_pretrained(resolve_model_path(config.model.name))
    if trainer.prefix is not None:  # the cached lower layers do not run in a training step
        trained_config.num_hidden_layers -= trainer.prefix.depth
    flops = analytic_train_flops(trained_config, lengths, config.lora.method == "full",
                                 first_token_last_layer=trainer.first_token_only)
    result = {"model": config.model.name, "method": config.lora.method, "precision": trainer.precision,
              "frozen_weights_dtype": trainer.frozen_dtype, "steps": steps,
              "cached_layers": trainer.prefix.depth if trainer.prefix is not None else 0, "warmup": warmup,
              "first_token_last_layer": trainer.first_token_only,
              "batch_size": config.train.batch_size, "tokens": sum(lengths), "wall_seconds": seconds,
              "tokens_per_s": sum(lengths) / seconds, "matmul_peak_tflops": peak,
              "achieved_tflops": flops / seconds / 1e12, "mfu": flops / seconds / (peak * 1e12),
              **breakdown(prof)}
    (out_dir / "profile.json").write_text(json.dumps(result, indent=1))
    return result


def print_profile(result: dict) -> None:
    console = Console()
    table = Table(title=f"{result['model']} {result['method']} {result['precision']}: time by op category")
    for column in ("category", "ms", "share", "alloc MB"):
        table.add_column(column)
    for c in CATEGORIES:
        table.add_row(c, f"{result['category_ms'][c]:.0f}", f"{result['category_share'][c]:.1%}",
                      f"{result['category_alloc_mb'][c]:.0f}")
    console.print(table)
    console.print("phases (ms): " + ", ".join(f"{p} {ms:.0f}" for p, ms in result["phase_ms"].items()))
    top = Table(title="top 20 ops (self time)")
    for column in ("op", "category", "ms"):
        top.add_column(column)
    for op in result["top_ops"]:
        top.add_row(op["op"], op["category"], f"{op['self_ms']:.0f}")
    console.print(top)
    console.print(f"{result['tokens_per_s']:.0f} tokens/s; achieved {result['achieved_tflops']:.3f} TFLOP/s of a "
                  f"measured {result['matmul_peak_tflops']:.3f} TFLOP/s {result['precision']} matmul peak: "
                  f"MFU {result['mfu']:.1%}")
