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
from newstune.decisions.ensemble import (
    ENSEMBLE_DIR,
    STACK_FILE,
    LinearTextModel,
    Stack,
    cross_validate,
    fit_ensemble,
    pick_combiner,
    stack_features,
)
from newstune.errors import NewstuneError
from newstune.inference.predict import predict_file
from newstune.reporting.report import evaluate_loaded
from newstune.rundir.run import load_run
from newstune.serving.serve import create_app, load_served
from newstune.training.train import train

from .conftest import synthetic_rows, tiny_config, write_csv


def _train_blended(tiny_models, tiny_data, root, **eval_settings):
    """A tiny run trained one epoch (a weak encoder) with the TF-IDF blend, its cache kept in `root`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NEWSTUNE_CACHE", str(root / "cache"))
        config = tiny_config(tiny_models["bert"], tiny_data, **{"train.epochs": 1})
        config["eval"].update(ensemble="tfidf", **eval_settings)
        return train(validate(config), root / "run")


@pytest.fixture(scope="module")
def hybrid(tiny_models, tiny_data, tmp_path_factory):
    """Blended by the weighted sum."""
    return _train_blended(tiny_models, tiny_data, tmp_path_factory.mktemp("hybrid"))


@pytest.fixture(scope="module")
def stacked(tiny_models, tiny_data, tmp_path_factory):
    """The same tiny run combined with the TF-IDF model by a stacked logistic layer."""
    return _train_blended(tiny_models, tiny_data, tmp_path_factory.mktemp("stacked"), ensemble_combiner="logistic")


def _copy(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("exports"))
    return copy


@pytest.fixture
def fresh(hybrid, tmp_path):
    return _copy(hybrid[0], tmp_path)


@pytest.fixture
def fresh_stacked(stacked, tmp_path):
    return _copy(stacked[0], tmp_path)


def test_the_blend_is_recorded_and_beats_the_weak_encoder(hybrid):
    run_dir, metrics = hybrid
    blend = metrics["ensemble"]
    assert 0 < blend["weight"] <= 1, "keyword topics: the TF-IDF model is worth a weight"
    assert json.loads((run_dir / "decision.json").read_text())["ensemble"]["weight"] == blend["weight"]
    assert (run_dir / ENSEMBLE_DIR / "vocabulary.json").is_file()
    assert not list((run_dir / ENSEMBLE_DIR).glob("*.pkl"))
    assert metrics["test"]["accuracy"] >= blend["encoder_alone"]["test"]["accuracy"]
    assert [point["weight"] for point in blend["validation_curve"]][:2] == [0.0, 0.05]


@pytest.mark.parametrize("combiner", ["weighted", "logistic"])
def test_evaluate_predict_serve_and_openvino_give_the_same_answers(combiner, request, tmp_path):
    # Fails when any consumer skips the blend: the encoder alone gives other probabilities (checked below).
    pytest.importorskip("openvino")
    from newstune.inference.backend_export import export_backend

    fresh = request.getfixturevalue("fresh" if combiner == "weighted" else "fresh_stacked")
    assert load_run(fresh).ensemble.combiner == combiner
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


@pytest.mark.parametrize("combiner", ["weighted", "logistic", "auto"])
def test_the_weight_is_fitted_without_the_test_split(tiny_data, combiner):
    # Fails when the weight, temperatures, the cross-validated choice or the logistic layer read test rows:
    # scrambled test labels change nothing.
    config = validate(tiny_config(tiny_data, tiny_data)).data
    bundle = load_dataset(config, 7)
    encoder = np.random.default_rng(0).normal(size=(len(bundle.splits["validation"].texts), 3))
    settings = EvalSettings(ensemble_combiner=combiner)
    first, report = fit_ensemble(bundle, encoder, "macro_f1", settings)
    test = bundle.splits["test"]
    bundle.splits["test"] = replace(test, labels=list(np.roll(test.labels, 1)), texts=list(reversed(test.texts)))
    second, again = fit_ensemble(bundle, encoder, "macro_f1", settings)
    assert report["validation_curve"] == again["validation_curve"]
    assert report.get("cross_validation") == again.get("cross_validation")
    assert (first.weight, first.encoder_temperature) == (second.weight, second.encoder_temperature)
    if first.stack is not None:
        assert np.allclose(first.stack.coef, second.stack.coef, rtol=1e-3, atol=1e-6)  # lbfgs: last digits vary
    if combiner == "auto":  # the choice is the cross-validation's best, never a fixed one
        table = report["cross_validation"]["mean_macro_f1"]
        assert set(table) == {"weighted", "logistic C=0.01", "logistic C=0.1", "logistic C=1", "logistic C=10"}
        assert first.combiner == pick_combiner(table)[0]


def _disagreeing_models(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three classes; the encoder calls class 2 rows class 0 with confidence, the baseline calls class 0 rows class 1:
    each is right where the other is wrong, in a way no single weight can mix but a per-class layer can."""
    rng = np.random.default_rng(seed)
    truth = np.repeat([0, 1, 2], n_per_class)
    encoder_says, baseline_says = np.array([0, 1, 0])[truth], np.array([1, 1, 2])[truth]
    encoder = 4.0 * np.eye(3)[encoder_says] + rng.normal(size=(len(truth), 3))
    baseline = 4.0 * np.eye(3)[baseline_says] + rng.normal(size=(len(truth), 3))
    return encoder, baseline, truth


