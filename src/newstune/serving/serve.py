"""HTTP inference API: several runs over ONE in-memory copy of each base model, micro-batched requests."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field, StrictFloat, StrictInt, StringConstraints

from newstune.config import CleanConfig, DataConfig
from newstune.data.registry import input_columns, optional_input_columns, record_input_text
from newstune.data.text import model_text, visible_pattern
from newstune.decisions import rule as decisions
from newstune.decisions.ensemble import Ensemble
from newstune.decisions.rule import Decision
from newstune.errors import NewstuneError
from newstune.modeling.backends import Scorer
from newstune.rundir.run import load_run, read_metrics
from newstune.serving.guard import VISIBLE, BodyLimit, Detail, Problems, has_visible, validation_error

MAX_TEXTS = 64
# Most texts one model call takes from the queue. Measured on the AMX Xeon at 32 clients (docs/serving.md): 16 keeps
# 64's throughput (403-414 vs 406-412 requests/s) and beats it with the httpx client (p99 184-196 vs 204-246 ms);
# 8 costs ~6% of the throughput.
MAX_BATCH = 16
MAX_CHARS = 5000
# json.dumps' default writes non-ASCII as \uXXXX: 6 bytes a character, 12 for one outside the BMP (an emoji is a
# surrogate pair, \ud83d\ude00); 64 KiB more covers the JSON around the texts. So the largest valid request fits.
MAX_BODY_BYTES = MAX_TEXTS * MAX_CHARS * 12 + 64 * 1024


@dataclass
class ServedModel:
    name: str
    run_dir: Path
    scorer: Scorer
    tokenizer: object
    label_names: list[str]
    threshold: float | None
    max_length: int
    base_model: str
    clean: CleanConfig = field(default_factory=CleanConfig)
    decision: Decision = field(default_factory=Decision)  # how logits become probabilities and labels
    data: DataConfig | None = None  # the run's data settings: how a record's columns become its text
    ensemble: Ensemble | None = None  # decision.json blends the encoder with the run's TF-IDF model

    def __post_init__(self) -> None:
        if self.decision == Decision() and self.threshold is not None:
            self.decision = Decision(threshold=self.threshold)

    def cleaned(self, text: str) -> str:
        """The text as the run saw its training data (the same rule as `newstune predict`: data.text.model_text)."""
        return model_text(text, self.clean)

    def classify(self, texts: list[str]) -> list[dict]:
        return self.classify_cleaned([self.cleaned(t) for t in texts])

    def classify_cleaned(self, cleaned: list[str]) -> list[dict]:
        """`classify` for texts already through `cleaned` (the service cleans each text once, when it checks it)."""
        ids = self.tokenizer(cleaned, truncation=True, max_length=self.max_length)["input_ids"]
        logits = self.scorer.logits(ids, MAX_TEXTS)
        if self.ensemble is not None:  # the same blend as evaluate and predict (newstune.decisions.ensemble)
            logits = self.ensemble.combine(logits, cleaned)
        probs = decisions.probabilities(logits, self.decision)
        names = decisions.label_names(decisions.labels(probs, self.decision), self.label_names, self.decision)
        key = "labels" if self.decision.multi_label else "label"
        return [{key: name, "probabilities": {n: round(float(p), 6) for n, p in zip(self.label_names, row)}}
                for name, row in zip(names, probs)]


def _shared_key(name: str) -> str | None:
    """The base-weight name of a parameter, the same whichever LoRA targets wrap it; None for LoRA/head weights."""
    if any(part in name for part in ("lora_", "modules_to_save", "original_module")):
        return None
    return name.replace("base_model.model.", "").replace(".base_layer", "")


def share_base_weights(model: torch.nn.Module, shared: dict[str, torch.nn.Parameter]) -> int:
    """Point this model's frozen base weights at the tensors already in `shared` (adding new ones). Returns reused.

    Only a bit-identical tensor is shared: a full fine-tune's encoder, or the trained biases of a `bias: all` LoRA
    run, have the base model's names but their own values, and sharing by name gave such a run another run's
    weights (and its answers)."""
    reused = 0
    for module_name, module in model.named_modules():
        for local, param in list(module.named_parameters(recurse=False)):
            key = _shared_key(f"{module_name}.{local}")
            if key is None or param.requires_grad:
                continue
            existing = shared.get(key)
            if existing is None:
                shared[key] = param
            elif (existing.shape == param.shape and existing.dtype == param.dtype
                  and torch.equal(existing, param)):
                setattr(module, local, existing)
                reused += 1
    return reused


def load_served(specs: list[str], backend: str = "torch") -> dict[str, ServedModel]:
    """Specs are RUN or NAME=RUN. Runs over the same base model share its weights; `backend` as in load_run."""
    served: dict[str, ServedModel] = {}
    pools: dict[tuple[str, str], dict[str, torch.nn.Parameter]] = {}
    for spec in specs:
        name, path = spec.split("=", 1) if "=" in spec else (Path(spec).name, spec)
        run = load_run(Path(path), backend=backend)
        if run.model is not None:  # an export serves without a PyTorch model
            run.model.requires_grad_(False)
            frozen = read_metrics(run.run_dir).get("efficiency", {}).get("frozen_weights_dtype", "fp32")
            share_base_weights(run.model, pools.setdefault((run.config.model.name, frozen), {}))
        served[name] = ServedModel(name, run.run_dir, run.scorer, run.tokenizer, run.label_names, run.threshold,
                                   run.config.data.max_length, run.config.model.name,
                                   run.config.data.clean, run.decision, run.config.data, run.ensemble)
    return served


class Overloaded(Exception):
    """The request queue is full: the client should retry after `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy; retry after {retry_after} s")
        self.retry_after = retry_after


class MicroBatcher:
    """Collects texts from concurrent requests into one batch, then runs it on the executor.

    A batch takes what queued while the last one ran, then waits up to `max_wait_ms` for more -- but only until it
    holds as many requests as the largest of the last few batches: that is how many clients are in flight (when under
    the cap), so waiting longer only adds latency (one client never waits at all; 32 stop waiting once the 32nd
    arrives).
    A batch holds at most `max_batch` texts, or one request alone when it has more (a request is never split: one
    that does not fit opens the next batch, so requests keep their order); a request whose client left takes no
    place. At most `max_queue` requests wait; one more is refused (Overloaded) instead of piling up latency.
    """

    def __init__(self, model: ServedModel, executor: ThreadPoolExecutor, max_batch: int = MAX_BATCH,
                 max_wait_ms: float = 4.0, max_queue: int = 256) -> None:
        self.model = model
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.queue: asyncio.Queue[tuple[list[str], asyncio.Future]] = asyncio.Queue(max_queue)
        self.task: asyncio.Task | None = None
        self.recent_sizes: deque[int] = deque([1], maxlen=8)  # requests per batch, the last 8 batches

    async def classify(self, texts: list[str]) -> list[dict]:
        loop = asyncio.get_running_loop()
        if self.task is None or self.task.done() or self.task.get_loop() is not loop:
            # A worker and its queue belong to one event loop; each test client (or server) may bring its own.
            self.queue = asyncio.Queue(self.max_queue)
            self.task = loop.create_task(self._worker(self.queue))
        future = loop.create_future()
        try:
            self.queue.put_nowait((texts, future))
        except asyncio.QueueFull:
            raise Overloaded(retry_after=1) from None
        return await future

    async def _worker(self, queue: asyncio.Queue[tuple[list[str], asyncio.Future]]) -> None:
        carried: tuple[list[str], asyncio.Future] | None = None  # did not fit the last batch: it opens this one
        pending: list[tuple[list[str], asyncio.Future]] = []
        try:
            while True:
                first = carried if carried is not None else await queue.get()
                carried = None
                if first[1].done():  # its client left: it takes no place in a batch
                    continue
                pending, size = [first], len(first[0])
                deadline = time.perf_counter() + self.max_wait
                while size < self.max_batch:
                    if not queue.empty():  # what queued while the last batch ran joins this one without waiting
                        request = queue.get_nowait()
                    else:
                        timeout = deadline - time.perf_counter()
                        if timeout <= 0 or len(pending) >= max(self.recent_sizes):
                            break
                        try:
                            request = await asyncio.wait_for(queue.get(), timeout)
                        except TimeoutError:
                            break
                    if request[1].done():
                        continue
                    if size + len(request[0]) > self.max_batch:
                        carried = request
                        break
                    pending.append(request)
                    size += len(request[0])
                self.recent_sizes.append(len(pending))
                await self._run(pending)
        finally:  # the worker stopped (its event loop closing, or a bug): no request may wait for it forever
            waiting = [*pending, *([carried] if carried is not None else [])]
            while not queue.empty():
                waiting.append(queue.get_nowait())
            for _, future in waiting:
                _settle(future, error=RuntimeError("the batch worker stopped; send the request again"))

    async def _run(self, pending: list[tuple[list[str], asyncio.Future]]) -> None:
        texts = [text for batch, _ in pending for text in batch]
        try:
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(self.executor, self.model.classify_cleaned, texts)
        except Exception as err:  # noqa: BLE001 -- a failed batch fails its requests, not the server
            if len(pending) == 1:
                _settle(pending[0][1], error=err)
                return
            for request in pending:  # one request's text must not fail the others batched with it
                await self._run([request])
            return
        start = 0
        for batch, future in pending:
            _settle(future, results[start:start + len(batch)])
            start += len(batch)


def _settle(future: asyncio.Future, result: list[dict] | None = None, error: Exception | None = None) -> None:
    if future.done():  # its request was cancelled (the client left)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


# The length constraint makes pydantic check the text is valid Unicode: a lone surrogate is a 422 (string_unicode).
NewsText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_CHARS),
                     Field(description=f"1-{MAX_CHARS} characters of valid Unicode (no lone surrogates) with "
                                       f"{VISIBLE}, else 422. The run's own cleaning (HTML tags, entities) applies; "
                                       "a text it would empty is read as given.",
                           json_schema_extra=lambda schema: schema.update(format="visible-text",
                                                                           pattern=visible_pattern()))]


class ClassifyRequest(BaseModel):
    model: str = Field(description="A served model name (GET /v1/models); another name is 404.")
    texts: list[NewsText] = Field(min_length=1, max_length=MAX_TEXTS, description=f"1-{MAX_TEXTS} texts.")


RecordValue = Annotated[str, StringConstraints(max_length=MAX_CHARS)] | StrictInt | StrictFloat  # true is no count


class ClassifyRecordsRequest(BaseModel):
    model: str = Field(description="A served model name (GET /v1/models); another name is 404.")
    records: list[dict[str, RecordValue]] = Field(
        min_length=1, max_length=MAX_TEXTS, description=f"1-{MAX_TEXTS} rows with the run's input columns "
        "(GET /v1/models: `columns`), built into text as training built it -- LIAR: statement, speaker, ... and "
        "the speaker's five credit counts as they stand. A missing column or a bad value is 422.")


class Prediction(BaseModel):
    label: str | None = Field(None, description="The predicted class (single-label models).")
    labels: list[str] | None = Field(None, description="Multi-label models: every label that applies (maybe none).")
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    model: str
    results: list[Prediction]


class ServedInfo(BaseModel):
    name: str
    labels: list[str]
    threshold: float | None
    multi_label: bool = Field(False, description="Results carry `labels` (a set) instead of one `label`.")
    base_model: str = Field(description="A hub id, or the folder name of a local model (never its path).")
    run: str = Field(description="The run's folder name (never its path on the server).")
    backend: str = Field(description="What computes the logits: torch-bf16, torch-fp32, onnx-int8, openvino-int8, ...")
    columns: list[str] = Field(description="The columns a /v1/classify-records row needs.")
    optional_columns: list[str] = Field(default_factory=list, description="Columns training also wrote into the "
                                        "text (LIAR metadata): give them for predictions made as training saw rows.")


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Detail, "description": "The body is not UTF-8 text (FastAPI cannot read it as JSON)."},
    404: {"model": Detail, "description": "Unknown model."},
    413: {"model": Detail, "description": f"Request body over {MAX_BODY_BYTES} bytes."},
    422: {"model": Problems, "description": "Invalid request: where (loc), what (msg) and its kind (type)."},
    503: {"model": Detail, "description": "Too many requests queued; retry after the Retry-After header's seconds."},
}


def public_name(name: str) -> str:
    """A hub id as it is; a local path as its last part, so no response shows the server's folders."""
    return Path(name).name if Path(name).is_absolute() else name


def create_app(served: dict[str, ServedModel], max_wait_ms: float = 4.0, max_queue: int = 256,
               max_body_bytes: int = MAX_BODY_BYTES, max_batch: int = MAX_BATCH) -> FastAPI:
    # FastAPIOffline: /docs and /redoc load their JS/CSS from this server, not a CDN (they work offline)
    app = FastAPIOffline(title="newstune", description="News classifiers trained with newstune.", version="1")
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_exception_handler(RequestValidationError, validation_error)
    columns = {name: input_columns(m.data) if m.data else ["text"] for name, m in served.items()}
    _name_models_in_schema(app, columns)
    executor = ThreadPoolExecutor(max_workers=1)  # one torch worker: the cores are shared, not split
    batchers = {name: MicroBatcher(model, executor, max_batch, max_wait_ms, max_queue)
                for name, model in served.items()}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "models": list(served)}

    @app.get("/v1/models")
    def models() -> list[ServedInfo]:
        return [ServedInfo(name=m.name, labels=m.label_names, threshold=m.threshold, multi_label=m.decision.multi_label,
                           base_model=public_name(m.base_model), run=m.run_dir.name, backend=m.scorer.name,
                           columns=columns[name],
                           optional_columns=optional_input_columns(m.data) if m.data else [])
                for name, m in served.items()]

    @app.post("/v1/classify", response_model=ClassifyResponse, response_model_exclude_none=True, responses=ERRORS)
    async def classify(request: ClassifyRequest) -> ClassifyResponse:
        model = served.get(request.model)
        if model is None:
            raise HTTPException(404, f"unknown model; GET /v1/models lists {list(served)}")
        return await answer(request.model, model, request.texts, "texts")

    @app.post("/v1/classify-records", response_model=ClassifyResponse, response_model_exclude_none=True,
              responses=ERRORS)
    async def classify_records(request: ClassifyRecordsRequest) -> ClassifyResponse:
        model = served.get(request.model)
        if model is None:
            raise HTTPException(404, f"unknown model; GET /v1/models lists {list(served)}")
        texts, problems = [], []
        for i, record in enumerate(request.records):
            if "text" in record and not isinstance(record["text"], str):  # the schema's `text` is a text, not a number
                problems.append({"loc": ("body", "records", i, "text"), "type": "string_type",
                                 "msg": "column 'text' must be a string"})
                continue
            try:
                texts.append(record_input_text(record, model.data) if model.data else str(record["text"]))
            except (NewstuneError, KeyError) as err:
                problems.append({"loc": ("body", "records", i), "type": "bad_record",
                                 "msg": str(err) if isinstance(err, NewstuneError) else "missing column(s) ['text']"})
        if problems:
            raise RequestValidationError(problems)
        return await answer(request.model, model, texts, "records")

    async def answer(name: str, model: ServedModel, texts: list[str], field: str) -> ClassifyResponse:
        cleaned = [model.cleaned(text) for text in texts]  # once: the check and the model read the same text
        empty = [i for i, text in enumerate(cleaned) if not has_visible(text)]
        if empty:
            raise RequestValidationError([{"loc": ("body", field, i), "type": "empty_text",
                                           "msg": f"text is empty: it has no {VISIBLE}"}
                                          for i in empty])
        try:
            results = await batchers[name].classify(cleaned)
        except Overloaded as busy:
            raise HTTPException(503, str(busy), headers={"Retry-After": str(busy.retry_after)}) from None
        return ClassifyResponse(model=name, results=[Prediction(**r) for r in results])

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return (Path(__file__).parent / "page.html").read_text()

    return app


def _name_models_in_schema(app: FastAPI, columns: dict[str, list[str]]) -> None:
    """The schema lists this server's model names, so clients (and Swagger's 'Try it out') can pick one, and marks
    the record columns every served model needs as required (a record without them is invalid by the schema, not
    only by the service); a `text` column there has the constraints of a text."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        components = schema["components"]["schemas"]
        if columns:
            for request in ("ClassifyRequest", "ClassifyRecordsRequest"):
                components[request]["properties"]["model"]["enum"] = list(columns)
            common = sorted(set.intersection(*(set(needed) for needed in columns.values())))
            items = components["ClassifyRecordsRequest"]["properties"]["records"]["items"]
            if common:
                items["required"] = common
            if "text" in common:
                items.setdefault("properties", {})["text"] = components["ClassifyRequest"]["properties"]["texts"][
                    "items"]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


WORKER_OPTIONS = "NEWSTUNE_SERVE_OPTIONS"


def freeze_loaded_objects() -> None:
    """Put everything loaded so far (torch, transformers, the models, the app: ~550,000 tracked objects for one
    MiniLM run) out of the garbage collector's reach. Under load a full collection walked all of it every ~10 s for
    ~250 ms, stalling every request in flight (p99 at 32 clients up to 305 ms instead of ~130, AMX Xeon); requests'
    own garbage is still collected, and frozen objects are still freed when their last reference goes."""
    gc.collect()
    gc.freeze()


def app_from_env() -> FastAPI:
    """The app of one `serve --workers N` process: its own copy of the models and its share of the cores."""
    options = json.loads(os.environ[WORKER_OPTIONS])
    torch.set_num_threads(options["threads"])
    served = load_served(options["specs"], options["backend"])
    app = create_app(served, options["max_wait_ms"], options["max_queue"], max_batch=options["max_batch"])
    freeze_loaded_objects()
    return app


def serve(specs: list[str], host: str, port: int, backend: str = "auto", quiet: bool = False,
          max_wait_ms: float = 4.0, max_queue: int = 256, workers: int = 1, max_batch: int = MAX_BATCH) -> None:
    import uvicorn

    if workers < 1:
        raise NewstuneError(f"--workers {workers}: give 1 or more server processes")
    if not 1 <= max_batch <= MAX_TEXTS:
        raise NewstuneError(f"--max-batch {max_batch}: give 1 to {MAX_TEXTS} texts per batch")
    torch.set_num_threads(max(1, torch.get_num_threads() // workers))
    served = load_served(specs, backend)  # in this process first: a bad spec fails here, once, with one line
    for model in served.values():
        print(f"{model.name}: backend {model.scorer.name}, {workers} worker(s) x {torch.get_num_threads()} "
              "thread(s)", flush=True)
    logging = {"host": host, "port": port, "log_level": "warning" if quiet else "info", "access_log": not quiet}
    if workers == 1:
        app = create_app(served, max_wait_ms, max_queue, max_batch=max_batch)
        freeze_loaded_objects()
        uvicorn.run(app, **logging)
        return
    del served
    os.environ[WORKER_OPTIONS] = json.dumps({"specs": specs, "backend": backend, "threads": torch.get_num_threads(),
                                             "max_wait_ms": max_wait_ms, "max_queue": max_queue,
                                             "max_batch": max_batch})
    uvicorn.run("newstune.serving.serve:app_from_env", factory=True, workers=workers, **logging)
