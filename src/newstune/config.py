"""One typed config for a run: YAML in, validated, overridable with `key=value`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from newstune.errors import NewstuneError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CleanConfig(_Section):
    """Text cleaning applied to every split before tokenization."""

    ag_artifacts: bool = Field(True, description="Fix AG News '#39;', 'quot;', backslash escapes.")
    html: bool = Field(True, description="Strip HTML tags and unescape entities.")
    punctuation: bool = Field(False, description="Normalise curly quotes, dashes, repeated punctuation.")
    lowercase: bool = Field(False, description="Lowercase all text (pointless for cased models' uncased twins).")


class AugmentConfig(_Section):
    """Training-set augmentation. Augmented rows never reach validation or test."""

    seed: int | None = Field(None, description="Augmentation seed; default train.seed.")
    eda: bool = Field(False, description="Easy Data Augmentation (Wei & Zou 2019).")
    eda_copies: int = Field(1, ge=1, le=16, description="Augmented copies per training example.")
    synonym_rate: float = Field(0.1, ge=0, le=1, description="Fraction of words replaced by WordNet synonyms.")
    insert_rate: float = Field(0.1, ge=0, le=1, description="Fraction of words inserted (synonyms of others).")
    swap_rate: float = Field(0.1, ge=0, le=1, description="Fraction of word pairs swapped.")
    delete_rate: float = Field(0.1, ge=0, le=1, description="Probability each word is deleted.")
    synthetic_file: Path | None = Field(None, description="JSONL of generated rows (newstune generate).")
    wordnet_dir: Path | None = Field(None, description="NLTK data folder holding corpora/wordnet.zip.")


class DataConfig(_Section):
    """Which dataset, where it lives, how text is built and split."""

    name: Literal["ag_news", "liar", "huffpost", "files", "liar_subjects"] = Field(
        description="Dataset loader; liar_subjects: LIAR statements -> their subjects (multi-label).")
    dir: Path | None = Field(
        None, description="Folder with the dataset files; else $NEWSTUNE_DATA/<name>; else the HF hub."
    )
    train_file: Path | None = Field(None, description="files: training file (CSV/TSV/JSONL, maybe .gz).")
    valid_file: Path | None = Field(None, description="files: validation file; else split from train.")
    test_file: Path | None = Field(None, description="files: test file; else split from train.")
    text_columns: list[str] = Field(default_factory=lambda: ["text"], description="files: text columns.")
    text_template: str | None = Field(None, description="files: e.g. '{title}. {body}'; default joins with ' '.")
    label_column: str = Field("label", description="files: label column (strings or integers).")
    label_names: list[str] | None = Field(None, description="Fix the label order (else sorted from train).")
    multi_label: bool = Field(False, description="files: each label cell holds several labels (label_separator "
                              "or a JSON list); sigmoid outputs, BCE loss, per-label thresholds.")
    label_separator: str = Field("|", min_length=1, description="multi_label: separator inside a label cell.")
    top_labels: int | None = Field(None, ge=2, description="multi_label: keep the N most frequent training labels; "
                                   "other labels are dropped, and rows left with none are left out.")
    labels: Literal["six", "binary"] = Field("binary", description="liar: six-way or fake/true.")
    metadata_fields: list[str] = Field(
        default_factory=lambda: ["speaker", "job", "state", "party", "subject", "context"],
        description="liar: metadata written into the text.",
    )
    credit_history: Literal["off", "raw", "exclude_self", "train_record"] = Field(
        "off", description="liar: the speaker's record in the text. raw: the five counts as given (they include "
        "the statement's own label: leaky). exclude_self: the counts minus the statement's own label (still "
        "leaky: a recurring speaker's counts then differ by label). train_record: the speaker's ratings on other "
        "training statements (out-of-fold for training rows): leak-free.")
    merge_categories: bool = Field(False, description="huffpost: merge near-duplicate categories.")
    min_class_count: int = Field(0, ge=0, description="Drop classes with fewer training rows than this.")
    valid_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of train held out when no valid split.")
    test_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of train held out when no test split.")
    holdout_fraction: float = Field(
        0.0, ge=0, lt=0.5, description="Share of the training file kept out of training and of every choice (a "
        "fixed stratified slice, the same for every seed and run), scored after training as split 'holdout': a "
        "guard against tuning to test.")
    max_train_rows: int | None = Field(None, ge=1, description="Stratified subset of train (quick runs).")
    max_eval_rows: int | None = Field(None, ge=1, description="Stratified subset of validation and test.")
    drop_empty: bool = Field(False, description="Drop rows with empty text instead of failing.")
    max_length: int = Field(128, ge=8, le=4096, description="Tokens per text after truncation.")
    clean: CleanConfig = Field(default_factory=CleanConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @field_validator("credit_history", mode="before")
    @classmethod
    def _history_from_bool(cls, value: Any) -> Any:
        # Recipes from before the modes existed said true/false.
        return {True: "raw", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _files_need_train(self) -> DataConfig:
        if self.name == "files" and self.train_file is None:
            raise ValueError("data.name 'files' needs data.train_file")
        return self


class LoraSettings(_Section):
    """Parameter-efficient fine-tuning; method 'full' trains every weight."""

    method: Literal["lora", "full"] = Field("lora", description="'lora' adapters or 'full' fine-tuning.")
    r: int = Field(8, ge=1, le=512, description="LoRA rank.")
    alpha: float = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        None, description="Module names, or shorthand 'qv'/'qkv'/'all'; default by architecture."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    top_layers: int | None = Field(
        None, ge=1, description="LoRA only in the top N encoder layers (default: every layer)."
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


class ModelSettings(_Section):
    name: str = Field(description="Hub id, local folder, or alias: minilm, mpnet.")
    attn_implementation: Literal["auto", "sdpa", "eager"] = Field(
        "auto", description="Attention kernel; auto = SDPA where the architecture has it (not MPNet), else eager.")


class TrainSettings(_Section):
    epochs: float = Field(3, gt=0, description="Epochs (fractions allowed for quick runs).")
    batch_size: int = Field(16, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    head_lr: float | None = Field(None, gt=0, description="Learning rate of the head; default lr.")
    layer_lr_decay: float | None = Field(
        None, gt=0, le=1, description="Layer-wise learning-rate decay: encoder layer i of L trains at "
        "lr * decay^(L - i), the embeddings at lr * decay^(L + 1), the head at lr (or head_lr); none = one lr.")
    weight_decay: float = Field(0.01, ge=0)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    class_weights: Literal["none", "auto"] | list[float] = Field(
        "none", description="'auto' = inverse train frequency, or one weight per class; multi-label: positive-class "
        "weights (auto = negatives / positives of each label)."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    bf16_frozen_weights: bool = Field(
        True, description="LoRA + bf16: hold frozen base weights in bf16 once instead of re-casting each step."
    )
    group_by_length: bool = Field(True, description="Batch texts of similar length (less padding).")
    attention_dropout: Literal["probabilities", "context"] = Field(
        "probabilities", description="Where attention dropout applies: on the attention probabilities (as the "
        "model was pre-trained), or 'context': on the attention output before its projection, with the attention "
        "trained in CPU SDPA's fused kernel in fp32 (BERT-style layers; a different regulariser: on the AG News main "
        "recipe, which sets it, 1.21x faster at validation accuracy equal within one spread; docs/performance.md).")
    bf16_norm_output: bool = Field(False, description="CPU autocast: LayerNorm returns bf16 (fp32 statistics), "
                                   "so a full fine-tune's residual stream is held in bf16 instead of fp32 and the "
                                   "linear layers reading it stop casting it each (measured 1.03x; off).")
    fused_adamw: bool = Field(True, description="AdamW's fused kernel (one pass over every parameter, CPU and "
                              "CUDA) instead of torch's default path (a per-tensor loop on CPU); same update up to "
                              "rounding.")
    fast_dropout: bool = Field(True, description="CPU: dropout masks from 16-bit random slices (~3x faster "
                               "mask generation; p exact to 1/65536). GPUs keep torch's fused dropout.")
    first_token_last_layer: bool = Field(
        True, description="Run the last encoder layer for token 0 only, the one position a BERT/RoBERTa/MPNet "
        "classification head reads (same outputs, ~1/6 less compute for a 6-layer model); other models: ignored.")
    eval_every_epoch: bool = True
    eval_every_steps: int | None = Field(
        None, ge=1, description="Also evaluate validation every N optimizer steps (time-to-accuracy curves, "
        "model selection and early stopping inside long epochs).")
    metric: Literal["accuracy", "macro_f1", "loss"] = Field("macro_f1", description="Model selection metric.")
    early_stopping_patience: int | None = Field(None, ge=1, description="Evaluations without improvement.")
    checkpoint_every_steps: int | None = Field(None, ge=1, description="Also checkpoint mid-epoch.")
    seed: int = 42
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; default physical cores.")
    compile: bool = Field(False, description="torch.compile the model (inductor).")
    cache_frozen_layers: bool = Field(
        False, description="With lora.top_layers: run the frozen lower layers once per text (without dropout) "
        "and train on their cached output; exact for a model whose lower layers have no dropout.")
    num_workers: int = Field(0, ge=0)
    log_every_steps: int = Field(20, ge=1)
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"], description="Experiment trackers (Accelerate's) that receive every "
        "logged figure and the recipe: tensorboard (run folder/tensorboard), mlflow ($MLFLOW_TRACKING_URI, else a "
        "local SQLite store mlflow.db beside the run folder; `newstune[track]`), wandb (where installed). [] for none.")


class ExtraEvalSet(_Section):
    """Another labelled source evaluated after training (e.g. out-of-distribution), mapped onto the run's labels."""

    name: str = Field(description="Shown as extra:<name> in metrics.json and reports.")
    data: DataConfig
    label_map: dict[str, str] | None = Field(None, description="Source label -> run label; unmapped rows dropped.")