def test_cross_validation_prefers_the_logistic_layer_where_one_weight_cannot_mix_the_models():
    # Fails when the held-out folds are scored with the wrong candidate, when the logistic layer ignores one model,
    # or when `pick_combiner` does not take the best cross-validated candidate.
    encoder, baseline, truth = _disagreeing_models(60, 0)
    linear = LinearTextModel(None, np.zeros((3, 1)), np.zeros(3))
    table = cross_validate(encoder, baseline, truth, linear, ["a", "b", "c"], "accuracy", EvalSettings())
    assert table["weighted"] < 0.8, "one weight trusts the encoder on class 0 rows or the baseline on class 2 rows"
    assert max(v for k, v in table.items() if k != "weighted") > 0.95
    assert pick_combiner(table)[0] == "logistic"


def test_ties_go_to_the_weighted_sum_then_the_smallest_c():
    # Fails when a tie picks the candidate with more parameters.
    assert pick_combiner({"weighted": 0.9, "logistic C=0.01": 0.9, "logistic C=1": 0.9}) == ("weighted", None)
    assert pick_combiner({"logistic C=10": 0.9, "logistic C=0.1": 0.9, "logistic C=1": 0.8}) == ("logistic", 0.1)


@pytest.mark.parametrize("dropped", [0, 1])
def test_a_logistic_layer_never_predicts_a_class_its_rows_lacked(dropped):
    # Fails when the rows of the classes present are put in place by position instead of by class (dropping class
    # 0 or a middle class shifts them), or when the missing class gets a usable score.
    rng = np.random.default_rng(dropped)
    truth = np.repeat([0, 1, 2, 3], 40)
    encoder = 4.0 * np.eye(4)[truth] + rng.normal(size=(len(truth), 4))
    baseline = 4.0 * np.eye(4)[truth] + rng.normal(size=(len(truth), 4))
    for n_present in (3, 2):  # the multinomial branch, then scikit-learn's one-row two-class branch
        keep = (truth != dropped) & (truth < n_present + 1)
        stack = Stack.fit(stack_features(encoder[keep], baseline[keep], 1.0, 1.0), truth[keep], 4, 1.0)
        logits = stack.logits(stack_features(encoder, baseline, 1.0, 1.0))
        assert logits.shape == (len(truth), 4) and dropped not in logits.argmax(1)
        assert (logits.argmax(1)[keep] == truth[keep]).mean() > 0.9


def test_a_binary_logistic_layer_is_the_log_odds_of_class_1_and_saves_as_it_scores(tmp_path):
    # Fails when the binary layer's sign or its [0, log-odds] layout is wrong (probabilities of class 0 reported as
    # class 1), when folding the standardisation back changes the scores, or when save/load loses anything.
    from scipy.special import softmax
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, 200)
    encoder = np.c_[np.zeros(200), 2.0 * (truth - 0.5) + rng.normal(size=200)]
    baseline = np.c_[np.zeros(200), 1.5 * (truth - 0.5) + rng.normal(size=200)]
    features = stack_features(encoder, baseline, 1.0, 1.0)
    stack = Stack.fit(features, truth, 2, 0.1)
    assert stack.coef.shape == (1, 4)
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(features, truth)
    assert softmax(stack.logits(features), axis=1)[:, 1] == pytest.approx(reference.predict_proba(features)[:, 1],
                                                                        abs=1e-5)
    stack.save(tmp_path / STACK_FILE)
    loaded = Stack.load(tmp_path / STACK_FILE, 2)
    assert np.array_equal(loaded.logits(features), stack.logits(features)) and loaded.c == 0.1


