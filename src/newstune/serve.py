"""HTTP inference API: several runs over ONE in-memory copy of each base model, micro-batched requests."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from newstune.evaluate import decide, softmax
from newstune.infer import predict_logits
from newstune.run import load_run, read_metrics

MAX_TEXTS = 64
MAX_CHARS = 5000


@dataclass
class ServedModel:
    name: str
    run_dir: Path
    model: torch.nn.Module
    tokenizer: object
    label_names: list[str]
    threshold: float | None
    precision: str
    max_length: int
    base_model: str

    def classify(self, texts: list[str]) -> list[dict]:
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        logits = predict_logits(self.model, ids, self.tokenizer.pad_token_id, 64, self.precision)
        probs = softmax(logits.numpy().astype(np.float64))
        labels = decide(probs, self.threshold)
        return [{"label": self.label_names[int(label)],
                 "probabilities": {n: round(float(p), 6) for n, p in zip(self.label_names, row)}}
                for label, row in zip(labels, probs)]


def _shared_key(name: str) -> str | None:
    """The base-weight name of a parameter, the same whichever LoRA targets wrap it; None for LoRA/head weights."""
    if any(part in name for part in ("lora_", "modules_to_save", "original_module")):
        return None
    return name.replace("base_model.model.", "").replace(".base_layer", "")


def share_base_weights(model: torch.nn.Module, shared: dict[str, torch.nn.Parameter]) -> int:
    """Point this model's frozen base weights at the tensors already in `shared` (adding new ones). Returns reused."""
    reused = 0
    for module_name, module in model.named_modules():
        for local, param in list(module.named_parameters(recurse=False)):
            key = _shared_key(f"{module_name}.{local}")
            if key is None or param.requires_grad:
                continue
            existing = shared.get(key)
            if existing is not None and existing.shape == param.shape and existing.dtype == param.dtype:
                setattr(module, local, existing)
                reused += 1
            else:
                shared[key] = param
    return reused


def load_served(specs: list[str]) -> dict[str, ServedModel]:
    """Specs are RUN or NAME=RUN. Runs over the same base model share its weights."""
    served: dict[str, ServedModel] = {}
    pools: dict[tuple[str, str], dict[str, torch.nn.Parameter]] = {}
    for spec in specs:
        name, path = spec.split("=", 1) if "=" in spec else (Path(spec).name, spec)
        run = load_run(Path(path))
        run.model.requires_grad_(False)
        frozen = read_metrics(run.run_dir).get("efficiency", {}).get("frozen_weights_dtype", "fp32")
        pool = pools.setdefault((run.config.model.name, frozen), {})
        share_base_weights(run.model, pool)
        served[name] = ServedModel(name, run.run_dir, run.model, run.tokenizer, run.label_names, run.threshold,
                                   run.precision, run.config.data.max_length, run.config.model.name)
    return served


class MicroBatcher:
    """Collects texts from concurrent requests for up to `max_wait_ms`, then runs them as one batch."""

    def __init__(self, model: ServedModel, executor: ThreadPoolExecutor, max_batch: int = 64,
                 max_wait_ms: float = 4.0) -> None:
        self.model = model
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.queue: asyncio.Queue[tuple[list[str], asyncio.Future]] = asyncio.Queue()
        self.task: asyncio.Task | None = None

    async def classify(self, texts: list[str]) -> list[dict]:
        if self.task is None:
            self.task = asyncio.create_task(self._worker())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((texts, future))
        return await future

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pending = [await self.queue.get()]
            deadline = time.perf_counter() + self.max_wait
            while sum(len(t) for t, _ in pending) < self.max_batch:
                timeout = deadline - time.perf_counter()
                if timeout <= 0:
                    break
                try:
                    pending.append(await asyncio.wait_for(self.queue.get(), timeout))
                except TimeoutError:
                    break
            texts = [text for batch, _ in pending for text in batch]
            try:
                results = await loop.run_in_executor(self.executor, self.model.classify, texts)
            except Exception as err:  # noqa: BLE001 -- a failed batch fails its requests, not the server
                for _, future in pending:
                    future.set_exception(err)
                continue
            start = 0
            for batch, future in pending:
                future.set_result(results[start:start + len(batch)])
                start += len(batch)


class ClassifyRequest(BaseModel):
    model: str = Field(description="A served model name (GET /v1/models).")
    texts: list[str] = Field(min_length=1, max_length=MAX_TEXTS, description=f"1-{MAX_TEXTS} texts.")


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    model: str
    results: list[Prediction]


def create_app(served: dict[str, ServedModel], max_wait_ms: float = 4.0) -> FastAPI:
    app = FastAPI(title="newstune", description="News classifiers trained with newstune.", version="1")
    executor = ThreadPoolExecutor(max_workers=1)  # one torch worker: the cores are shared, not split
    batchers = {name: MicroBatcher(model, executor, max_wait_ms=max_wait_ms) for name, model in served.items()}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "models": list(served)}

    @app.get("/v1/models")
    def models() -> list[dict]:
        return [{"name": m.name, "labels": m.label_names, "threshold": m.threshold, "base_model": m.base_model,
                 "run": str(m.run_dir)} for m in served.values()]

    @app.post("/v1/classify", response_model=ClassifyResponse)
    async def classify(request: ClassifyRequest) -> ClassifyResponse:
        if request.model not in served:
            raise HTTPException(404, f"unknown model '{request.model}'; GET /v1/models lists {list(served)}")
        for i, text in enumerate(request.texts):
            if not text.strip():
                raise HTTPException(422, f"texts[{i}] is empty")
            if len(text) > MAX_CHARS:
                raise HTTPException(413, f"texts[{i}] has {len(text)} characters; the limit is {MAX_CHARS}")
        results = await batchers[request.model].classify(request.texts)
        return ClassifyResponse(model=request.model, results=[Prediction(**r) for r in results])

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return (Path(__file__).parent / "page.html").read_text()

    return app


def serve(specs: list[str], host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(create_app(load_served(specs)), host=host, port=port, log_level="info")
