"""The hybrid: the encoder blended with the run's TF-IDF baseline, as part of the run's decision rule.

Both models' logits become log-probabilities at their own temperature (fitted on validation) and are mixed as
(1 - w) * encoder + w * baseline, with w chosen on validation by the run's selection metric, each candidate scored
with the run's own decision rule fitted on validation (`tuning.fit_decision`); test is never read. Multi-label runs
(one-vs-rest baseline, a sigmoid per label) mix each label's temperature-scaled log-odds the same way, and their
per-label thresholds are then fitted on the blend. A weighted sum
of log-probabilities has one parameter to fit on the ~1,300-1,700 validation rows; a stacked logistic layer (the
issue's other candidate) has not been measured against it yet.

The linear model is saved in the run folder without pickle: `ensemble/vocabulary.json` (each TF-IDF view's settings
and vocabulary) and `ensemble/weights.safetensors` (idf vectors, coefficients, intercepts); `decision.json` holds
the weight and the temperatures. Both are validated on load like every run file. scikit-learn fits the vectorisers
and the LinearSVC; what is written by hand is only their transport (a `TfidfVectorizer` rebuilt from its vocabulary
and idf is scikit-learn's own transform, tested to give the same matrix).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from scipy.special import log_softmax
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import FeatureUnion

from newstune.config import EvalSettings
from newstune.data.registry import DatasetBundle
from newstune.decisions.baseline import (
    RECORD_WIDTH,
    ChosenBaseline,
    Features,
    choose_baseline,
    selection_score,
    summary,
)
from newstune.decisions.calibration import fit_temperature
from newstune.decisions.metrics import classification_metrics
from newstune.decisions.tuning import fit_decision
from newstune.errors import NewstuneError

ENSEMBLE_DIR = "ensemble"
VOCABULARY_FILE = "vocabulary.json"
WEIGHTS_FILE = "weights.safetensors"
WEIGHTS = [round(w, 2) for w in np.linspace(0, 1, 21)]
VIEW_KEYS = ("analyzer", "ngram_range", "sublinear_tf", "lowercase")


@dataclass
class LinearTextModel:
    """The baseline's fitted features (TF-IDF views, maybe the LIAR record) and linear classifier."""

    features: Features
    coef: np.ndarray  # (outputs, features); a binary LinearSVC has one output, a multi-label model one per label
    intercept: np.ndarray
    multi_label: bool = False

    @classmethod
    def from_chosen(cls, chosen: ChosenBaseline) -> LinearTextModel:
        model = chosen.model
        if not isinstance(model, OneVsRestClassifier):
            return cls(chosen.features, np.asarray(model.coef_, dtype=np.float64),
                       np.asarray(model.intercept_, dtype=np.float64))
        # one LinearSVC per label; a label constant in training has a constant predictor (no coef_): zeros + its
        # constant margin, which is what its decision_function returns
        rows, intercepts = [], []
        for estimator in model.estimators_:
            if hasattr(estimator, "coef_"):
                rows.append(np.ravel(estimator.coef_))
                intercepts.append(float(np.ravel(estimator.intercept_)[0]))
            else:
                rows.append(np.zeros(chosen.n_features))  # the feature matrix's width, record columns included
                intercepts.append(float(np.ravel(estimator.decision_function(np.zeros((1, 1))))[0]))
        return cls(chosen.features, np.vstack(rows).astype(np.float64), np.asarray(intercepts), multi_label=True)

    @property
    def views(self) -> list[TfidfVectorizer]:
        return [view for _, view in self.features.union.transformer_list]

    def logits(self, texts: list[str]) -> np.ndarray:
        scores = np.asarray(self.features.transform(texts) @ self.coef.T + self.intercept)
        if scores.shape[1] == 1 and not self.multi_label:  # binary: [0, margin], as baseline.margins
            scores = np.hstack([np.zeros_like(scores), scores])
        return scores

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        views = [{**{key: getattr(view, key) for key in VIEW_KEYS},
                  "vocabulary": {term: int(i) for term, i in view.vocabulary_.items()}} for view in self.views]
        (folder / VOCABULARY_FILE).write_text(json.dumps({"views": views, "with_record": self.features.with_record}))
        # C order: safetensors writes an array's buffer as it lies, and liblinear's coef_ is Fortran-ordered
        tensors = {"coef": self.coef, "intercept": self.intercept,
                   **{f"idf_{i}": np.asarray(view.idf_, dtype=np.float64) for i, view in enumerate(self.views)}}
        tensors = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
        save_file(tensors, str(folder / WEIGHTS_FILE))

    @classmethod
    def load(cls, folder: Path, n_labels: int, multi_label: bool = False) -> LinearTextModel:
        """Rebuilt from the run's files; anything inconsistent is one line naming the file."""
        vocab_file, weights_file = folder / VOCABULARY_FILE, folder / WEIGHTS_FILE
        fix = "the run's ensemble files were changed or damaged: restore them, or re-fit with `newstune ensemble RUN`"
        for path in (vocab_file, weights_file):
            if not path.is_file():
                raise NewstuneError(f"{path}: missing, but decision.json blends a TF-IDF model; {fix}")
        try:
            spec = json.loads(vocab_file.read_text(encoding="utf-8"))
            tensors = load_file(str(weights_file))
        except (OSError, ValueError, UnicodeDecodeError, SafetensorError) as err:
            raise NewstuneError(f"{folder}: unreadable ({err.__class__.__name__}); {fix}") from None
        views, width = [], 0
        try:
            for i, view_spec in enumerate(spec["views"]):
                vocabulary, idf = view_spec["vocabulary"], tensors[f"idf_{i}"]
                if not (isinstance(vocabulary, dict) and sorted(vocabulary.values()) == list(range(len(vocabulary)))
                        and idf.shape == (len(vocabulary),) and np.isfinite(idf).all()):
                    raise ValueError(f"view {i}: vocabulary indices or idf length do not match")
                view = TfidfVectorizer(analyzer=view_spec["analyzer"], ngram_range=tuple(view_spec["ngram_range"]),
                                       sublinear_tf=bool(view_spec["sublinear_tf"]),
                                       lowercase=bool(view_spec["lowercase"]), vocabulary=vocabulary)
                view.idf_ = idf
                views.append((view_spec["analyzer"], view))
                width += len(vocabulary)
            with_record = spec["with_record"]
            if not isinstance(with_record, bool):
                raise ValueError("with_record must be true or false")
            width += RECORD_WIDTH if with_record else 0
            coef, intercept = tensors["coef"], tensors["intercept"]
        except (KeyError, TypeError, ValueError) as err:
            raise NewstuneError(f"{vocab_file}: {err}; {fix}") from None
        outputs = 1 if n_labels == 2 and not multi_label else n_labels
        if coef.shape != (outputs, width) or intercept.shape != (outputs,) or not (
                np.isfinite(coef).all() and np.isfinite(intercept).all()):
            raise NewstuneError(f"{weights_file}: coefficients of shape {coef.shape} do not fit {width} features and "
                                f"{n_labels} labels; {fix}")
        return cls(Features(FeatureUnion(views), with_record), coef, intercept, multi_label)