def test_a_multi_label_run_refuses_the_logistic_layer_in_one_line(multi_label_hybrid):
    # Fails when a multi-label run silently fits a softmax layer across its independent labels.
    root = multi_label_hybrid[0]
    config = validate(tiny_config(root, root))
    config.data.multi_label = True
    bundle = load_dataset(config.data, 7)
    encoder = np.zeros((len(bundle.splits["validation"].texts), 3))
    with pytest.raises(NewstuneError, match="logistic is for single-label runs") as err:
        fit_ensemble(bundle, encoder, "micro_f1", EvalSettings(ensemble_combiner="logistic"))
    assert "\n" not in str(err.value)
    assert fit_ensemble(bundle, encoder, "micro_f1", EvalSettings(ensemble_combiner="auto"))[0].combiner == "weighted"


def _decision_with(run, **ensemble):
    decision = json.loads((run / "decision.json").read_text())
    decision["ensemble"] = {**decision["ensemble"], **ensemble}
    (run / "decision.json").write_text(json.dumps(decision))


def _multi_label_decision(run):
    decision = json.loads((run / "decision.json").read_text())
    (run / "decision.json").write_text(json.dumps({**decision, "multi_label": True}))


def _stack_file_with(run, **tensors):
    from safetensors.numpy import save_file

    save_file({"coef": np.zeros((3, 6)), "intercept": np.zeros(3), "C": np.ones(1), **tensors},
              str(run / ENSEMBLE_DIR / STACK_FILE))


@pytest.mark.parametrize(("tamper", "message"), [
    (lambda run: (run / ENSEMBLE_DIR / STACK_FILE).unlink(), "stack.safetensors: missing"),
    (_multi_label_decision, "a multi-label run cannot combine with a logistic layer"),
    (lambda run: _stack_file_with(run, coef=np.zeros((3, 4))), "does not fit 3 labels"),
    (lambda run: _stack_file_with(run, intercept=np.full(3, 1e9)), "out-of-range values"),
    (lambda run: (run / ENSEMBLE_DIR / STACK_FILE).write_bytes(b"\x00" * 20), "unreadable"),
    (lambda run: _decision_with(run, weight=0.3), "a logistic ensemble has no weight"),
    (lambda run: _decision_with(run, combiner="magic"), "ensemble combiner must be one of"),
])
def test_a_tampered_or_missing_logistic_layer_is_one_line(fresh_stacked, tamper, message):
    tamper(fresh_stacked)
    with pytest.raises(NewstuneError, match=message) as err:
        load_run(fresh_stacked)
    assert "\n" not in str(err.value)


def test_a_weighted_sum_is_written_without_a_combiner_key_and_reads_with_one(fresh):
    # Fails when a weighted run's decision.json gains a key older newstune versions refuse, or when a hand-written
    # "combiner": "weighted" (or a run shared before the key existed) is not read as the weighted sum.
    decision = json.loads((fresh / "decision.json").read_text())
    assert "combiner" not in decision["ensemble"]
    assert load_run(fresh).ensemble.combiner == "weighted"
    decision["ensemble"]["combiner"] = "weighted"
    (fresh / "decision.json").write_text(json.dumps(decision))
    run = load_run(fresh)
    assert run.ensemble.combiner == "weighted" and run.ensemble.weight == decision["ensemble"]["weight"]


def test_calibrate_keeps_the_combiner_the_ensemble_command_fitted(fresh):
    # Fails when a later `newstune calibrate` falls back to the recipe's combiner and deletes the fitted layer.
    from newstune.training.calibrate import calibrate_run

    calibrate_run(fresh, combiner="logistic")
    calibrate_run(fresh)
    assert load_run(fresh).ensemble.combiner == "logistic"
    assert (fresh / ENSEMBLE_DIR / STACK_FILE).is_file()


def test_a_multi_label_run_with_a_logistic_layer_stops_before_training(multi_label_hybrid, tiny_models, tmp_path):
    # Fails when the refusal comes only after training (the trained model lost) or leaves a run folder behind.
    root = multi_label_hybrid[0]
    config = tiny_config(tiny_models["bert"], root, **{"train.epochs": 1})
    config["data"]["multi_label"] = True
    config["eval"].update(ensemble="tfidf", ensemble_combiner="logistic")
    with pytest.raises(NewstuneError, match="logistic is for single-label runs"):
        train(validate(config), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_weighted_refit_removes_the_logistic_layer(fresh_stacked):
    # Fails when re-fitting a stacked run as a weighted sum leaves the old layer file behind in the run folder.
    from newstune.training.calibrate import calibrate_run

    assert (fresh_stacked / ENSEMBLE_DIR / STACK_FILE).is_file()
    calibrate_run(fresh_stacked, combiner="weighted")
    assert load_run(fresh_stacked).ensemble.combiner == "weighted"
    assert not (fresh_stacked / ENSEMBLE_DIR / STACK_FILE).exists()


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
