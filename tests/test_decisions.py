"""Calibration, per-class decisions, multi-label runs and model cards (issue 15), on tiny models."""

import json
import random

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient

from newstune.config import validate
from newstune.data.splits import split_label_set
from newstune.decisions import rule as decisions
from newstune.decisions.calibration import fit_temperature
from newstune.decisions.metrics import calibration_scores, expected_calibration_error, reliability_bins
from newstune.decisions.rule import Decision
from newstune.decisions.tuning import tune_class_bias, tune_label_thresholds
from newstune.errors import NewstuneError
from newstune.inference.export import export_merged
from newstune.inference.predict import predict_file
from newstune.rundir.run import load_run, read_metrics
from newstune.serving.serve import create_app, load_served
from newstune.training.calibrate import calibrate_run
from newstune.training.train import train

from .conftest import FILLER, TOPICS, synthetic_rows, tiny_config, write_csv


def nll(logits: np.ndarray, labels: np.ndarray, decision: Decision) -> float:
    probs = decisions.probabilities(logits, decision)
    return float(-np.log(probs[np.arange(len(labels)), labels]).mean())


# ---------------------------------------------------------------- calibration


def test_ece_of_hand_made_bins():
    # scikit-learn's bins are closed on the right: (0.533, 0.6] holds the two texts at 0.6, one right -> |0.5 - 0.6|;
    # (0.933, 1] the two at 0.95, both right; and 0.6 exactly sits in the lower bin, not with 0.61 (counts below)
    confidence = np.array([0.6, 0.6, 0.95, 0.95])
    outcome = np.array([1.0, 0.0, 1.0, 1.0])
    assert expected_calibration_error(confidence, outcome) == pytest.approx(0.5 * 0.1 + 0.5 * 0.05)
    points = reliability_bins(np.array([0.6, 0.61, 0.95]), np.array([1.0, 0.0, 1.0]))
    assert [count for _, _, count in points] == [1, 1, 1]  # fails if an edge value shares a bin with 0.61


def test_temperature_scaling_lowers_the_nll_of_an_over_confident_model():
    """Calibrated logits (each label drawn from their own softmax) times 8: far too sure of themselves. The fitted T
    undoes it (~8). Synthetic, so that the test does not hang on how confident a tiny training run happens to be."""
    rng = np.random.default_rng(0)
    calibrated = rng.normal(0.0, 1.5, (600, 3))
    probs = np.exp(calibrated) / np.exp(calibrated).sum(1, keepdims=True)
    labels = np.array([rng.choice(3, p=row) for row in probs])
    logits = calibrated * 8.0
    temperature = fit_temperature(logits, labels)
    assert 5.0 < temperature < 12.0
    before, after = nll(logits, labels, Decision()), nll(logits, labels, Decision(temperature=temperature))
    assert after < before * 0.8
    assert after <= nll(logits, labels, Decision(temperature=temperature * 1.2)) + 1e-9  # a minimum, not any T
    vector = fit_temperature(logits, labels, per_class=True)
    assert len(vector) == 3 and nll(logits, labels, Decision(temperature=vector)) < before


def test_every_run_reports_calibration_before_and_after(tiny_models, tiny_data, tmp_path):
    run_dir, metrics = train(validate(tiny_config(tiny_models["bert"], tiny_data)), tmp_path / "run")
    calibration = metrics["calibration"]
    for split in ("validation", "test"):
        assert {"ece_before", "ece_after", "brier_before", "brier_after", "log_loss_before",
                "log_loss_after"} <= set(calibration[split])
        assert metrics[split]["ece"] == pytest.approx(calibration[split]["ece_after"])
    # fitted on validation: its log loss cannot get worse (T = 1 is kept when the fit does not help)
    assert calibration["validation"]["log_loss_after"] <= calibration["validation"]["log_loss_before"] + 1e-9
    assert (run_dir / "reliability_test.png").stat().st_size > 1000
    assert json.loads((run_dir / "decision.json").read_text())["temperature"] == calibration["temperature"]


