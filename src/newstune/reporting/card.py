"""The model card of a run: `model/README.md` in the Hugging Face format, written from the run's own files.

Every figure in it is read from metrics.json (and decision.json) at writing time, so the card cannot disagree
with the run; `newstune calibrate` writes it again after refitting.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from newstune.config import RunConfig
from newstune.decisions.rule import Decision
from newstune.modeling.weights import MODEL_ALIASES
from newstune.rundir.run import MODEL_DIR, read_config, read_decision, read_labels, read_metrics, write_atomically
from newstune.tables import markdown_table

CARD_FILE = "README.md"
DATASET_IDS = {"ag_news": "fancyzhx/ag_news", "liar": "ucsbnlp/liar", "liar_subjects": "ucsbnlp/liar",
               "huffpost": "heegyu/news-category-dataset"}
PURPOSE = {
    "ag_news": "topic classification of English news headlines and leads (World, Sports, Business, Sci/Tech)",
    "huffpost": "news category classification of HuffPost headlines and short descriptions",
    "liar": "screening short political statements (PolitiFact, LIAR) by how true they were rated",
    "liar_subjects": "tagging short political statements (LIAR) with every subject they touch (multi-label)",
    "files": "text classification of the user's own labelled data",
}


def fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def base_model_id(name: str) -> str:
    """A hub id for an alias; a local folder by its name only (a card never shows the trainer's paths)."""
    return MODEL_ALIASES.get(name, Path(name).name if Path(name).is_absolute() or "/" not in name else name)


def front_matter(config: RunConfig, metrics: dict, split: str) -> dict:
    m = metrics.get(split, {})
    dataset = DATASET_IDS.get(config.data.name, config.data.name)
    scores = [("accuracy", "accuracy", "subset accuracy" if "micro_f1" in m else "accuracy"),
              ("f1", "macro_f1", "macro-F1"), ("f1", "micro_f1", "micro-F1"),
              ("ece", "ece", "ECE (15 bins, calibrated)"), ("brier", "brier", "Brier score"),
              ("hamming_loss", "hamming_loss", "Hamming loss")]
    results = [{"type": kind, "value": round(float(m[key]), 4), "name": f"{split} {title}"}
               for kind, key, title in scores if key in m]
    return {
        "base_model": base_model_id(config.model.name),
        "datasets": [dataset],
        "library_name": "peft" if config.lora.method == "lora" else "transformers",
        "pipeline_tag": "text-classification",
        "tags": ["newstune", "text-classification", *(["lora"] if config.lora.method == "lora" else []),
                 *(["multi-label"] if "micro_f1" in m else [])],
        "metrics": sorted({r["type"] for r in results}),
        "model-index": [{"name": config.name, "results": [{
            "task": {"type": "text-classification", "name": "Text Classification"},
            "dataset": {"name": config.data.name, "type": dataset, "split": split},
            "metrics": results}]}],
    }


def intended_use(config: RunConfig, decision: Decision) -> list[str]:
    rule = ("every label whose probability reaches its own threshold (tuned on validation)" if decision.multi_label
            else f"class 1 when its probability reaches {decision.threshold:.2f} (tuned on validation)"
            if decision.threshold is not None else "the argmax after per-class offsets (tuned on validation)"
            if decision.class_bias else "the most probable class")
    purpose = PURPOSE.get(config.data.name, PURPOSE["files"])
    calibrated = ("Probabilities are not calibrated (eval.calibration: none, or the fitted scaling did not lower the "
                  "validation ECE and was dropped)." if decision.calibration == "none" else
                  f"Probabilities are calibrated on the validation split ({decision.calibration} scaling), so they are "
                  "meant to be read as probabilities on data like the training data.")
    blend = decision.ensemble
    how = "" if not blend else (f"baseline weight {blend['weight']:.2f}" if blend["weight"] is not None
                                else "combined by a stacked logistic layer")
    blended = (f" The probabilities come from the encoder blended with a TF-IDF linear model saved in the run's "
               f"`ensemble/` folder ({how}, chosen on validation); this model folder "
               "alone gives the encoder's answers, not the run's." if blend else "")
    return ["## Intended use", "",
            f"{purpose[0].upper()}{purpose[1:]}. Trained with newstune; the label is {rule}.{blended} {calibrated} "
            "Not for decisions about people without human review.", "",
            "```bash", "newstune predict RUN --input texts.jsonl --output labels.jsonl", "newstune serve name=RUN",
            "```", ""]


def data_section(config: RunConfig, metrics: dict) -> list[str]:
    data = metrics.get("data", {})
    rows = data.get("rows", {})
    lines = ["## Training data and splits", "",
             f"Dataset `{config.data.name}`; rows per split: "
             + ", ".join(f"{split} {count:,}" for split, count in rows.items())
             + f"; texts truncated to {config.data.max_length} tokens."]
    left_out = data.get("rows_without_kept_labels")
    if left_out:
        lines.append(f"Rows left out because none of their labels is among the kept ones: {left_out}.")
    origins = {k: v for k, v in data.get("train_origins", {}).items() if k != "original"}
    if origins:
        lines.append(f"Augmented training rows: {origins}.")
    return [*lines, ""]


def md_text(text: str) -> str:
    """A label name as literal Markdown table text: a name comes from the user's data (or a shared run), so `<`,
    `|`, `*`, `[`... must neither break the table nor render as HTML or links on the hub."""
    text = " ".join(str(text).split())
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~])", r"\\\1", text)


