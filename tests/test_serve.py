"""The HTTP service's edge and failure handling (over an untrained tiny classifier), and serve agreeing with predict."""

import asyncio
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from newstune.data.text import clean_text
from newstune.inference.predict import predict_file
from newstune.modeling.infer import predict_logits
from newstune.rundir.run import load_run
from newstune.serving.serve import MAX_BODY_BYTES, MAX_CHARS, MAX_TEXTS, MicroBatcher, create_app, load_served

from .conftest import make_served
from .test_use import runs  # noqa: F401 -- the module fixture with two trained tiny runs

LABELS = ["sports", "business", "science"]
SECRET = "SECRET-PAYLOAD-"


@pytest.fixture
def app(tiny_models):
    return create_app({"topics": make_served(tiny_models["bert"], LABELS)}, max_wait_ms=100)


def post_json(client: TestClient, body: object) -> httpx.Response:
    """json.dumps keeps what httpx's own encoder refuses (lone surrogates, as \\ud800)."""
    return client.post("/v1/classify", content=json.dumps(body), headers={"content-type": "application/json"})


def test_models_show_names_not_server_paths(tiny_models, tmp_path):
    run_dir = tmp_path / "runs" / "topics-2026"
    app = create_app({"topics": make_served(tiny_models["bert"], LABELS, run_dir=run_dir)})
    with TestClient(app) as client:
        response = client.get("/v1/models")
    assert response.json() == [{"name": "topics", "labels": LABELS, "threshold": None, "multi_label": False,
                                "columns": ["text"], "optional_columns": [], "base_model": "bert", "run": "topics-2026",
                                "backend": "torch-fp32"}]
    assert str(tmp_path) not in response.text and str(tiny_models["bert"]) not in response.text


async def _post_stream(app, headers: dict[str, str]) -> tuple[httpx.Response, int]:
    """POST a 100 MB body in 64 KiB chunks; returns the response and how many bytes the app pulled."""
    sent = 0

    async def body():
        nonlocal sent
        chunk = b"x" * 65536
        for _ in range(100 * 1024 * 1024 // len(chunk)):
            sent += len(chunk)
            yield chunk

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/v1/classify", content=body(), headers=headers)
    return response, sent


@pytest.mark.parametrize("headers", [{}, {"content-length": str(100 * 1024 * 1024)}], ids=["chunked", "declared"])
def test_a_100_mb_body_gets_413_without_being_read(app, headers):
    response, sent = asyncio.run(_post_stream(app, {"content-type": "application/json", **headers}))
    assert response.status_code == 413
    assert "limit" in response.json()["detail"] and len(response.content) < 200
    assert sent <= (MAX_BODY_BYTES + 65536 if not headers else 0)


@pytest.mark.parametrize("char", ["é", "\U0001F600"], ids=["bmp-6-bytes", "emoji-12-bytes"])
def test_the_largest_valid_request_fits_under_the_body_cap(app, char):
    """Fails if the body cap is sized for 6-byte escapes only: 64 texts of 5,000 emoji (schema-valid) got 413."""
    body = {"model": "topics", "texts": [char * MAX_CHARS] * MAX_TEXTS}
    assert len(json.dumps(body)) > MAX_TEXTS * MAX_CHARS * (6 if char == "é" else 12)
    with TestClient(app) as client:
        assert post_json(client, body).status_code == 200


@pytest.mark.parametrize("body", [
    {"model": "topics", "texts": SECRET * 100_000},
    {"model": "topics", "texts": ["ok", SECRET * 1000]},
    {"model": SECRET * 1000, "texts": ["ok"]},
], ids=["texts-not-a-list", "text-too-long", "unknown-model"])
def test_errors_never_echo_the_request(app, body):
    with TestClient(app) as client:
        response = post_json(client, body)
    assert response.status_code in (404, 422) and SECRET not in response.text


@pytest.mark.parametrize("text, kind", [
    ("\ud800 lone surrogate", "string_unicode"),
    (" \t\u200b\u00a0\u2028\u0000", "empty_text"),
    ("", "string_too_short"),
    ("x" * (MAX_CHARS + 1), "string_too_long"),
])
def test_a_bad_text_is_a_422_with_a_list_of_problems(app, text, kind):
    with TestClient(app) as client:
        response = post_json(client, {"model": "topics", "texts": ["goal match", text]})
    assert response.status_code == 422
    assert response.json() == {"detail": [{"loc": ["body", "texts", 1], "msg": response.json()["detail"][0]["msg"],
                                           "type": kind}]}


def predicted_and_served(run_dir: Path, text: str, tmp_path: Path) -> tuple[dict, httpx.Response]:
    """One text through `predict_file` (its output row) and through the service (its response)."""
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"text": text}) + "\n")
    predict_file(load_run(run_dir), source, tmp_path / "out.jsonl")
    with TestClient(create_app(load_served([f"topics={run_dir}"]))) as client:
        response = client.post("/v1/classify", json={"model": "topics", "texts": [text]})
    return json.loads((tmp_path / "out.jsonl").read_text()), response


