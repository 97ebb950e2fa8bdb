"""Using a trained run: batch prediction, merged export, the multi-model HTTP service."""

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForSequenceClassification

from newstune.config import validate
from newstune.decisions import rule as decisions
from newstune.errors import NewstuneError
from newstune.inference.export import export_merged
from newstune.inference.predict import predict_file
from newstune.modeling.infer import predict_logits
from newstune.rundir.run import load_run
from newstune.serving.serve import MAX_CHARS, MAX_TEXTS, create_app, load_served
from newstune.training.train import train

from .conftest import synthetic_rows, tiny_config, write_csv


@pytest.fixture(scope="module")
def runs(tiny_models, tiny_data, tmp_path_factory):
    """A 3-class topic run and a binary run over the same tiny base model."""
    root = tmp_path_factory.mktemp("runs")
    topic_dir, _ = train(validate(tiny_config(tiny_models["bert"], tiny_data, **{"train.precision": "bf16"})),
                         root / "topics")
    binary_data = root / "binary_data"
    binary_data.mkdir()
    for name, seed in (("train.csv", 1), ("valid.csv", 2), ("test.csv", 3)):
        write_csv(binary_data / name, [r for r in synthetic_rows(300, seed) if r[1] != "science"])
    binary_dir, _ = train(validate(tiny_config(tiny_models["bert"], binary_data, **{"train.precision": "bf16",
                                                                                     "lora.r": 2})),
                          root / "binary")
    return {"topics": topic_dir, "binary": binary_dir}


def test_predict_file_streams_and_reports_bad_rows(runs, tmp_path, monkeypatch):
    import newstune.inference.predict

    monkeypatch.setattr(newstune.inference.predict, "CHUNK_ROWS", 7)
    lines = [json.dumps({"text": text, "id": i}) for i, (text, _) in enumerate(synthetic_rows(20, 9))]
    lines.insert(3, "{not json")
    lines.insert(8, json.dumps({"text": "   "}))
    lines.insert(12, json.dumps({"headline": "no text column"}))
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    counts = predict_file(load_run(runs["topics"]), source, tmp_path / "out.jsonl")
    assert counts == {"rows": 23, "predicted": 20, "errors": 3}
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["line"] for o in out if o["error"]] == [4, 9, 13]
    assert "invalid JSON" in out[3]["error"] and out[8]["error"] == "empty text"
    good = [o for o in out if not o["error"]]
    assert all(abs(sum(o["probabilities"].values()) - 1) < 1e-4 for o in good)
    assert [o["id"] for o in good] == list(range(20))


def test_predict_csv_applies_the_binary_threshold(runs, tmp_path):
    run = load_run(runs["binary"])
    source = write_csv(tmp_path / "in.csv", synthetic_rows(12, 5))
    predict_file(run, source, tmp_path / "out.csv")
    import pandas as pd

    out = pd.read_csv(tmp_path / "out.csv")
    names = run.label_names
    expected = np.where(out[f"prob_{names[1]}"] >= run.threshold, names[1], names[0])
    assert list(out["predicted_label"]) == list(expected)
    with pytest.raises(NewstuneError, match="already exists"):
        predict_file(run, source, tmp_path / "out.csv")


@pytest.mark.parametrize("name, content, message", [
    ("in.csv", b"", r"in.csv: the file is empty"),  # was a pandas EmptyDataError traceback
    ("in.csv", b"text\n", r"in.csv: no data rows; add rows below the header line"),  # was a 0-byte output
    ("in.jsonl", b"\n", r"in.jsonl: no data rows; add one JSON object per line"),
    ("in.csv.gz", b"text\ngoal\n", r"in.csv.gz: not gzip data"),
    ("in.csv", b"text\ngoal match\n\xff\n", r"in.csv:3: not UTF-8 text"),
    ("in.csv", None, r"input file not found"),  # raised only after creating an empty output
    ("in.csv", "folder", r"in.csv is a folder, not a file"),
], ids=["0-byte", "header-only", "blank-jsonl", "not-gzip", "not-utf8", "missing", "folder"])
def test_bad_predict_input_leaves_no_output_and_a_retry_succeeds(runs, tmp_path, name, content, message):
    source = tmp_path / name
    if content == "folder":
        source.mkdir()
    elif content is not None:
        source.write_bytes(content)
    output = tmp_path / "out" / "pred.csv"
    output.parent.mkdir()
    run = load_run(runs["topics"])
    with pytest.raises(NewstuneError, match=message):
        predict_file(run, source, output)
    assert list(output.parent.iterdir()) == []
    good = write_csv(tmp_path / "good.csv", synthetic_rows(5, 4))
    assert predict_file(run, good, output)["predicted"] == 5