class EvalSettings(_Section):
    tune_threshold: bool = Field(True, description="Binary tasks: tune the decision threshold on validation; "
                                 "multi-label: one threshold per label.")
    calibration: Literal["none", "temperature", "vector"] = Field(
        "temperature", description="Fit on validation after training: one temperature, or a temperature and an "
        "offset per class (vector scaling).")
    tune_class_bias: bool = Field(False, description="Multi-class: per-class offsets on the log-probabilities "
                                  "tuned on validation for macro-F1.")
    baseline: bool = Field(True, description="Also fit the TF-IDF + LinearSVC baseline on the run's train split "
                           "(settings chosen on validation, test scored once) and report it beside the run.")
    ensemble: Literal["none", "tfidf"] = Field(
        "none", description="tfidf: blend the encoder with the run's TF-IDF baseline (log-probabilities, weight and "
        "temperatures chosen on validation; multi-label: each label's log-odds) as part of the decision rule that "
        "evaluate, predict and serve apply.")
    ensemble_combiner: Literal["weighted", "logistic", "auto"] = Field(
        "weighted", description="How eval.ensemble combines the two models: weighted (a weighted sum of "
        "log-probabilities), logistic (a stacked logistic layer over both, single-label runs) or auto (whichever "
        "scores best by cross-validation on validation).")
    latency_samples: int = Field(30, ge=0, description="Single-text forwards timed for the latency figure.")
    test: bool = Field(True, description="Evaluate the test split at the end (sweeps select on validation only).")
    test_curve: bool = Field(False, description="Also evaluate the test split at each validation evaluation, logged as "
                             "kind 'test' in metrics.jsonl for time-to-accuracy curves; no choice reads it.")
    extra: list[ExtraEvalSet] = Field(default_factory=list, description="Extra labelled sets (OOD) to evaluate.")


