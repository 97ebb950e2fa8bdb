"""The hybrid: the encoder blended with the run's TF-IDF baseline, as part of the run's decision rule.

Both models' logits become log-probabilities at their own temperature (fitted on validation). `eval.ensemble_combiner`
picks how they are combined:
- `weighted` (the default): (1 - w) * encoder + w * baseline, with w chosen on validation by the run's selection
  metric, each candidate scored with the run's own decision rule fitted on validation (`tuning.fit_decision`).
  Multi-label runs (one-vs-rest baseline, a sigmoid per label) mix each label's temperature-scaled log-odds the same
  way, and their per-label thresholds are then fitted on the blend.
- `logistic`: a stacked logistic layer (scikit-learn's `LogisticRegression`) over both models' log-probabilities,
  2 x classes inputs, its regularisation C chosen by cross-validation on validation. Single-label runs only.
- `auto`: whichever of the two (and which C) scores best by 5-fold cross-validation on validation, repeated 3
  times; ties go to `weighted`, the one with fewer parameters.
Test is never read. The cross-validation is written here rather than with `GridSearchCV` because each candidate is
scored through the run's own decision rule refitted on the training folds, which a scikit-learn scorer cannot do.

The linear model is saved in the run folder without pickle: `ensemble/vocabulary.json` (each TF-IDF view's settings
and vocabulary) and `ensemble/weights.safetensors` (idf vectors, coefficients, intercepts), a logistic layer as
`ensemble/stack.safetensors`; `decision.json` holds the combiner, the weight and the temperatures. All are validated
on load like every run file. scikit-learn fits the vectorisers
and the LinearSVC; what is written by hand is only their transport (a `TfidfVectorizer` rebuilt from its vocabulary
and idf is scikit-learn's own transform, tested to give the same matrix).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from scipy.special import log_softmax
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import FeatureUnion
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

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
from newstune.decisions.rule import Decision, labels, probabilities
from newstune.decisions.tuning import fit_decision
from newstune.errors import NewstuneError

ENSEMBLE_DIR = "ensemble"
VOCABULARY_FILE = "vocabulary.json"
WEIGHTS_FILE = "weights.safetensors"
STACK_FILE = "stack.safetensors"
STACK_C = (0.01, 0.1, 1.0, 10.0)
CANDIDATES = {"weighted": None, **{f"logistic C={c:g}": c for c in STACK_C}}  # name -> C (None: weighted)
CV_FOLDS, CV_REPEATS = 5, 3
WEIGHTS = [round(w, 2) for w in np.linspace(0, 1, 21)]
VIEW_KEYS = ("analyzer", "ngram_range", "sublinear_tf", "lowercase")
FIX = "the run's ensemble files were changed or damaged: restore them, or re-fit with `newstune ensemble RUN`"


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
        for path in (vocab_file, weights_file):
            if not path.is_file():
                raise NewstuneError(f"{path}: missing, but decision.json blends a TF-IDF model; {FIX}")
        try:
            spec = json.loads(vocab_file.read_text(encoding="utf-8"))
            tensors = load_file(str(weights_file))
        except (OSError, ValueError, UnicodeDecodeError, SafetensorError) as err:
            raise NewstuneError(f"{folder}: unreadable ({err.__class__.__name__}); {FIX}") from None
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
            raise NewstuneError(f"{vocab_file}: {err}; {FIX}") from None
        outputs = 1 if n_labels == 2 and not multi_label else n_labels
        if coef.shape != (outputs, width) or intercept.shape != (outputs,) or not (
                np.isfinite(coef).all() and np.isfinite(intercept).all()):
            raise NewstuneError(f"{weights_file}: coefficients of shape {coef.shape} do not fit {width} features and "
                                f"{n_labels} labels; {FIX}")
        return cls(Features(FeatureUnion(views), with_record), coef, intercept, multi_label)


@dataclass
class Stack:
    """The stacked logistic layer: logits = [encoder, baseline log-probabilities] @ coef.T + intercept."""

    coef: np.ndarray  # (outputs, 2 * classes); binary runs have one output, the log-odds of class 1
    intercept: np.ndarray  # (outputs,)
    c: float

    @classmethod
    def fit(cls, features: np.ndarray, truth: np.ndarray, n_classes: int, c: float) -> Stack:
        """Fitted on standardised features (lbfgs converges in ~100 steps instead of failing at 2,000 on raw
        log-probabilities), then folded back so that `logits` reads the raw ones."""
        present = np.unique(truth).astype(int)
        if len(present) < 2:  # one class in these rows: a constant prediction of it
            coef = np.zeros((1 if n_classes == 2 else n_classes, features.shape[1]))
            intercept = (np.array([20.0 if present[0] == 1 else -20.0]) if n_classes == 2
                         else np.where(np.arange(n_classes) == present[0], 0.0, -20.0))
            return cls(coef, intercept, c)
        scaler = StandardScaler().fit(features)
        # one BLAS thread: with torch's OpenMP runtime loaded, two threads made this fit ~30x slower on 2 cores
        with threadpool_limits(1):
            model = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(features), truth)
        raw_coef = model.coef_ / scaler.scale_
        raw_intercept = model.intercept_ - raw_coef @ scaler.mean_
        if n_classes == 2:
            return cls(raw_coef.astype(np.float64), raw_intercept.astype(np.float64), c)
        coef, intercept = np.zeros((n_classes, features.shape[1])), np.zeros(n_classes)
        if len(present) == 2:  # scikit-learn fits one row for two classes: class b's log-odds over class a
            coef[present[1]], intercept[present[1]] = raw_coef[0], raw_intercept[0]
        else:
            coef[present], intercept[present] = raw_coef, raw_intercept
        # a class absent from these rows (a rare class, a cross-validation fold) is never predicted
        intercept[np.setdiff1d(np.arange(n_classes), present)] = intercept[present].min() - 20.0
        return cls(coef, intercept, c)

    def save(self, path: Path) -> None:
        save_file({"coef": np.ascontiguousarray(self.coef), "intercept": np.ascontiguousarray(self.intercept),
                   "C": np.array([self.c])}, str(path))

    @classmethod
    def load(cls, path: Path, n_labels: int) -> Stack:
        """The saved layer, checked against the run's labels; anything else is one line naming the file."""
        if not path.is_file():
            raise NewstuneError(f"{path}: missing, but decision.json combines with a logistic layer; {FIX}")
        try:
            tensors = load_file(str(path))
            coef, intercept, c = (np.asarray(tensors[k], dtype=np.float64) for k in ("coef", "intercept", "C"))
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
            raise NewstuneError(f"{path}: unreadable ({err.__class__.__name__}); {FIX}") from None
        outputs = 1 if n_labels == 2 else n_labels
        if coef.shape != (outputs, 2 * n_labels) or intercept.shape != (outputs,) or c.shape != (1,):
            raise NewstuneError(f"{path}: a logistic layer of shape {coef.shape} does not fit {n_labels} labels; "
                                f"{FIX}")
        # log-probabilities are bounded, so no fitted weight comes near 1e6: larger is a changed file (and would
        # overflow float32 logits into NaN probabilities)
        if not all(np.isfinite(a).all() and np.abs(a).max() < 1e6 for a in (coef, intercept)) or not c[0] > 0:
            raise NewstuneError(f"{path}: the logistic layer holds non-finite or out-of-range values; {FIX}")
        return cls(coef, intercept, float(c[0]))

    def logits(self, features: np.ndarray) -> np.ndarray:
        scores = features @ self.coef.T + self.intercept
        if scores.shape[1] == 1:  # binary: [0, log-odds], as the encoder's two logits
            scores = np.hstack([np.zeros_like(scores), scores])
        return scores.astype(np.float32)