@dataclass
class Ensemble:
    """The blend the run's decision rule starts from: encoder and baseline log-probabilities, mixed."""

    linear: LinearTextModel
    weight: float
    encoder_temperature: float
    baseline_temperature: float

    def combine(self, encoder_logits: np.ndarray, texts: list[str]) -> np.ndarray:
        return mix(encoder_logits, self.linear.logits(texts), self.weight, self.encoder_temperature,
                   self.baseline_temperature, self.linear.multi_label)

    def settings(self) -> dict:
        """What decision.json holds about the blend."""
        return {"method": "tfidf", "weight": self.weight, "encoder_temperature": self.encoder_temperature,
                "baseline_temperature": self.baseline_temperature}


def mix(encoder: np.ndarray, baseline: np.ndarray, weight: float, t_encoder: float, t_baseline: float,
        multi_label: bool = False) -> np.ndarray:
    """(1 - w) * log_softmax(encoder / T_e) + w * log_softmax(baseline / T_b), as float32 logits; multi-label, where
    each label is its own sigmoid, the labels' log-odds: (1 - w) * encoder / T_e + w * baseline / T_b."""
    encoder, baseline = (np.asarray(z, dtype=np.float64) for z in (encoder, baseline))
    if multi_label:
        return ((1 - weight) * encoder / t_encoder + weight * baseline / t_baseline).astype(np.float32)
    return ((1 - weight) * log_softmax(encoder / t_encoder, axis=1)
            + weight * log_softmax(baseline / t_baseline, axis=1)).astype(np.float32)


def fit_ensemble(bundle: DatasetBundle, encoder_validation: np.ndarray, metric: str, settings: EvalSettings,
                 chosen: ChosenBaseline | None = None) -> tuple[Ensemble, dict]:
    """The baseline chosen as in every run (or `chosen`, that choice already made), the temperatures and the weight,
    all on validation only."""
    multi_label = bool(bundle.info.get("multi_label"))
    chosen = chosen or choose_baseline(bundle, metric, settings)
    truth = np.asarray(bundle.splits["validation"].labels)
    baseline_validation = chosen.validation_logits
    t_enc = float(fit_temperature(encoder_validation, truth, multi_label))
    t_lin = float(fit_temperature(baseline_validation, truth, multi_label))
    curve = []
    for weight in WEIGHTS:
        blended = mix(encoder_validation, baseline_validation, weight, t_enc, t_lin, multi_label)
        decision = fit_decision(truth, blended, settings, multi_label)
        curve.append({"weight": weight, metric: selection_score(
            classification_metrics(truth, blended, bundle.label_names, decision), metric)})
    best = max(curve, key=lambda point: (point[metric], -point["weight"]))  # ties: the smaller baseline weight
    ensemble = Ensemble(LinearTextModel.from_chosen(chosen), best["weight"], t_enc, t_lin)
    report = {**ensemble.settings(), "chosen_by": f"validation {metric}", "validation_curve": curve,
              "baseline": {"C": chosen.c, "class_weight": chosen.class_weight or "none"}}
    return ensemble, report


def encoder_alone(labels: dict[str, np.ndarray], encoder: dict[str, np.ndarray], label_names: list[str],
                  settings: EvalSettings, multi_label: bool = False) -> dict:
    """The encoder's figures per split with its own decision rule fitted on validation: what the blend is beside."""
    alone = fit_decision(labels["validation"], encoder["validation"], settings, multi_label)
    return {split: summary(classification_metrics(labels[split], logits, label_names, alone))
            for split, logits in encoder.items()}


def save_ensemble(run_dir: Path, ensemble: Ensemble) -> None:
    ensemble.linear.save(run_dir / ENSEMBLE_DIR)


def load_ensemble(run_dir: Path, settings: dict, n_labels: int, multi_label: bool = False) -> Ensemble:
    linear = LinearTextModel.load(run_dir / ENSEMBLE_DIR, n_labels, multi_label)
    return Ensemble(linear, settings["weight"], settings["encoder_temperature"], settings["baseline_temperature"])
