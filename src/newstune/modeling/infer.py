"""Inference of a classifier on pre-tokenized texts: batched logits in input order, single-text latency."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.utils.benchmark as benchmark
from tqdm.auto import tqdm

from newstune.data.batching import Collator, pad_multiple, sorted_batches


def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX: where bf16 GEMMs run natively. Elsewhere torch emulates them (on an AVX2-only AMD Zen 3 a
    2048x2048 bf16 matmul ran ~500x slower than in fp32, MiniLM's forward on 32 texts 6.5x)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_is_native(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return cpu_has_native_bf16()


def autocast_for(precision: str, device: str) -> torch.autocast:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None)


def inference_batches(input_ids: list[list[int]], pad_token_id: int, batch_size: int, device: str,
                      desc: str = "predict", progress: bool = False) -> Iterator[tuple[list[int], dict]]:
    """Longest-first, dynamically padded batches already on `device`, each with the indices of its texts."""
    collate = Collator(pad_token_id, pad_multiple(device))
    batches = sorted_batches([len(ids) for ids in input_ids], batch_size)
    for indices in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        batch = collate([{"input_ids": input_ids[i]} for i in indices])
        yield indices, {k: v.to(device) for k, v in batch.items()}


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, input_ids: list[list[int]], pad_token_id: int, batch_size: int = 64,
                   precision: str = "fp32", device: str = "cpu", progress: bool = False,
                   desc: str = "predict") -> torch.Tensor:
    """Logits (fp32, in input order) for pre-tokenized texts, batched longest-first with dynamic padding."""
    was_training = model.training
    model.eval()
    out: torch.Tensor | None = None
    for indices, batch in inference_batches(input_ids, pad_token_id, batch_size, device, desc, progress):
        with autocast_for(precision, device):
            logits = model(**batch).logits.float().cpu()
        if out is None:
            out = torch.empty((len(input_ids), logits.shape[1]), dtype=torch.float32)
        out[indices] = logits
    model.train(was_training)
    return out if out is not None else torch.empty((0, 0))


def median_latency_ms(model: torch.nn.Module, input_ids: list[list[int]], pad_token_id: int, precision: str,
                      device: str = "cpu", samples: int = 30) -> float:
    """Median wall time of one single-text forward over `samples` texts, after two warm-up calls."""
    if samples == 0 or not input_ids:
        return 0.0
    texts = itertools.cycle(input_ids)
    timer = benchmark.Timer("predict_logits(model, [next(texts)], pad, 1, precision, device)",
                            globals={"predict_logits": predict_logits, "model": model, "texts": texts,
                                     "pad": pad_token_id, "precision": precision, "device": device})
    timer.timeit(2)
    runs = benchmark.Measurement.merge([timer.timeit(1) for _ in range(samples)])
    return runs[0].median * 1000
