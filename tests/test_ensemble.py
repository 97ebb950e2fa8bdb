"""eval.ensemble: tfidf -- the encoder blended with the run's TF-IDF model, applied alike by every consumer."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from fastapi.testclient import TestClient

from newstune.config import EvalSettings, validate
from newstune.data.registry import load_dataset
from newstune.decisions import rule as decisions
from newstune.decisions.baseline import choose_baseline, margins
from newstune.decisions.ensemble import ENSEMBLE_DIR, LinearTextModel, fit_ensemble
from newstune.errors import NewstuneError
from newstune.inference.predict import predict_file
from newstune.reporting.report import evaluate_loaded
from newstune.rundir.run import load_run
from newstune.serving.serve import create_app, load_served
from newstune.training.train import train

from .conftest import synthetic_rows, tiny_config, write_csv


@pytest.fixture(scope="module")
def hybrid(tiny_models, tiny_data, tmp_path_factory):
    """A tiny run trained one epoch (a weak encoder) with the TF-IDF blend."""
    root = tmp_path_factory.mktemp("hybrid")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NEWSTUNE_CACHE", str(root / "cache"))
        config = tiny_config(tiny_models["bert"], tiny_data, **{"train.epochs": 1})
        config["eval"]["ensemble"] = "tfidf"
        run_dir, metrics = train(validate(config), root / "run")
    return run_dir, metrics


@pytest.fixture
def fresh(hybrid, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(hybrid[0], copy, ignore=shutil.ignore_patterns("exports"))
    return copy


def test_the_blend_is_recorded_and_beats_the_weak_encoder(hybrid):
    run_dir, metrics = hybrid
    blend = metrics["ensemble"]
    assert 0 < blend["weight"] <= 1, "keyword topics: the TF-IDF model is worth a weight"
    assert json.loads((run_dir / "decision.json").read_text())["ensemble"]["weight"] == blend["weight"]
    assert (run_dir / ENSEMBLE_DIR / "vocabulary.json").is_file()
    assert not list((run_dir / ENSEMBLE_DIR).glob("*.pkl"))
    assert metrics["test"]["accuracy"] >= blend["encoder_alone"]["test"]["accuracy"]
    assert [point["weight"] for point in blend["validation_curve"]][:2] == [0.0, 0.05]


def test_evaluate_predict_serve_and_openvino_give_the_same_answers(fresh, tmp_path):
    # Fails when any consumer skips the blend: the encoder alone gives other probabilities (checked below).
    pytest.importorskip("openvino")
    from newstune.inference.backend_export import export_backend

    run = load_run(fresh)
    bundle = load_dataset(run.config.data, run.config.train.seed)
    stored = json.loads((fresh / "metrics.json").read_text())["test"]
    assert evaluate_loaded(run, bundle.splits["test"])["accuracy"] == pytest.approx(stored["accuracy"])
    rows = synthetic_rows(30, 11)
    source = write_csv(tmp_path / "in.csv", rows)
    export_backend(fresh, "openvino", tolerance_points=100.0)
    answers = {}
    for backend in ("torch", "openvino"):
        predict_file(load_run(fresh, backend=backend), source, tmp_path / f"{backend}.jsonl")
        answers[backend] = [json.loads(line) for line in (tmp_path / f"{backend}.jsonl").read_text().splitlines()]
    client = TestClient(create_app(load_served([f"topics={fresh}"])))
    served = client.post("/v1/classify", json={"model": "topics", "texts": [text for text, _ in rows]}).json()
    encoder_only = decisions.probabilities(run.scorer.logits(run.tokenizer([t for t, _ in rows])["input_ids"]),
                                           replace(run.decision, ensemble=None))
    tolerance = 1e-2 if load_run(fresh, backend="openvino").scorer.precision == "bf16" else 1e-4
    for torch_row, ov_row, http_row in zip(answers["torch"], answers["openvino"], served["results"]):
        probs = list(torch_row["probabilities"].values())
        assert torch_row["predicted_label"] == ov_row["predicted_label"] == http_row["label"]
        assert probs == pytest.approx(list(ov_row["probabilities"].values()), abs=tolerance)
        assert probs == pytest.approx(list(http_row["probabilities"].values()), abs=1e-5)
    assert np.abs(np.asarray([list(r["probabilities"].values()) for r in answers["torch"]])
                  - encoder_only).max() > 1e-3


@pytest.mark.parametrize(("tamper", "message"), [
    (lambda run: (run / ENSEMBLE_DIR / "vocabulary.json").unlink(), "vocabulary.json: missing"),
    (lambda run: (run / ENSEMBLE_DIR / "weights.safetensors").write_bytes(b"\x00" * 20), "unreadable"),
    (lambda run: (run / ENSEMBLE_DIR / "vocabulary.json").write_text('{"views": [], "with_record": false}'),
     "do not fit"),
    (lambda run: (run / "decision.json").write_text(json.dumps(
        {**json.loads((run / "decision.json").read_text()),
         "ensemble": {"method": "tfidf", "weight": 2, "encoder_temperature": 1, "baseline_temperature": 1}})),
     "ensemble weight must be between 0 and 1"),
])
def test_a_tampered_or_missing_ensemble_file_is_one_line(fresh, tamper, message):
    tamper(fresh)
    with pytest.raises(NewstuneError, match=message) as err:
        load_run(fresh)
    assert "\n" not in str(err.value)


def test_the_weight_is_fitted_without_the_test_split(tiny_data):
    # Fails when the weight, temperatures or baseline settings read test rows: scrambled test labels change nothing.
    config = validate(tiny_config(tiny_data, tiny_data)).data
    bundle = load_dataset(config, 7)
    encoder = np.random.default_rng(0).normal(size=(len(bundle.splits["validation"].texts), 3))
    first, report = fit_ensemble(bundle, encoder, "macro_f1", EvalSettings())
    test = bundle.splits["test"]
    bundle.splits["test"] = replace(test, labels=list(np.roll(test.labels, 1)), texts=list(reversed(test.texts)))
    second, again = fit_ensemble(bundle, encoder, "macro_f1", EvalSettings())
    assert report["validation_curve"] == again["validation_curve"]
    assert (first.weight, first.encoder_temperature) == (second.weight, second.encoder_temperature)


def test_the_saved_linear_model_scores_like_the_fitted_one(tiny_data, tmp_path):
    bundle = load_dataset(validate(tiny_config(tiny_data, tiny_data)).data, 7)
    chosen = choose_baseline(bundle, "macro_f1", EvalSettings())
    texts = bundle.splits["test"].texts
    LinearTextModel.from_chosen(chosen).save(tmp_path / "e")
    loaded = LinearTextModel.load(tmp_path / "e", len(bundle.label_names))
    assert np.allclose(loaded.logits(texts), margins(chosen.model, chosen.features.transform(texts)), atol=1e-10)


def test_the_ensemble_command_blends_an_existing_run_and_keeps_the_old_metrics(tiny_models, tiny_data, tmp_path):
    from typer.testing import CliRunner

    from newstune.cli import app

    plain, _ = train(validate(tiny_config(tiny_models["bert"], tiny_data, **{"train.epochs": 1})), tmp_path / "p")
    before = json.loads((plain / "metrics.json").read_text())
    result = CliRunner().invoke(app, ["ensemble", str(plain)])
    assert result.exit_code == 0, result.output
    after = json.loads((plain / "metrics.json").read_text())
    assert after["ensemble"]["encoder_alone"]["test"]["accuracy"] == pytest.approx(before["test"]["accuracy"])
    assert load_run(plain).ensemble is not None
    assert [json.loads(p.read_text()) for p in plain.glob("metrics.before-calibrate-*.json")] == [before]
    CliRunner().invoke(app, ["ensemble", str(plain), "--method", "none"])
    assert load_run(plain).ensemble is None and "ensemble" not in json.loads((plain / "metrics.json").read_text())


@pytest.fixture(scope="module")
def multi_label_hybrid(tiny_models, tmp_path_factory):
    """A tiny multi-label run trained one epoch (a weak encoder) with the one-vs-rest TF-IDF blend."""
    from .test_decisions import multi_label_rows

    root = tmp_path_factory.mktemp("multi_hybrid")
    for name, n, seed in (("train.csv", 480, 1), ("valid.csv", 90, 2), ("test.csv", 90, 3)):
        write_csv(root / name, multi_label_rows(n, seed))
    config = tiny_config(tiny_models["bert"], root, **{"train.epochs": 1})
    config["data"]["multi_label"] = True
    config["eval"]["ensemble"] = "tfidf"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NEWSTUNE_CACHE", str(root / "cache"))
        run_dir, metrics = train(validate(config), root / "run")
    return root, run_dir, metrics


def test_a_multi_label_linear_model_saves_and_scores_like_the_fitted_one(multi_label_hybrid, tmp_path):
    # Fails when the one-vs-rest coefficients are not one row per label in the labels' order.
    root = multi_label_hybrid[0]
    config = validate(tiny_config(root, root))
    config.data.multi_label = True
    bundle = load_dataset(config.data, 7)
    chosen = choose_baseline(bundle, "micro_f1", EvalSettings())
    texts = bundle.splits["test"].texts
    LinearTextModel.from_chosen(chosen).save(tmp_path / "e")
    loaded = LinearTextModel.load(tmp_path / "e", len(bundle.label_names), multi_label=True)
    assert loaded.logits(texts).shape == (len(texts), 3)
    assert np.allclose(loaded.logits(texts), margins(chosen.model, chosen.features.transform(texts)), atol=1e-10)


def test_a_multi_label_blend_is_applied_alike_by_evaluate_predict_and_serve(multi_label_hybrid, tmp_path):
    # Fails when a consumer skips the blend (the encoder alone gives other probabilities, checked below) or when the
    # blend mixes softmax log-probabilities across labels instead of each label's log-odds.
    _, run_dir, metrics = multi_label_hybrid
    blend = metrics["ensemble"]
    assert 0 < blend["weight"] <= 1, "keyword tags: the TF-IDF model is worth a weight"
    assert metrics["test"]["micro_f1"] >= blend["encoder_alone"]["test"]["micro_f1"]
    run = load_run(run_dir)
    assert run.decision.multi_label and run.ensemble.linear.multi_label
    bundle = load_dataset(run.config.data, run.config.train.seed)
    assert evaluate_loaded(run, bundle.splits["test"])["micro_f1"] == pytest.approx(metrics["test"]["micro_f1"])
    texts = ["goal match team stock market shares", "space planet nasa research", "rain and wind"]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    predict_file(run, source, tmp_path / "out.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    with TestClient(create_app(load_served([f"tags={run_dir}"]))) as client:
        served = client.post("/v1/classify", json={"model": "tags", "texts": texts}).json()["results"]
    assert [r["labels"] for r in served] == [r["predicted_label"] for r in rows]
    assert [r["probabilities"] for r in served] == [r["probabilities"] for r in rows]
    encoder = run.scorer.logits(run.tokenizer(texts)["input_ids"])
    linear = run.ensemble.linear.logits(texts)
    w, t_e, t_b = blend["weight"], blend["encoder_temperature"], blend["baseline_temperature"]
    expected = decisions.probabilities((1 - w) * encoder / t_e + w * linear / t_b, run.decision)
    assert np.asarray([list(r["probabilities"].values()) for r in rows]) == pytest.approx(expected, abs=1e-5)
    encoder_only = decisions.probabilities(encoder, replace(run.decision, ensemble=None))
    assert np.abs(expected - encoder_only).max() > 1e-3