def label_section(config: RunConfig, labels: list[str]) -> list[str]:
    how = {"liar": "LIAR's six ratings; binary maps pants-fire, false, barely-true -> fake and half-true, "
                   "mostly-true, true -> true." if config.data.labels == "binary" else "LIAR's six ratings.",
           "liar_subjects": f"LIAR's comma-separated subject column; the {config.data.top_labels or len(labels)} "
                            "most frequent training subjects are the labels.",
           "huffpost": "HuffPost categories" + (", renamed ones merged" if config.data.merge_categories else "") + "."}
    rows = [[str(i), md_text(name)] for i, name in enumerate(labels)]
    return ["## Labels", "", how.get(config.data.name, "Label names as in the data, in this order."), "",
            markdown_table(["index", "label"], rows), ""]


def evaluation_section(metrics: dict, labels: list[str]) -> list[str]:
    splits = [s for s in ("validation", "test") if s in metrics] + sorted(k for k in metrics if k.startswith("extra:"))
    multi = any("micro_f1" in metrics[s] for s in splits)
    head = ["split", "n", "accuracy" if not multi else "subset accuracy", "macro-F1",
            *(["micro-F1", "Hamming loss"] if multi else []), "loss", "ECE", "Brier"]
    rows = [[s, str(metrics[s]["n"]), fmt(metrics[s]["accuracy"]), fmt(metrics[s]["macro_f1"]),
             *([fmt(metrics[s]["micro_f1"]), fmt(metrics[s]["hamming_loss"])] if multi else []),
             fmt(metrics[s]["loss"]), fmt(metrics[s].get("ece")), fmt(metrics[s].get("brier"))] for s in splits]
    final = "test" if "test" in metrics else "validation"
    per_class = [[md_text(name), fmt(c["precision"]), fmt(c["recall"]), fmt(c["f1"]), str(c["support"])]
                 for name, c in metrics[final]["per_class"].items()]
    return ["## Evaluation", "", markdown_table(head, rows), "", f"Per class ({final}):", "",
            markdown_table(["label", "precision", "recall", "F1", "support"], per_class), ""]


def baseline_section(metrics: dict) -> list[str]:
    """What a TF-IDF linear model fitted in seconds on the same splits gets: the bar this fine-tune had to clear."""
    base = metrics.get("baseline")
    if not base:
        return []
    splits = [s for s in ("validation", "test") if s in base and s in metrics]
    rows = [[s, fmt(base[s]["accuracy"]), fmt(metrics[s]["accuracy"]),
             f"{metrics[s]['accuracy'] - base[s]['accuracy']:+.4f}", fmt(base[s]["macro_f1"]),
             fmt(metrics[s]["macro_f1"]), f"{metrics[s]['macro_f1'] - base[s]['macro_f1']:+.4f}"] for s in splits]
    head = ["split", "baseline accuracy", "this model", "gain", "baseline macro-F1", "this model", "gain"]
    settings = base.get("settings", {})
    return ["## Baseline", "", f"{base['model']} on the same splits (C={settings.get('C')}, class weight "
            f"{settings.get('class_weight')}, chosen on validation; fitted in {base['fit_seconds']:.0f} s).", "",
            markdown_table(head, rows), ""]


