"""Inference backends: a run's classifier as logits for pre-tokenized texts, from PyTorch, ONNX Runtime or OpenVINO.

Every backend runs the same longest-first, dynamically padded batches (`infer.inference_batches`), so their
logits are comparable row for row; what turns logits into probabilities and labels is not a backend's job.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from newstune.errors import NewstuneError
from newstune.modeling.infer import inference_batches, predict_logits

BACKENDS = ("torch", "onnx", "openvino")
EXTRA_HINT = "pip install 'newstune[fast]'"
MIN_BATCHES_FOR_STREAMS = 4  # smaller batch work stays on the latency path (a guard, not a measured threshold)
OPENVINO_STREAMS = 2  # batch work: measured on 2 cores only (docs/serving.md), so never more streams than this


@dataclass
class Scorer:
    """Logits (fp32 numpy, input order) for token id lists; `backend` and `precision` say what computes them.

    `forward` scores one padded batch. `forward_many`, where a backend has one, scores a stream of (indices, batch)
    pairs several at a time and yields (indices, logits) as they finish; `logits(..., throughput=True)` uses it for
    batch work (predict, evaluate, calibrate, distill), never for serve's micro-batches."""

    backend: str
    precision: str
    pad_token_id: int
    forward: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    model: torch.nn.Module | None = field(default=None, repr=False)
    forward_many: Callable[[Iterable[tuple[list[int], dict]]], Iterator[tuple[list[int], np.ndarray]]] | None = None

    @property
    def name(self) -> str:
        return f"{self.backend}-{self.precision}"

    def logits(self, input_ids: list[list[int]], batch_size: int = 64, progress: bool = False,
               desc: str = "predict", throughput: bool = False) -> np.ndarray:
        if self.model is not None:
            return predict_logits(self.model, input_ids, self.pad_token_id, batch_size, self.precision,
                                  progress=progress, desc=desc).numpy()
        batches = inference_batches(input_ids, self.pad_token_id, batch_size, "cpu", desc, progress)
        if throughput and self.forward_many is not None and len(input_ids) >= MIN_BATCHES_FOR_STREAMS * batch_size:
            scored = self.forward_many(batches)
        else:
            scored = ((indices, self.forward(batch["input_ids"].numpy(), batch["attention_mask"].numpy()))
                      for indices, batch in batches)
        out: np.ndarray | None = None
        filled = 0
        for indices, logits in scored:
            if out is None:
                out = np.empty((len(input_ids), logits.shape[1]), dtype=np.float32)
            out[indices] = logits
            filled += len(indices)
        if filled != len(input_ids):  # never hand back np.empty's garbage as logits
            raise RuntimeError(f"{self.name}: {filled} of {len(input_ids)} rows were scored")
        return out if out is not None else np.empty((0, 0), dtype=np.float32)


def torch_scorer(model: torch.nn.Module, pad_token_id: int, precision: str) -> Scorer:
    return Scorer("torch", precision, pad_token_id, model=model)


def onnx_scorer(path: Path, pad_token_id: int, precision: str) -> Scorer:
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    return Scorer("onnx", precision, pad_token_id, forward)


def openvino_scorer(path: Path, pad_token_id: int, precision: str) -> Scorer:
    ov = require("openvino")
    core, threads = ov.Core(), torch.get_num_threads()
    # LATENCY: one stream, which serves one batch at a time as serve sends them; threads as torch's (a `serve
    # --workers N` process sets its share of the cores there).
    compiled = core.compile_model(str(path), "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    if precision == "fp32" and compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16:
        precision = "bf16"  # OpenVINO computes an fp32 model in bf16 on CPUs that have it natively
    streams = min(OPENVINO_STREAMS, threads)
    batch_model: list[object] = []  # the THROUGHPUT compilation, made on first use (a second copy of the weights)

    def forward(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        request.infer({"input_ids": input_ids, "attention_mask": attention_mask})
        return request.get_output_tensor(0).data.copy()

    def forward_many(batches: Iterable[tuple[list[int], dict]]) -> Iterator[tuple[list[int], np.ndarray]]:
        """Batch work: two streams splitting the threads, each running its own batch, so the small element-wise and
        attention kernels that two threads share poorly run whole on one core (+10% end to end on a 2-core AMX
        Xeon, docs/serving.md). OpenVINO's AsyncInferQueue keeps both busy; rows go back with their indices."""
        if not batch_model:
            batch_model.append(core.compile_model(str(path), "CPU", {
                "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": streams, "INFERENCE_NUM_THREADS": threads}))
        queue = ov.AsyncInferQueue(batch_model[0], streams)
        done: list[tuple[list[int], np.ndarray]] = []
        # the request's output buffer is reused by its next batch: copy it out in the callback
        queue.set_callback(lambda finished, indices: done.append((indices, finished.get_output_tensor(0).data.copy())))
        try:
            for indices, batch in batches:
                queue.start_async({"input_ids": batch["input_ids"].numpy(),
                                   "attention_mask": batch["attention_mask"].numpy()}, indices)
        except BaseException:  # Ctrl-C or a failed batch: let the running jobs finish before the queue goes away
            with contextlib.suppress(Exception):
                queue.wait_all()
            raise
        queue.wait_all()  # re-raises a job's own error
        yield from done

    return Scorer("openvino", precision, pad_token_id, forward, forward_many=forward_many if streams > 1 else None)


def require(module: str):
    """Imports an optional backend library, or fails with one line naming the extra that brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise NewstuneError(f"the {module} backend is not installed: {EXTRA_HINT}") from None


def available(backend: str) -> bool:
    import importlib.util

    module = {"torch": "torch", "onnx": "onnxruntime", "openvino": "openvino"}[backend]
    return importlib.util.find_spec(module) is not None


def model_file(folder: Path, backend: str) -> Path:
    return Path(folder) / ("model.onnx" if backend == "onnx" else "model.xml")


def export_scorer(folder: Path, backend: str, precision: str, pad_token_id: int) -> Scorer:
    """The scorer of one backend export folder (RUN/exports/<backend>-<precision>)."""
    build = {"onnx": onnx_scorer, "openvino": openvino_scorer}[backend]
    return build(model_file(folder, backend), pad_token_id, precision)


def choose_export(exports: list[dict], requested: str) -> dict | None:
    """The export to use for `requested`: the passed one with the best measured speedup over PyTorch.

    auto: among installed backends, only an export faster than PyTorch (speedup > 1); None means PyTorch.
    """
    if requested == "torch":
        return None
    if requested not in ("auto", *BACKENDS):
        raise NewstuneError(f"--backend {requested}: choose auto, torch, onnx or openvino")
    candidates = [e for e in exports if e.get("passed") and (requested == "auto" or e["backend"] == requested)]
    if requested == "auto":
        candidates = [e for e in candidates if available(e["backend"]) and e["speed"]["speedup"] > 1.0]
    elif not candidates:
        raise NewstuneError(f"this run has no {requested} export that passed its accuracy check; "
                            f"make one with: newstune export RUN --backend {requested} [--int8]")
    return max(candidates, key=lambda e: e["speed"]["speedup"], default=None)