def stack_features(encoder: np.ndarray, baseline: np.ndarray, t_encoder: float, t_baseline: float) -> np.ndarray:
    """What the logistic layer reads: both models' temperature-scaled log-probabilities, side by side."""
    return np.hstack([log_softmax(np.asarray(encoder, dtype=np.float64) / t_encoder, axis=1),
                      log_softmax(np.asarray(baseline, dtype=np.float64) / t_baseline, axis=1)])


@dataclass
class Ensemble:
    """The blend the run's decision rule starts from: encoder and baseline log-probabilities, combined."""

    linear: LinearTextModel
    weight: float | None  # the weighted sum's baseline weight; None with a logistic layer
    encoder_temperature: float
    baseline_temperature: float
    stack: Stack | None = None

    def combine(self, encoder_logits: np.ndarray, texts: list[str]) -> np.ndarray:
        return self.combine_logits(encoder_logits, self.linear.logits(texts))

    def combine_logits(self, encoder: np.ndarray, baseline: np.ndarray) -> np.ndarray:
        if self.stack is not None:
            return self.stack.logits(stack_features(encoder, baseline, self.encoder_temperature,
                                                    self.baseline_temperature))
        return mix(encoder, baseline, self.weight, self.encoder_temperature, self.baseline_temperature,
                   self.linear.multi_label)

    @property
    def combiner(self) -> str:
        return "weighted" if self.stack is None else "logistic"

    def settings(self) -> dict:
        """What decision.json holds about the blend (a logistic layer's weights are in ensemble/stack.safetensors).
        A weighted sum is written without a combiner key, as before it existed, so older versions still read it."""
        combiner = {} if self.stack is None else {"combiner": "logistic"}
        return {"method": "tfidf", **combiner, "weight": self.weight,
                "encoder_temperature": self.encoder_temperature, "baseline_temperature": self.baseline_temperature}


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
    """The baseline chosen as in every run (or `chosen`, that choice already made), the temperatures, the combiner
    and its weight(s), all on validation only."""
    multi_label = bool(bundle.info.get("multi_label"))
    check_combiner(settings.ensemble_combiner, multi_label)
    combiner = settings.ensemble_combiner
    chosen = chosen or choose_baseline(bundle, metric, settings)
    truth = np.asarray(bundle.splits["validation"].labels)
    baseline_validation = chosen.validation_logits
    linear = LinearTextModel.from_chosen(chosen)
    cv, c = None, None
    if multi_label:
        combiner = "weighted"  # auto: the label-by-label weighted sum is the one combiner multi-label runs have
    elif combiner != "weighted":
        cv = cross_validate(encoder_validation, baseline_validation, truth, linear, bundle.label_names, metric,
                            settings, with_weighted=combiner == "auto")
        combiner, c = pick_combiner(cv)
    ensemble, curve = _fit(combiner, encoder_validation, baseline_validation, truth, linear, bundle.label_names,
                           metric, settings, c)
    report = {**ensemble.settings(), "chosen_by": f"validation {metric}", "validation_curve": curve,
              "baseline": {"C": chosen.c, "class_weight": chosen.class_weight or "none"}}
    if cv is not None:
        scored = "macro_f1" if metric == "loss" else metric  # selection_score's own rule
        report["cross_validation"] = {"folds": cv_folds(truth), "repeats": CV_REPEATS, "mean_" + scored: cv}
    if ensemble.stack is not None:
        report["stack_C"] = ensemble.stack.c
    return ensemble, report