def calibration_section(metrics: dict, decision: Decision) -> list[str]:
    report = metrics.get("calibration", {})
    rows = [[split, *(fmt(report[split][f"{k}_{when}"]) for k in ("ece", "brier", "log_loss")
                      for when in ("before", "after"))] for split in ("validation", "test") if split in report]
    head = ["split", "ECE before", "ECE after", "Brier before", "Brier after", "log loss before", "log loss after"]
    lines = ["## Calibration", "",
             f"Method: {decision.calibration}; temperature {decision.temperature}. ECE uses 15 equal-width bins "
             "(multi-label: over every label's probability)."]
    if rows:
        lines += ["", markdown_table(head, rows)]
    else:
        lines.append("No before/after figures (a run trained before calibration; `newstune calibrate RUN` adds them).")
    for name, value in (("binary threshold", decision.threshold), ("class offsets", decision.class_bias),
                        ("label thresholds", decision.label_thresholds)):
        if value is not None:
            lines.append(f"\nDecision rule: {name} {value}.")
    return [*lines, ""]


def efficiency_section(metrics: dict) -> list[str]:
    eff = metrics.get("efficiency", {})
    keys = [("precision", "precision"), ("device", "device"), ("epoch_seconds_mean", "seconds per epoch"),
            ("train_samples_per_s", "train samples/s"), ("train_tokens_per_s", "train tokens/s"),
            ("peak_rss_mb", "peak RSS MB"), ("trainable_params", "trainable parameters"),
            ("saved_model_mb", "saved MB"), ("latency_ms_median", "latency ms (1 text)"),
            ("eval_samples_per_s", "evaluation samples/s")]
    rows = [[title, f"{eff[k]:,.2f}" if isinstance(eff[k], float) else str(eff[k])] for k, title in keys if k in eff]
    return ["## Efficiency", "", markdown_table(["figure", "value"], rows) if rows else "Not recorded.", ""]


def limitations(config: RunConfig, metrics: dict) -> list[str]:
    notes = []
    if metrics.get("leaky"):
        notes.append(f"**Leaky run**: the LIAR speaker record (`credit_history: {config.data.credit_history}`) "
                     "carries each statement's own label, so these figures overstate what the model can do on new "
                     "statements; `credit_history: train_record` is the leak-free record.")
    if config.data.name in ("liar", "liar_subjects"):
        notes.append("LIAR statements are US political claims (2007-2016); ratings and topics elsewhere differ.")
    if config.data.name == "ag_news":
        notes.append("Trained on the part of AG News available offline (not the full 120,000-row train split).")
    for key in sorted(k for k in metrics if k.startswith("extra:")):
        notes.append(f"Out-of-distribution set {key.removeprefix('extra:')}: macro-F1 "
                     f"{fmt(metrics[key]['macro_f1'])} (see the evaluation table).")
    notes.append("Calibration was fitted on the validation split; probabilities on other kinds of text may be "
                 "over- or under-confident.")
    return ["## Known limitations", "", *(f"- {note}" for note in notes), ""]


def render_card(config: RunConfig, labels: list[str], metrics: dict, decision: Decision) -> str:
    split = "test" if "test" in metrics else "validation"
    meta = yaml.safe_dump(front_matter(config, metrics, split), sort_keys=False, allow_unicode=True)
    body = [f"# {config.name}", "", *intended_use(config, decision), *data_section(config, metrics),
            *label_section(config, labels), *evaluation_section(metrics, labels),
            *baseline_section(metrics), *calibration_section(metrics, decision), *efficiency_section(metrics),
            *limitations(config, metrics)]
    return f"---\n{meta}---\n\n" + "\n".join(body)


def write_card(run_dir: Path) -> Path:
    """model/README.md of a finished run, from its config, labels, metrics and decision."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    path = run_dir / MODEL_DIR / CARD_FILE
    text = render_card(read_config(run_dir), read_labels(run_dir), metrics, read_decision(run_dir, metrics))
    write_atomically(path, text)
    return path