class DistillSettings(_Section):
    """Knowledge distillation: learn a finished teacher run's softened probabilities as well as the labels."""

    teacher: Path | None = Field(
        None, description="A finished run folder, or a seed group (train --seeds): there the run trained with "
        "train.seed teaches, so no teacher has trained on its student's validation rows.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the soft-label loss (KL at the temperature, "
                         "times temperature^2); 1 - alpha weighs the labels.")
    temperature: float = Field(2.0, gt=0, description="Divides both models' logits in the soft-label loss.")
    unlabelled_file: Path | None = Field(
        None, description="CSV/TSV/JSONL/TXT of extra texts learnt from the teacher only (single-label tasks); "
        "texts also in validation, test or holdout are left out.")
    unlabelled_column: str = Field("text", description="unlabelled_file: the text column (CSV/TSV/JSONL).")
    max_unlabelled: int | None = Field(None, ge=1, description="Use only the first N unlabelled texts.")


class RunConfig(_Section):
    """Everything a run needs; saved as config.yaml in the run directory."""

    name: str | None = Field(None, description="Run name; default recipe name + timestamp.")
    output_dir: Path = Field(Path("runs"), description="Parent folder of run directories.")
    data: DataConfig
    model: ModelSettings
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    distill: DistillSettings = Field(default_factory=DistillSettings)

    @model_validator(mode="after")
    def _test_curve_needs_test(self) -> RunConfig:
        if self.eval.test_curve and not self.eval.test:
            raise ValueError("eval.test_curve scores the test split, which eval.test: false keeps out (sweeps); "
                             "drop one of them")
        return self

    @model_validator(mode="after")
    def _cache_needs_frozen_lower_layers(self) -> RunConfig:
        if self.train.cache_frozen_layers:
            if self.lora.method != "lora" or self.lora.top_layers is None:
                raise ValueError("train.cache_frozen_layers needs lora.method 'lora' with lora.top_layers set "
                                 "(e.g. 2), so that the lower layers stay frozen")
            if self.train.compile:
                raise ValueError("train.cache_frozen_layers and train.compile cannot be combined; pick one")
        return self

    @model_validator(mode="after")
    def _unlabelled_needs_teacher(self) -> RunConfig:
        if self.distill.unlabelled_file is not None and self.distill.teacher is None:
            raise ValueError("distill.unlabelled_file is learnt from the teacher only: set distill.teacher "
                             "(newstune distill TEACHER_RUN RECIPE --unlabelled FILE)")
        return self


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown config key '{where}' (check spelling; see recipes/ for valid keys)"
    if first["type"] == "missing":
        return f"{source}: missing config key '{where}'"
    if first["type"] == "value_error" and not first["loc"]:
        return f"{source}: {first['msg'].removeprefix('Value error, ')}"
    return f"{source}: bad value for '{where}': {first['msg']} (got {first.get('input')!r})"


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.epochs=2' -> (['train', 'epochs'], 2); values are parsed as YAML."""
    if "=" not in item:
        raise NewstuneError(f"override '{item}' is not key=value (e.g. train.epochs=2)")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise NewstuneError(f"override '{item}': '{part}' is not a section")
        node[path[-1]] = value
    return raw


def validate(raw: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise NewstuneError(_format_error(err, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise NewstuneError(f"config file not found: {path} "
                            "(pass a YAML recipe, e.g. recipes/ag_news/minilm_lora.yaml)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise NewstuneError(f"{path}: not valid YAML ({err.__class__.__name__}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise NewstuneError(f"{path}: expected a mapping of config sections at the top level")
    raw = apply_overrides(raw, overrides or [])
    raw.setdefault("name", None)
    config = validate(raw, str(path))
    if config.name is None:
        config.name = path.stem if path.parent.name in ("", ".") else f"{path.parent.name}_{path.stem}"
    return config


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