def test_calibration_never_reads_the_test_split(tiny_models, tmp_path, monkeypatch):
    import newstune.training.steps

    for name, n, seed in (("train.csv", 300, 1), ("valid.csv", 60, 2), ("test.csv", 45, 3)):
        write_csv(tmp_path / name, synthetic_rows(n, seed))
    seen = []
    real = newstune.training.steps.fit_decision
    monkeypatch.setattr(newstune.training.steps, "fit_decision", lambda y, z, *a: seen.append(len(y)) or real(y, z, *a))
    train(validate(tiny_config(tiny_models["bert"], tmp_path, **{"train.epochs": 1})), tmp_path / "run")
    assert seen == [60]  # validation only; the 45 test rows never reach the fit


# ---------------------------------------------------------------- decision rules


def test_class_bias_recovers_a_suppressed_class():
    rng = np.random.default_rng(0)
    truth = np.repeat([0, 1, 2], 50)
    probs = np.full((150, 3), 0.1)
    probs[np.arange(150), truth] = 0.5
    probs[truth == 2, 0] = 0.55  # class 2 always loses to class 0 by a little
    probs += rng.uniform(0, 0.01, probs.shape)
    probs /= probs.sum(1, keepdims=True)
    bias = tune_class_bias(truth, probs)
    decided = decisions.labels(probs, Decision(class_bias=bias))
    assert (decisions.labels(probs) == 2).sum() == 0 and (decided == truth).mean() == 1.0
    assert bias[1] == 0.0  # an offset that does not help is not taken


def test_label_thresholds_are_tuned_per_label():
    truth = np.array([[1, 0], [1, 0], [0, 1], [0, 0]])
    probs = np.array([[0.3, 0.1], [0.35, 0.2], [0.1, 0.9], [0.2, 0.6]])
    thresholds = tune_label_thresholds(truth, probs)
    assert 0.2 < thresholds[0] <= 0.3 and 0.6 < thresholds[1] <= 0.9
    decided = decisions.labels(probs, Decision(multi_label=True, label_thresholds=thresholds))
    assert (decided == truth).all()


def test_decision_round_trips_and_rejects_unknown_keys():
    decision = Decision(temperature=[1.5, 0.5, 2.0], class_bias=[0.0, 0.2, -0.4], calibration="vector")
    assert Decision.from_dict(json.loads(json.dumps(decision.to_dict()))) == decision
    with pytest.raises(NewstuneError, match="unknown decision key"):
        Decision.from_dict({"temprature": 2.0})


@pytest.mark.parametrize("cell, expected", [
    ("economy,jobs", ("economy", "jobs")), ('["a", "b", "a"]', ("a", "b")), ("", ()), (" x | y ", ("x", "y")),
])
def test_label_cells_split_into_sets(cell, expected):
    assert split_label_set(cell, "," if "," in cell and "[" not in cell else "|") == expected


def test_a_broken_json_label_list_is_one_clear_error():
    with pytest.raises(NewstuneError, match="not a JSON list"):
        split_label_set('["a", "b"', "|")


@pytest.fixture(scope="module")
def biased_run(tiny_models, tiny_data, tmp_path_factory):
    """A 3-class run with vector scaling and tuned class biases."""
    config = tiny_config(tiny_models["bert"], tiny_data, **{"train.epochs": 1})
    config["eval"].update({"calibration": "vector", "tune_class_bias": True})
    run_dir, _ = train(validate(config), tmp_path_factory.mktemp("biased") / "run")
    return run_dir


def test_biases_and_temperatures_round_trip_through_predict_serve_and_export(biased_run, tmp_path):
    run = load_run(biased_run)
    assert run.decision == Decision.from_dict(read_metrics(biased_run)["decision"])
    assert isinstance(run.decision.temperature, list) and run.decision.class_bias is not None
    texts = [text for text, _ in synthetic_rows(30, 11)]
    logits = run.scorer.logits(run.tokenizer(texts)["input_ids"])
    probs = decisions.probabilities(logits, run.decision)
    expected = [run.label_names[i] for i in decisions.labels(probs, run.decision)]
    source = write_csv(tmp_path / "in.csv", [(t, "") for t in texts])
    predict_file(run, source, tmp_path / "out.jsonl")
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["predicted_label"] for o in out] == expected
    assert np.allclose([list(o["probabilities"].values()) for o in out], probs, atol=1e-6)
    with TestClient(create_app(load_served([f"t={biased_run}"]))) as client:
        results = client.post("/v1/classify", json={"model": "t", "texts": texts}).json()["results"]
    assert [r["label"] for r in results] == expected and "labels" not in results[0]
    export_merged(biased_run, tmp_path / "merged")
    carried = json.loads((tmp_path / "merged" / "newstune.json").read_text())["decision"]
    assert Decision.from_dict(carried) == run.decision