def check_combiner(combiner: str, multi_label: bool) -> None:
    """A multi-label run cannot take the logistic layer (a softmax across independent labels): one line."""
    if combiner == "logistic" and multi_label:
        raise NewstuneError("eval.ensemble_combiner: logistic is for single-label runs; a multi-label run blends "
                            "label by label: use weighted (or auto)")


def pick_combiner(cv: dict[str, float]) -> tuple[str, float | None]:
    """The best cross-validated candidate; ties go to the weighted sum, then to the smaller C (fewer effective
    parameters)."""
    pick = max(cv, key=lambda name: (cv[name], CANDIDATES[name] is None, -(CANDIDATES[name] or 0.0)))
    return ("weighted", None) if CANDIDATES[pick] is None else ("logistic", CANDIDATES[pick])


def _fit(combiner: str, encoder: np.ndarray, baseline: np.ndarray, truth: np.ndarray, linear: LinearTextModel,
         label_names: list[str], metric: str, settings: EvalSettings, c: float | None = None,
         temperatures: tuple[float, float] | None = None) -> tuple[Ensemble, list[dict]]:
    """One combiner fitted on these rows; the weighted sum's weight by the selection metric under the run's
    decision rule (its curve returned), the logistic layer at C."""
    multi_label = linear.multi_label
    t_enc, t_lin = temperatures or _temperatures(encoder, baseline, truth, multi_label)
    if combiner == "logistic":
        stack = Stack.fit(stack_features(encoder, baseline, t_enc, t_lin), truth, len(label_names), c)
        return Ensemble(linear, None, t_enc, t_lin, stack), []
    curve = []
    for weight in WEIGHTS:
        blended = mix(encoder, baseline, weight, t_enc, t_lin, multi_label)
        curve.append({"weight": weight, metric: _score(truth, blended, label_names, metric,
                                                       fit_decision(truth, blended, settings, multi_label))})
    best = max(curve, key=lambda point: (point[metric], -point["weight"]))  # ties: the smaller baseline weight
    return Ensemble(linear, best["weight"], t_enc, t_lin), curve