def test_a_text_that_only_the_cleaning_empties_is_read_as_given_by_serve_and_predict(runs, tmp_path):  # noqa: F811
    # Schema-valid (it has visible characters), so the service must label it, and predict must agree: fails if
    # either refuses it (the old 422 / row error) or if they read it differently.
    predicted, response = predicted_and_served(runs["topics"], "<b> </b>&nbsp;", tmp_path)
    assert not predicted["error"] and predicted["predicted_label"]
    assert response.status_code == 200
    assert response.json()["results"][0]["probabilities"] == predicted["probabilities"]


def test_a_bad_request_among_concurrent_ones_fails_only_itself(app, tiny_models):
    """One request with a text the edge rejects, one whose text makes the model raise, 20 good ones, batched."""
    served = make_served(tiny_models["bert"], LABELS)
    calls = []
    original = served.classify_cleaned

    def classify_cleaned(texts):
        calls.append(len(texts))
        if "poison" in texts:
            raise TypeError("the tokenizer choked")
        return original(texts)

    served.classify_cleaned = classify_cleaned
    app = create_app({"topics": served}, max_wait_ms=200, max_batch=MAX_TEXTS)

    async def burst():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            texts = [[f"goal match {i}"] for i in range(10)] + [["\ud800"], ["poison"]] + \
                    [[f"stock market {i}"] for i in range(10)]
            return await asyncio.gather(*(client.post("/v1/classify", content=json.dumps(
                {"model": "topics", "texts": t}), headers={"content-type": "application/json"}) for t in texts))

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 10 + [422, 500] + [200] * 10
    assert calls[0] == 21  # the good ones and the poisoned one were one batch, then re-run one by one