def test_the_binary_threshold_applies_to_calibrated_probabilities(tiny_models, tmp_path):
    data = tmp_path / "bin"
    data.mkdir()
    for name, seed in (("train.csv", 1), ("valid.csv", 2), ("test.csv", 3)):
        write_csv(data / name, [r for r in synthetic_rows(150, seed) if r[1] != "science"])
    run_dir, metrics = train(validate(tiny_config(tiny_models["bert"], data, **{"train.epochs": 1})), tmp_path / "r")
    run = load_run(run_dir)
    assert run.threshold == run.decision.threshold == metrics["threshold"] is not None
    probs = decisions.probabilities(np.array([[0.0, 0.1], [0.3, 0.0]]), run.decision)
    assert list(decisions.labels(probs, run.decision)) == list((probs[:, 1] >= run.threshold).astype(int))


def test_a_run_without_decision_file_keeps_todays_behaviour(biased_run, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(biased_run, old)
    (old / "decision.json").unlink()
    run = load_run(old)
    assert run.decision == Decision(threshold=None)
    logits = np.array([[2.0, 1.0, 0.0]])
    assert np.allclose(decisions.probabilities(logits, run.decision), np.exp(logits) / np.exp(logits).sum())


def test_calibrate_refits_an_old_run_and_keeps_its_earlier_metrics(biased_run, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(biased_run, old)
    (old / "decision.json").unlink()
    metrics = read_metrics(old)
    for key in ("calibration", "decision"):
        metrics.pop(key)
    (old / "metrics.json").write_text(json.dumps(metrics))
    result = calibrate_run(old, method="temperature", tune_class_bias=False)
    backups = list(old.glob("metrics.before-calibrate-*.json"))
    assert len(backups) == 1 and json.loads(backups[0].read_text()) == metrics
    new = read_metrics(old)
    assert new["efficiency"] == metrics["efficiency"]  # nothing else is lost
    assert new["calibration"]["method"] in ("temperature", "none") and "ece_after" in new["calibration"]["test"]
    # the tiny run's temperature lowers the log loss but bins worse: dropped, never a worse validation ECE
    assert new["calibration"]["validation"]["ece_after"] <= new["calibration"]["validation"]["ece_before"]
    assert load_run(old).decision == Decision.from_dict(new["decision"]) == Decision.from_dict(
        result["metrics"]["decision"])
    calibrate_run(old)  # a second refit keeps both earlier files
    assert len(list(old.glob("metrics.before-calibrate-*.json"))) == 2


# ---------------------------------------------------------------- model card


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_matches_metrics(biased_run):
    card = (biased_run / "model" / "README.md").read_text()
    metrics = read_metrics(biased_run)
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-classification"
    results = {r["name"]: r["value"] for r in meta["model-index"][0]["results"][0]["metrics"]}
    assert results["test accuracy"] == round(metrics["test"]["accuracy"], 4)
    assert results["test macro-F1"] == round(metrics["test"]["macro_f1"], 4)
    assert results["test ECE (15 bins, calibrated)"] == round(metrics["test"]["ece"], 4)
    for name, scores in metrics["test"]["per_class"].items():
        assert f"| {name} | {scores['precision']:.4f} | {scores['recall']:.4f} | {scores['f1']:.4f} |" in card
    cal = metrics["calibration"]["test"]
    assert f"| test | {cal['ece_before']:.4f} | {cal['ece_after']:.4f} |" in card
    assert f"{metrics['efficiency']['trainable_params']}" in card
    assert "Leaky run" not in card


def test_a_leaky_run_says_so_in_its_card(biased_run, tmp_path):
    import shutil

    from newstune.reporting.card import write_card

    leaky = tmp_path / "leaky"
    shutil.copytree(biased_run, leaky)
    metrics = read_metrics(leaky)
    (leaky / "metrics.json").write_text(json.dumps({**metrics, "leaky": True}))
    assert "Leaky run" in write_card(leaky).read_text()


# ---------------------------------------------------------------- multi-label


def multi_label_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """Texts about one or two topics, labelled with the set of their topics ('a|b')."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topics = sorted(rng.sample(list(TOPICS), rng.choice([1, 1, 2])))
        words = [w for t in topics for w in rng.choices(TOPICS[t], k=3)] + rng.choices(FILLER, k=4)
        rng.shuffle(words)
        rows.append((" ".join(words), "|".join(topics)))
    return rows


@pytest.fixture(scope="module")
def multi_label_run(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    for name, n, seed in (("train.csv", 480, 1), ("valid.csv", 90, 2), ("test.csv", 90, 3)):
        write_csv(root / name, multi_label_rows(n, seed))
    config = tiny_config(tiny_models["bert"], root, **{"train.epochs": 10})
    config["data"]["multi_label"] = True
    config["train"]["class_weights"] = "auto"
    run_dir, metrics = train(validate(config), root / "run")
    return run_dir, metrics


def test_multi_label_run_end_to_end(multi_label_run, tmp_path):
    run_dir, metrics = multi_label_run
    test = metrics["test"]
    assert {"micro_f1", "macro_f1", "subset_accuracy", "hamming_loss", "ece"} <= set(test)
    assert test["micro_f1"] > 0.8 and test["hamming_loss"] < 0.15  # the tiny task is learnable
    assert sum(c["support"] for c in test["per_class"].values()) > test["n"]  # some texts carry two labels
    run = load_run(run_dir)
    assert run.decision.multi_label and len(run.decision.label_thresholds) == 3
    texts = ["goal match team stock market shares", "space planet nasa research"]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    predict_file(run, source, tmp_path / "out.jsonl")
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert out[0]["predicted_label"] == ["business", "sports"] and out[1]["predicted_label"] == ["science"]
    predict_file(run, source, tmp_path / "out.csv")
    assert "business|sports" in (tmp_path / "out.csv").read_text()
    with TestClient(create_app(load_served([f"tags={run_dir}"]))) as client:
        assert client.get("/v1/models").json()[0]["multi_label"] is True
        results = client.post("/v1/classify", json={"model": "tags", "texts": texts}).json()["results"]
    assert [r["labels"] for r in results] == [o["predicted_label"] for o in out]
    assert "label" not in results[0]
    assert results[0]["probabilities"] == out[0]["probabilities"]


def test_multi_label_model_card_and_export_say_multi_label(multi_label_run, tmp_path):
    run_dir, metrics = multi_label_run
    card = (run_dir / "model" / "README.md").read_text()
    meta = front_matter(card)
    assert "multi-label" in meta["tags"]
    results = {r["name"]: r["value"] for r in meta["model-index"][0]["results"][0]["metrics"]}
    assert results["test micro-F1"] == round(metrics["test"]["micro_f1"], 4)
    assert results["test Hamming loss"] == round(metrics["test"]["hamming_loss"], 4)
    export_merged(run_dir, tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"


def test_multi_label_positive_weights_reach_the_loss(tiny_models, tmp_path):
    from newstune.data.splits import positive_weights
    from newstune.training.train import Trainer

    assert positive_weights([(1, 0), (1, 1), (0, 0), (0, 0)]) == [1.0, 3.0]
    for name, n, seed in (("train.csv", 120, 1), ("valid.csv", 30, 2), ("test.csv", 30, 3)):
        write_csv(tmp_path / name, multi_label_rows(n, seed))
    config = tiny_config(tiny_models["bert"], tmp_path)
    config["data"]["multi_label"] = True
    config["train"]["class_weights"] = "auto"
    trainer = Trainer(validate(config), None)
    trainer.setup()
    expected = positive_weights(trainer.bundle.splits["train"].labels)
    assert trainer.loss_fn.pos_weight.tolist() == pytest.approx(expected)
    assert min(expected) > 1.0  # each topic is on in a minority of texts


def test_multi_label_calibration_scores_every_label():
    truth = np.array([[1, 0], [0, 1]])
    probs = np.array([[0.9, 0.2], [0.1, 0.7]])
    scores = calibration_scores(truth, probs, Decision(multi_label=True))
    assert scores["brier"] == pytest.approx(np.mean((probs - truth) ** 2))


def test_vector_scaling_offsets_undo_a_prior_shift_that_a_temperature_cannot():
    """Class weights shift a binary model's logits toward the rare class: an offset fixes it, a temperature not."""
    from newstune.decisions.calibration import fit_scaling

    rng = np.random.default_rng(1)
    margin = rng.normal(0, 2, 4000)
    labels = (rng.uniform(size=4000) < 1 / (1 + np.exp(-margin))).astype(int)
    logits = np.stack([np.zeros(4000), margin + 1.5], axis=1)  # calibrated, then shifted by +1.5
    temperature = fit_temperature(logits, labels)
    vector_t, offsets = fit_scaling(logits, labels, per_class=True, offsets=True)
    vector = Decision(temperature=vector_t, logit_bias=offsets)
    assert (offsets[1] - offsets[0]) == pytest.approx(-1.5, abs=0.25)
    assert nll(logits, labels, vector) < nll(logits, labels, Decision(temperature=temperature)) - 0.01
    assert Decision.from_dict(vector.to_dict()) == vector


@pytest.mark.parametrize("tampered", [{"temperature": -1.0}, {"temperature": 0.0}, {"temperature": [1.0, 0.0]},
                                      {"temperature": "hot"}, {"threshold": 1.5}, {"threshold": float("nan")},
                                      {"class_bias": ["x"]}, {"label_thresholds": [2.0]}, {"multi_label": "yes"},
                                      {"calibration": "magic"}, ["not", "a", "dict"]])
def test_a_tampered_decision_is_refused_with_one_line(tampered):
    """Fails if a value that would invert labels (negative temperature) or write NaN probabilities (zero) loads."""
    with pytest.raises(NewstuneError, match="decision.json: .*re-create it"):
        Decision.from_dict(tampered, "run/decision.json")


def test_a_decision_file_that_is_not_json_is_refused(tmp_path):
    from newstune.rundir.run import read_decision

    (tmp_path / "decision.json").write_text("{temperature: ")
    with pytest.raises(NewstuneError, match="decision.json: not valid JSON"):
        read_decision(tmp_path)


def test_a_scaling_that_raises_the_validation_ece_is_dropped(monkeypatch):
    """Fails if a temperature that bins worse on validation is kept and the run (and its card) called calibrated."""
    import newstune.decisions.tuning
    from newstune.config import EvalSettings
    from newstune.decisions.tuning import fit_decision

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 600)
    logits = rng.normal(0, 1, (600, 3))
    logits[np.arange(600), truth] += 1.0  # moderately confident, roughly calibrated
    monkeypatch.setattr(newstune.decisions.tuning, "fit_scaling", lambda *a, **k: (0.1, None))  # 10x over-confident
    decision = fit_decision(truth, logits, EvalSettings(calibration="temperature"), multi_label=False)
    assert decision.calibration == "none" and decision.temperature == 1.0
    monkeypatch.setattr(newstune.decisions.tuning, "fit_scaling", lambda *a, **k: (1.0, None))
    assert fit_decision(truth, logits, EvalSettings(calibration="temperature"), False).calibration == "temperature"


def test_label_names_are_literal_text_in_the_card():
    """Fails if a label name from the data reaches the card's Markdown raw: a `|` splits the table, `<script>`
    renders as HTML on the hub."""
    from newstune.reporting.card import md_text

    assert md_text("<script>alert(1)</script>") == r"\<script\>alert\(1\)\</script\>"
    assert md_text("a|b") == r"a\|b" and md_text("[x](http://e)") == r"\[x\]\(http://e\)"
    assert md_text("line\nbreak") == "line break"