def _temperatures(encoder: np.ndarray, baseline: np.ndarray, truth: np.ndarray, multi_label: bool
                  ) -> tuple[float, float]:
    return (float(fit_temperature(encoder, truth, multi_label)), float(fit_temperature(baseline, truth, multi_label)))


def _score(truth: np.ndarray, logits: np.ndarray, label_names: list[str], metric: str, decision: Decision) -> float:
    if metric in ("accuracy", "macro_f1") and not decision.multi_label:  # the two figures alone, ~10x faster
        decided = labels(probabilities(logits, decision), decision)
        if metric == "accuracy":
            return float(np.mean(decided == truth))
        return float(f1_score(truth, decided, labels=list(range(len(label_names))), average="macro",
                              zero_division=0))
    return selection_score(classification_metrics(truth, logits, label_names, decision), metric)


def cv_folds(truth: np.ndarray) -> int:
    """CV_FOLDS, or fewer where not even the largest class has that many rows."""
    return max(2, min(CV_FOLDS, int(np.bincount(truth).max())))


def cross_validate(encoder: np.ndarray, baseline: np.ndarray, truth: np.ndarray, linear: LinearTextModel,
                   label_names: list[str], metric: str, settings: EvalSettings, with_weighted: bool = True
                   ) -> dict[str, float]:
    """Mean held-out selection metric of each candidate combiner over stratified folds of the validation rows:
    each fitted on the other folds, its decision rule too. Class-bias tuning is left out here (it would cost
    minutes per candidate) and applies to the final fit as configured; so is calibration (a temperature does not
    move an argmax, the threshold grid moves little, and `loss` runs select by macro-F1 here as the baseline does)."""
    settings = settings.model_copy(update={"tune_class_bias": False, "calibration": "none"})
    names = [name for name, c in CANDIDATES.items() if with_weighted or c is not None]
    scores: dict[str, list[float]] = {name: [] for name in names}
    folds = cv_folds(truth)
    for repeat in range(CV_REPEATS):
        with warnings.catch_warnings():  # a class rarer than the folds lands in some of them only: that is fine
            warnings.simplefilter("ignore", UserWarning)
            splits = list(StratifiedKFold(folds, shuffle=True, random_state=repeat).split(encoder, truth))
        for train, held in splits:
            temperatures = _temperatures(encoder[train], baseline[train], truth[train], False)
            for name in names:
                c = CANDIDATES[name]
                fitted, _ = _fit("weighted" if c is None else "logistic", encoder[train], baseline[train],
                                 truth[train], linear, label_names, metric, settings, c, temperatures)
                decision = fit_decision(truth[train], fitted.combine_logits(encoder[train], baseline[train]),
                                        settings, False)
                scores[name].append(_score(truth[held], fitted.combine_logits(encoder[held], baseline[held]),
                                           label_names, metric, decision))
    return {name: round(float(np.mean(values)), 6) for name, values in scores.items()}


def encoder_alone(labels: dict[str, np.ndarray], encoder: dict[str, np.ndarray], label_names: list[str],
                  settings: EvalSettings, multi_label: bool = False) -> dict:
    """The encoder's figures per split with its own decision rule fitted on validation: what the blend is beside."""
    alone = fit_decision(labels["validation"], encoder["validation"], settings, multi_label)
    return {split: summary(classification_metrics(labels[split], logits, label_names, alone))
            for split, logits in encoder.items()}


def save_ensemble(run_dir: Path, ensemble: Ensemble) -> None:
    folder = run_dir / ENSEMBLE_DIR
    ensemble.linear.save(folder)
    if ensemble.stack is None:
        (folder / STACK_FILE).unlink(missing_ok=True)  # a weighted refit leaves no stale layer behind
    else:
        ensemble.stack.save(folder / STACK_FILE)


def load_ensemble(run_dir: Path, settings: dict, n_labels: int, multi_label: bool = False) -> Ensemble:
    linear = LinearTextModel.load(run_dir / ENSEMBLE_DIR, n_labels, multi_label)
    stack = None
    if settings.get("combiner", "weighted") == "logistic":
        stack = Stack.load(run_dir / ENSEMBLE_DIR / STACK_FILE, n_labels)
    return Ensemble(linear, settings["weight"], settings["encoder_temperature"], settings["baseline_temperature"],
                    stack)