def test_predict_into_a_missing_folder_is_refused_before_work(runs, tmp_path):
    good = write_csv(tmp_path / "good.csv", synthetic_rows(5, 4))
    with pytest.raises(NewstuneError, match=r"output folder .*nope does not exist; create it"):  # FileNotFoundError
        predict_file(load_run(runs["topics"]), good, tmp_path / "nope" / "pred.csv")
    assert not (tmp_path / "nope").exists()


def test_predict_failing_midway_leaves_no_partial_output(runs, tmp_path, monkeypatch):
    import newstune.inference.predict

    real = newstune.inference.predict.probabilities
    calls = []

    def fails_on_the_second_chunk(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(*args)

    monkeypatch.setattr(newstune.inference.predict, "CHUNK_ROWS", 4)
    monkeypatch.setattr(newstune.inference.predict, "probabilities", fails_on_the_second_chunk)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text, _ in synthetic_rows(10, 6)))
    (tmp_path / "out").mkdir()
    with pytest.raises(RuntimeError, match="out of memory"):
        predict_file(load_run(runs["topics"]), source, tmp_path / "out" / "pred.jsonl")
    assert list((tmp_path / "out").iterdir()) == []  # the first chunk's rows were written to a partial file


def test_merged_export_loads_without_peft_and_agrees(runs, tmp_path):
    checks = export_merged(runs["topics"], tmp_path / "merged")
    assert checks["merged"]["same_argmax"] and checks["merged"]["max_abs_logit_diff"] < 1e-4
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in plain.named_parameters())
    run = load_run(runs["topics"], as_trained=False)
    ids = run.tokenizer(["goal match team", "stock market profit bank"])["input_ids"]
    assert torch.allclose(predict_logits(plain, ids, 0), predict_logits(run.model, ids, 0), atol=1e-4)
    assert plain.config.id2label[0] == run.label_names[0]


def test_export_cli_exits_2_with_one_line_when_a_check_fails(runs, tmp_path, monkeypatch, capsys):
    import sys

    import newstune.inference.export
    from newstune.cli import main

    real = newstune.inference.export.predict_logits
    calls = []

    def merged_disagrees(*args, **kwargs):
        calls.append(1)
        logits = real(*args, **kwargs)
        return torch.roll(logits, 1, dims=1) if len(calls) == 2 else logits  # the 2nd call scores the merged model

    monkeypatch.setattr(newstune.inference.export, "predict_logits", merged_disagrees)
    monkeypatch.setattr(sys, "argv", ["newstune", "export", str(runs["topics"]), "--merged", str(tmp_path / "m")])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: export check failed: 'merged' predicts another class")
    assert last.endswith("(--force keeps the export anyway)")
    assert not (tmp_path / "m").exists()  # the old merged check raised after writing the folder


def test_service_shares_one_base_and_switches_adapters(runs):
    served = load_served([f"topics={runs['topics']}", f"binary={runs['binary']}"])
    topic_params = dict(served["topics"].scorer.model.named_parameters())
    binary_params = dict(served["binary"].scorer.model.named_parameters())
    word_embeddings = [n for n in topic_params if "word_embeddings" in n][0]
    assert topic_params[word_embeddings].data_ptr() == binary_params[word_embeddings].data_ptr()
    texts = ["goal match team today", "stock market profit bank"]
    with TestClient(create_app(served)) as client:
        assert client.get("/health").json()["status"] == "ok"
        assert {m["name"] for m in client.get("/v1/models").json()} == {"topics", "binary"}
        for name in ("topics", "binary"):
            response = client.post("/v1/classify", json={"model": name, "texts": texts})
            assert response.status_code == 200
            got = [r["label"] for r in response.json()["results"]]
            assert got == [r["label"] for r in served[name].classify(texts)]
            run = load_run(served[name].run_dir)
            ids = run.tokenizer(texts)["input_ids"]
            probs = decisions.probabilities(predict_logits(run.model, ids, 0, precision=run.precision).numpy(),
                                            run.decision)
            # the binary run decides with its tuned threshold (on calibrated probabilities), the topic run by argmax
            assert (run.threshold is not None) == (name == "binary")
            assert got == [run.label_names[i] for i in decisions.labels(probs, run.decision)]
        assert len(client.post("/v1/classify", json={"model": "binary", "texts": texts}).json()["results"][0][
            "probabilities"]) == 2


@pytest.mark.parametrize("body, status", [
    ({"model": "nope", "texts": ["x"]}, 404),
    ({"model": "topics", "texts": []}, 422),
    ({"model": "topics", "texts": ["x"] * (MAX_TEXTS + 1)}, 422),
    ({"model": "topics", "texts": ["x" * (MAX_CHARS + 1)]}, 422),
    ({"model": "topics", "texts": ["   "]}, 422),
    ({"model": "topics", "texts": "not a list"}, 422),
    ({"texts": ["x"]}, 422),
])
def test_service_rejects_bad_input_with_4xx(runs, body, status):
    with TestClient(create_app(load_served([f"topics={runs['topics']}"]))) as client:
        assert client.post("/v1/classify", json=body).status_code == status


