"""Inference backends: ONNX Runtime and OpenVINO exports of a tiny run, their accuracy gate, and who picks them."""

import gc
import json
import shutil

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import newstune.inference.backend_export
from newstune.config import validate
from newstune.errors import NewstuneError
from newstune.inference.backend_export import export_backend
from newstune.inference.predict import predict_file
from newstune.modeling.backends import Scorer, choose_export
from newstune.rundir.run import export_dir, load_run
from newstune.serving.serve import create_app, load_served
from newstune.training.train import train

from .conftest import synthetic_rows, tiny_config, write_csv

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("nncf")

EXPORTS = [("onnx", False), ("onnx", True), ("openvino", False), ("openvino", True)]


def _native_bf16() -> bool:
    return "avx512_bf16" in open("/proc/cpuinfo").read() or "amx_bf16" in open("/proc/cpuinfo").read()


@pytest.fixture(scope="module")
def run_dir(tiny_models, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("backend_runs")
    trained, _ = train(validate(tiny_config(tiny_models["bert"], tiny_data)), root / "topics")
    return trained


@pytest.fixture
def fresh_run(run_dir, tmp_path):
    """A copy of the trained run, so each test starts without exports."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("exports"))
    return copy


@pytest.mark.parametrize(("backend", "int8"), EXPORTS)
def test_each_backend_export_matches_pytorch_on_validation(fresh_run, backend, int8):
    # 60 validation rows: one flipped label moves macro-F1 by ~1.8 points, so the default 0.5-point gate passes or
    # refuses a tiny model by chance (1 of 3 training seeds fails either way); the label agreement and logit bounds
    # below are this test's check, and the gate's refusal is tested with a broken model further down.
    checks = export_backend(fresh_run, backend, int8=int8, tolerance_points=2.0)
    folder = export_dir(fresh_run, backend, "int8" if int8 else "fp32")
    assert json.loads((folder / "export_checks.json").read_text()) == checks
    quality = checks["validation"]
    assert checks["passed"] and quality["n"] == 60
    loaded = load_run(fresh_run, backend=backend)
    assert loaded.scorer.backend == backend
    assert loaded.model is None  # fails if the PyTorch model is loaded beside the export that computes the logits
    if int8 or loaded.scorer.precision == "bf16":  # fewer bits move logits a little, labels hardly ever
        assert quality["label_agreement"] >= 0.95 and quality["max_abs_logit_diff"] < 0.5
    else:  # the same fp32 graph: equal logits up to kernel rounding
        assert quality["label_agreement"] == 1.0 and quality["max_abs_logit_diff"] < 1e-3
    runs_bf16 = backend == "openvino" and _native_bf16()  # OpenVINO's own choice on such CPUs
    assert loaded.scorer.precision == ("int8" if int8 else "bf16" if runs_bf16 else "fp32")


def test_the_gate_refuses_an_int8_model_that_loses_accuracy(fresh_run, monkeypatch):
    real = newstune.inference.backend_export.export_scorer

    def broken(*args, **kwargs) -> Scorer:  # an int8 model whose logits came out scrambled
        scorer = real(*args, **kwargs)
        forward = scorer.forward
        scorer.forward = lambda ids, mask: np.roll(forward(ids, mask), 1, axis=1)
        return scorer

    monkeypatch.setattr(newstune.inference.backend_export, "export_scorer", broken)
    with pytest.raises(NewstuneError, match=r"^onnx int8 export refused: validation macro-F1 .* points below "
                                            r"PyTorch's .* \(tolerance 0.5 points\); nothing was written"):
        export_backend(fresh_run, "onnx", int8=True)
    assert not (fresh_run / "exports").exists() or list((fresh_run / "exports").iterdir()) == []

    checks = export_backend(fresh_run, "onnx", int8=True, force=True)
    assert not checks["passed"] and checks["forced"]
    assert load_run(fresh_run, backend="auto").backend.startswith("torch")  # a forced export is never picked
    with pytest.raises(NewstuneError, match="no onnx export that passed its accuracy check"):
        load_run(fresh_run, backend="onnx")


def test_an_export_whose_width_disagrees_with_the_labels_is_refused(fresh_run):
    # fails if, without the PyTorch model, nothing checks the label file against what the export computes
    export_backend(fresh_run, "onnx")
    labels = json.loads((fresh_run / "label_map.json").read_text())
    (fresh_run / "label_map.json").write_text(json.dumps([*labels, "extra"]))
    with pytest.raises(NewstuneError, match=r"label_map.json: names 4 labels but the onnx export has 3 outputs"):
        load_run(fresh_run, backend="onnx")


def test_the_export_traces_the_first_token_layer(fresh_run, monkeypatch):
    # the logits are the same either way, so the gate cannot see it: fails if the converter gets the full last layer
    from newstune.modeling.frozen_prefix import encoder_model

    real, seen = newstune.inference.backend_export._to_onnx, []

    def spy(model, *args):
        seen.append("forward" in vars(encoder_model(model).encoder.layer[-1]))
        return real(model, *args)

    monkeypatch.setattr(newstune.inference.backend_export, "_to_onnx", spy)
    assert export_backend(fresh_run, "onnx", tolerance_points=2.0)["validation"]["label_agreement"] == 1.0
    assert seen == [True]


def test_an_existing_export_is_never_overwritten(fresh_run):
    export_backend(fresh_run, "onnx")
    before = (export_dir(fresh_run, "onnx", "fp32") / "model.onnx").read_bytes()
    with pytest.raises(NewstuneError, match="already exists; delete it"):
        export_backend(fresh_run, "onnx")
    assert (export_dir(fresh_run, "onnx", "fp32") / "model.onnx").read_bytes() == before


def _export(backend: str, precision: str, speedup: float, passed: bool = True) -> dict:
    return {"backend": backend, "precision": precision, "passed": passed, "speed": {"speedup": speedup},
            "folder": f"exports/{backend}-{precision}"}


def test_auto_picks_the_fastest_passed_export_faster_than_pytorch():
    exports = [_export("onnx", "fp32", 1.4), _export("onnx", "int8", 2.5), _export("openvino", "int8", 3.9, False),
               _export("openvino", "fp32", 2.1)]
    assert choose_export(exports, "auto")["folder"] == "exports/onnx-int8"
    assert choose_export(exports, "openvino")["folder"] == "exports/openvino-fp32"
    assert choose_export(exports, "torch") is None
    assert choose_export([_export("onnx", "fp32", 0.8)], "auto") is None  # slower than PyTorch: keep PyTorch
    assert choose_export([_export("onnx", "fp32", 0.8)], "onnx")["precision"] == "fp32"  # asked for by name
    with pytest.raises(NewstuneError, match="--backend tensorrt: choose auto, torch, onnx or openvino"):
        choose_export(exports, "tensorrt")


def test_openvino_batch_work_runs_two_streams_and_keeps_every_row_in_its_place(fresh_run, monkeypatch):
    import openvino

    export_backend(fresh_run, "openvino", tolerance_points=2.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the scorer takes its streams from torch's threads when it is built
    try:
        scorer = load_run(fresh_run, backend="openvino").scorer
        served = load_served([f"topics={fresh_run}"], backend="openvino")["topics"]
    finally:
        torch.set_num_threads(threads)
    jobs = []

    class Recorded(openvino.AsyncInferQueue):
        def __init__(self, model, count):
            super().__init__(model, count)
            jobs.append((count, model.get_property("NUM_STREAMS")))

    monkeypatch.setattr(openvino, "AsyncInferQueue", Recorded)
    texts = [text for text, _ in synthetic_rows(40, 5)]
    ids = load_run(fresh_run, backend="torch").tokenizer(texts)["input_ids"]
    two_streams = scorer.logits(ids, batch_size=4, throughput=True)  # 10 batches, finishing in any order
    assert jobs == [(2, 2)]  # fails if batch work runs one job, or one stream, at a time
    one_at_a_time = scorer.logits(ids, batch_size=4)  # the latency path: what serve and the export gate run
    assert jobs == [(2, 2)]
    tolerance = 1e-2 if scorer.precision == "bf16" else 1e-4
    # fails if rows land by finishing order, or a reused output buffer leaves one batch's rows in several places
    assert np.abs(two_streams - one_at_a_time).max() < tolerance
    assert np.abs(one_at_a_time - np.roll(one_at_a_time, 4, axis=0)).max() > 10 * tolerance  # the check can tell

    def refuse(batches):
        raise AssertionError("serve's micro-batches must stay on the latency compilation")

    served.scorer.forward_many = refuse
    assert len(served.classify_cleaned(texts * 3)) == 120  # over 64 texts: two batches, still one stream


def test_a_backend_that_loses_a_batch_is_an_error_not_garbage():
    def drop_the_last(batches):
        scored = [(indices, np.zeros((len(indices), 2), np.float32)) for indices, _ in batches]
        yield from scored[:-1]

    scorer = Scorer("openvino", "fp32", 0, forward=lambda ids, mask: np.zeros((len(ids), 2), np.float32),
                    forward_many=drop_the_last)
    with pytest.raises(RuntimeError, match="7 of 8 rows"):  # np.empty's leftovers would pass as logits
        scorer.logits([[5, 6]] * 8, batch_size=1, throughput=True)


def test_predict_and_serve_give_the_same_probabilities_on_every_backend(fresh_run, tmp_path):
    export_backend(fresh_run, "openvino")
    source = write_csv(tmp_path / "in.csv", synthetic_rows(40, 11))
    outputs, precisions = {}, {}
    for backend in ("torch", "openvino"):
        out = tmp_path / f"{backend}.jsonl"
        loaded = load_run(fresh_run, backend=backend)
        precisions[backend] = loaded.scorer.precision
        predict_file(loaded, source, out)
        outputs[backend] = [json.loads(line) for line in out.read_text().splitlines()]
    tolerance = 1e-2 if precisions["openvino"] == "bf16" else 1e-4  # bf16 keeps 8 bits of mantissa
    for ours, theirs in zip(outputs["torch"], outputs["openvino"]):
        assert ours["predicted_label"] == theirs["predicted_label"]
        assert list(ours["probabilities"].values()) == pytest.approx(list(theirs["probabilities"].values()),
                                                                      abs=tolerance)

    served = load_served([f"topics={fresh_run}"], backend="openvino")
    client = TestClient(create_app(served))
    assert client.get("/v1/models").json()[0]["backend"] == f"openvino-{precisions['openvino']}"
    first_text = synthetic_rows(40, 11)[0][0]
    response = client.post("/v1/classify", json={"model": "topics", "texts": [first_text]}).json()["results"][0]
    assert list(response["probabilities"].values()) == pytest.approx(
        list(outputs["openvino"][0]["probabilities"].values()), abs=1e-6)


def test_the_export_command_refuses_with_one_line_and_exit_2(fresh_run, monkeypatch, capsys):
    import sys

    from newstune.cli import main

    real = newstune.inference.backend_export.export_scorer

    def constant(*args, **kwargs) -> Scorer:  # a model that says the same class for every text
        scorer = real(*args, **kwargs)
        scorer.forward = lambda ids, mask: np.tile(np.asarray([[5.0, 0.0, 0.0]], np.float32), (len(ids), 1))
        return scorer

    monkeypatch.setattr(newstune.inference.backend_export, "export_scorer", constant)
    monkeypatch.setattr(sys, "argv", ["newstune", "export", str(fresh_run), "--backend", "openvino"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: openvino fp32 export refused: validation macro-F1 ")
    assert not export_dir(fresh_run, "openvino", "fp32").exists()


def test_a_serve_worker_process_builds_its_app_from_the_environment(run_dir, monkeypatch):
    import torch

    from newstune.serving.serve import WORKER_OPTIONS, app_from_env

    monkeypatch.setenv(WORKER_OPTIONS, json.dumps({"specs": [f"topics={run_dir}"], "backend": "torch", "threads": 1,
                                                   "max_wait_ms": 0, "max_queue": 3, "max_batch": 16}))
    threads = torch.get_num_threads()
    try:
        client = TestClient(app_from_env())
        assert torch.get_num_threads() == 1  # its share of the cores, not all of them
        assert gc.get_freeze_count() > 10_000  # what the worker loaded is out of the collector's reach
    finally:
        torch.set_num_threads(threads)
        gc.unfreeze()
    assert [m["name"] for m in client.get("/v1/models").json()] == ["topics"]
    response = client.post("/v1/classify", json={"model": "topics", "texts": ["goal match team"]})
    assert response.status_code == 200 and response.json()["results"][0]["label"] in ("business", "science", "sports")