class FlakyModel:
    """classify_cleaned() raises whenever a batch holds the text 'poison'."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def classify_cleaned(self, texts: list[str]) -> list[dict]:
        self.calls.append(texts)
        if "poison" in texts:
            raise TypeError("bad text")
        return [{"label": text} for text in texts]


def test_the_batcher_isolates_a_failing_request():
    model = FlakyModel()
    batcher = MicroBatcher(model, ThreadPoolExecutor(max_workers=1), max_wait_ms=200)

    async def burst():
        return await asyncio.gather(batcher.classify(["a", "b"]), batcher.classify(["poison"]),
                                    batcher.classify(["c"]), return_exceptions=True)

    first, poisoned, last = asyncio.run(burst())
    assert first == [{"label": "a"}, {"label": "b"}] and last == [{"label": "c"}]
    assert isinstance(poisoned, TypeError)
    assert model.calls[0] == ["a", "b", "poison", "c"]


def test_a_batch_holds_at_most_max_batch_texts_and_requests_keep_their_order():
    # fails if the cap is ignored (one batch of all five texts), or a request that does not fit is split, dropped
    # (the burst never finishes) or answered out of order
    model = FlakyModel()
    batcher = MicroBatcher(model, ThreadPoolExecutor(max_workers=1), max_batch=3, max_wait_ms=200)

    async def burst():
        requests = (batcher.classify(texts) for texts in (["a"], ["b"], ["c", "d"], ["e"]))
        return await asyncio.wait_for(asyncio.gather(*requests), timeout=10)

    answers = asyncio.run(burst())
    assert answers == [[{"label": "a"}], [{"label": "b"}], [{"label": "c"}, {"label": "d"}], [{"label": "e"}]]
    assert model.calls == [["a", "b"], ["c", "d", "e"]]


def test_a_request_whose_client_left_takes_no_place_in_a_batch():
    # fails if a cancelled request still fills a slot of the capped batch (then "c" would wait for the next one)
    model = FlakyModel()
    batcher = MicroBatcher(model, ThreadPoolExecutor(max_workers=1), max_batch=2, max_wait_ms=200)
    batcher.recent_sizes.append(2)  # two clients were in flight lately: a batch waits for a second request

    async def burst():
        first = asyncio.ensure_future(batcher.classify(["a"]))
        left = asyncio.ensure_future(batcher.classify(["b"]))
        await asyncio.sleep(0)  # both are queued
        left.cancel()
        return await asyncio.wait_for(asyncio.gather(first, batcher.classify(["c"])), timeout=10)

    assert asyncio.run(burst()) == [[{"label": "a"}], [{"label": "c"}]]
    assert model.calls == [["a", "c"]]


def test_requests_waiting_for_a_stopped_worker_are_failed_not_left_hanging():
    # fails if queued (or carried-over) requests wait forever once the batch worker is gone
    class Slow(FlakyModel):
        def classify_cleaned(self, texts: list[str]) -> list[dict]:
            time.sleep(0.3)
            return super().classify_cleaned(texts)

    batcher = MicroBatcher(Slow(), ThreadPoolExecutor(max_workers=1), max_batch=1, max_wait_ms=0)

    async def burst():
        requests = [asyncio.ensure_future(batcher.classify([t])) for t in "abc"]
        await asyncio.sleep(0.1)  # "a" runs, "b" is carried or queued, "c" queued
        batcher.task.cancel()
        return await asyncio.wait_for(asyncio.gather(*requests, return_exceptions=True), timeout=10)

    answers = asyncio.run(burst())
    assert all(isinstance(a, (RuntimeError, asyncio.CancelledError)) for a in answers)
    assert sum(isinstance(a, RuntimeError) for a in answers) >= 2


@pytest.mark.parametrize("max_batch", [0, MAX_TEXTS + 1])
def test_serve_refuses_a_batch_size_out_of_range_before_loading(max_batch, tmp_path):
    # fails if the bound is not checked (or only after loading the runs: the missing run would be named instead)
    from newstune.errors import NewstuneError
    from newstune.serving.serve import serve

    with pytest.raises(NewstuneError, match=f"--max-batch {max_batch}: give 1 to {MAX_TEXTS}"):
        serve([str(tmp_path / "no-such-run")], "127.0.0.1", 0, max_batch=max_batch)


def test_serve_freezes_what_it_loaded_before_it_answers(runs, monkeypatch):  # noqa: F811
    # fails if the loaded models stay in the collector's reach: then a full collection walks them all under load
    import gc

    import uvicorn

    from newstune.serving.serve import serve

    frozen = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: frozen.append(gc.get_freeze_count()))
    try:
        serve([f"topics={runs['topics']}"], "127.0.0.1", 0, backend="torch", quiet=True)
    finally:
        gc.unfreeze()
    assert frozen and frozen[0] > 10_000


def test_docs_load_nothing_from_outside(app):
    with TestClient(app) as client:
        for page in ("/docs", "/redoc"):
            html = client.get(page).text
            assert not re.search(r"https?://", html), page
            assets = re.findall(r"""(?:src|href|url)\s*[=:]\s*["']([^"']+)["']""", html)
            assert any(a.endswith(".js") for a in assets), page
            for asset in assets:
                assert client.get(asset).status_code == 200, asset


def test_serve_cleans_texts_as_predict_does(runs, tmp_path):  # noqa: F811
    text = "Goal <b>match</b> for the team#39;s coach &amp; league"
    run = load_run(runs["topics"])
    row, response = predicted_and_served(runs["topics"], text, tmp_path)
    predicted = row["probabilities"]
    assert response.json()["results"][0]["probabilities"] == predicted
    # the cleaning matters for this text: its raw form gives other logits (compared before a softmax that a
    # confident model saturates to 0 and 1)
    cleaned = clean_text(text, run.config.data.clean)
    raw, clean = (predict_logits(run.model, run.tokenizer([t])["input_ids"], 0, precision=run.precision).numpy()
                  for t in (text, cleaned))
    assert cleaned != text and abs(raw - clean).max() > 1e-3


def test_the_service_cleans_each_text_once(runs, monkeypatch):  # noqa: F811
    # fails if the emptiness check and the model each clean the text (twice the cleaning work per request)
    import newstune.serving.serve as serve_module

    calls = []
    original = serve_module.model_text
    monkeypatch.setattr(serve_module, "model_text", lambda text, clean: calls.append(text) or original(text, clean))
    texts = ["Goal <b>match</b>", "stocks &amp; bonds", "rain again"]
    with TestClient(create_app(load_served([f"topics={runs['topics']}"]))) as client:
        response = client.post("/v1/classify", json={"model": "topics", "texts": texts})
    assert response.status_code == 200 and len(response.json()["results"]) == 3
    assert calls == texts


def test_records_are_built_into_text_as_training_built_them(tiny_models):
    from newstune.config import DataConfig

    served = make_served(tiny_models["bert"], ["fake", "true"], name="liar")
    served.data = DataConfig(name="liar", credit_history="train_record", metadata_fields=["speaker"])
    counts = {"barely_true_count": 1, "false_count": 2, "half_true_count": 3, "mostly_true_count": 4,
              "pants_fire_count": 5}
    record = {"statement": "Taxes went up.", "speaker": "jane-doe", **counts}
    text = ("Taxes went up. Speaker: jane doe. History (15 rated): barely true 1 (7%), false 2 (13%), "
            "half true 3 (20%), mostly true 4 (27%), pants fire 5 (33%).")
    with TestClient(create_app({"liar": served})) as client:
        info = client.get("/v1/models").json()[0]
        assert info["columns"] == ["statement", *counts] and info["optional_columns"] == ["speaker"]
        by_record = client.post("/v1/classify-records", json={"model": "liar", "records": [record]})
        by_text = client.post("/v1/classify", json={"model": "liar", "texts": [text]})
        assert by_record.status_code == 200 and by_record.json() == by_text.json()
        missing = client.post("/v1/classify-records", json={"model": "liar", "records": [
            record, {"statement": "x", "speaker": "y"}]})
        assert missing.status_code == 422
        assert missing.json()["detail"][0]["loc"] == ["body", "records", 1]
        assert "missing column(s) ['barely_true_count'" in missing.json()["detail"][0]["msg"]
        bad = client.post("/v1/classify-records", json={"model": "liar", "records": [{**record, "false_count": -3}]})
        assert bad.status_code == 422 and "not a whole number" in bad.json()["detail"][0]["msg"]


@pytest.mark.parametrize("kind", [{"lora.method": "full", "train.lr": 1e-3},
                                  {"lora.method": "lora", "lora.bias": "all", "lora.r": 2}],
                         ids=["full", "lora-bias-all"])
def test_served_runs_keep_their_own_weights(tiny_models, tiny_data, tmp_path, kind):
    """Two runs of one base model (full fine-tunes, or LoRA with trained biases), the second trained on rotated
    labels, served together: each must answer as its own predict does, labels and probabilities. Fails when frozen
    tensors are shared by name (the second run then answers with the first one's encoder or biases)."""
    from newstune.config import validate
    from newstune.training.train import train

    from .conftest import synthetic_rows, tiny_config, write_csv

    rotated = tmp_path / "rotated"
    rotated.mkdir()
    names = ["business", "science", "sports"]
    for name, seed in (("train.csv", 1), ("valid.csv", 2), ("test.csv", 3)):
        write_csv(rotated / name, [(t, names[(names.index(label) + 1) % 3]) for t, label in synthetic_rows(480, seed)])
    settings = {**kind, "eval.baseline": False}
    first, _ = train(validate(tiny_config(tiny_models["bert"], tiny_data, **settings)), tmp_path / "first")
    second, _ = train(validate(tiny_config(tiny_models["bert"], rotated, **settings)), tmp_path / "second")
    texts = [text for text, _ in synthetic_rows(12, 5)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    own = {}
    for name, run_dir in (("first", first), ("second", second)):
        predict_file(load_run(run_dir), source, tmp_path / f"{name}.jsonl")
        lines = (tmp_path / f"{name}.jsonl").read_text().splitlines()
        own[name] = [json.loads(line) for line in lines]
    assert [r["predicted_label"] for r in own["first"]] != [r["predicted_label"] for r in own["second"]]
    with TestClient(create_app(load_served([f"first={first}", f"second={second}"]))) as client:
        for name in ("first", "second"):
            served = client.post("/v1/classify", json={"model": name, "texts": texts}).json()["results"]
            assert [r["label"] for r in served] == [r["predicted_label"] for r in own[name]]
            for answer, row in zip(served, own[name], strict=True):
                for label, probability in answer["probabilities"].items():
                    assert probability == pytest.approx(row["probabilities"][label], abs=2e-3), (name, label)