def test_concurrent_requests_are_micro_batched(runs):
    import asyncio

    served = load_served([f"topics={runs['topics']}"])
    calls = []
    original = served["topics"].classify_cleaned  # what the batcher calls, once per batch
    served["topics"].classify_cleaned = lambda texts: calls.append(len(texts)) or original(texts)
    app = create_app(served, max_wait_ms=50)

    async def burst():
        import httpx

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            requests = [client.post("/v1/classify", json={"model": "topics", "texts": [f"goal {i}"]})
                        for i in range(8)]
            return await asyncio.gather(*requests)

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    assert sum(calls) == 8 and len(calls) < 8


def test_predict_builds_liar_text_as_training_did(runs, tmp_path):
    """A LIAR run is trained on 'statement Speaker: x. Party: y. ...': predict builds the same from the columns."""
    from dataclasses import replace

    from newstune.data.text import clean_text, textualize_liar
    from newstune.inference.predict import probabilities

    run = load_run(runs["binary"])
    data = run.config.data.model_copy(update={"name": "liar", "metadata_fields": ["speaker", "party"]})
    liar_run = replace(run, config=run.config.model_copy(update={"data": data}))
    rows = [{"statement": "says the market profit doubled", "speaker": "jane-doe", "party": "goal"},
            {"statement": "stock shares bank", "speaker": "", "party": "team"}]
    source = tmp_path / "claims.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    counts = predict_file(liar_run, source, tmp_path / "out.jsonl")
    assert counts == {"rows": 2, "predicted": 2, "errors": 0}
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    full_rows = [{k: r.get(k, "") for k in ("statement", "speaker", "job", "state", "party", "subject", "context")}
                 for r in rows]
    texts = [clean_text(textualize_liar(r, ["speaker", "party"], False), data.clean) for r in full_rows]
    assert texts[0] == "says the market profit doubled Speaker: jane doe. Party: goal."
    expected = probabilities(liar_run, texts, 64)
    for record, probs in zip(out, expected):
        assert list(record["probabilities"].values()) == pytest.approx(probs.tolist(), abs=1e-6)
    missing = tmp_path / "no_statement.jsonl"
    missing.write_text(json.dumps({"text": "stock market"}) + "\n")
    assert predict_file(liar_run, missing, tmp_path / "out2.jsonl")["errors"] == 1


def test_predict_labels_good_rows_and_gives_bad_ones_their_own_error(runs, tmp_path, monkeypatch):
    """A formula text, a lone surrogate, an over-long row, a control-only text and a good row in one file: fails if
    any bad row takes the file down (the surrogate once killed the whole CSV), if an over-long row reaches the
    tokenizer, or if a cell of the CSV output starts with '=' (spreadsheet formula injection)."""
    import csv

    import newstune.inference.predict

    monkeypatch.setattr(newstune.inference.predict, "MAX_ROW_CHARS", 500)
    good = synthetic_rows(1, 4)[0][0]
    rows = [{"text": "=HYPERLINK(\"http://evil\")+goal match team"}, {"text": "goal \ud800 match"},
            {"text": "goal " * 200}, {"text": "\x07\x1b"}, {"text": good}]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    counts = predict_file(load_run(runs["topics"]), source, tmp_path / "out.csv")
    assert counts == {"rows": 5, "predicted": 2, "errors": 3}
    with (tmp_path / "out.csv").open(newline="") as handle:
        out = list(csv.DictReader(handle))
    assert out[0]["predicted_label"] and out[0]["text"].startswith("'=")
    assert "lone surrogate" in out[1]["error"] and "over the 500" in out[2]["error"]
    assert "no visible character" in out[3]["error"]
    assert out[4]["predicted_label"] and not out[4]["error"]
    assert not any(cell.startswith(("=", "+", "@")) for row in out for cell in row.values())


@pytest.mark.parametrize("argv, named", [(["serve", "run", "--max-batch", "abc"], "--max-batch"),
                                         (["serve"], "Missing argument"), (["nosuch"], "No such command")])
def test_a_usage_error_is_one_line_naming_the_help(argv, named, monkeypatch, capsys):
    # fails if a wrong value type, a missing argument or an unknown command prints the multi-line usage box again
    import sys

    from newstune.cli import main

    monkeypatch.setattr(sys, "argv", ["newstune", *argv])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
    assert err[0].endswith(f"(see newstune{' serve' if argv[0] == 'serve' else ''} --help)")
