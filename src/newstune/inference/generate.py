"""Generator-based augmentation: sample rows per class from a causal LM, dedupe them, optionally filter them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from newstune.config import AugmentConfig, RunConfig
from newstune.data.augment import normalise
from newstune.data.registry import load_dataset
from newstune.errors import NewstuneError


def generate_synthetic(generator: str, label_names: list[str], per_class: int, prompt: str, seed: int,
                       min_new_tokens: int = 8, max_new_tokens: int = 48, temperature: float = 0.9,
                       top_p: float = 0.95, repetition_penalty: float = 1.3) -> list[dict]:
    """Sample per_class texts per label from any causal LM (hub id or local folder), prompted per class."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(generator)
        model = AutoModelForCausalLM.from_pretrained(generator).eval()
    except (OSError, ValueError) as err:
        raise NewstuneError(f"cannot load generator '{generator}': {str(err).splitlines()[0][:160]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    rows = []
    for label in tqdm(label_names, desc="generate", unit="class"):
        text_prompt = prompt.format(label=label)
        inputs = tokenizer([text_prompt] * per_class, return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**inputs, do_sample=True, temperature=temperature, top_p=top_p,
                                    repetition_penalty=repetition_penalty, min_new_tokens=min_new_tokens,
                                    max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        for sequence in output[:, inputs["input_ids"].shape[1]:]:
            text = tokenizer.decode(sequence, skip_special_tokens=True).strip().split("\n")[0].strip()
            if text:
                rows.append({"text": text, "label": label, "origin": "synthetic", "generator": generator})
    return rows


def dedupe(rows: list[dict], existing: list[str]) -> list[dict]:
    """Drop generated rows that repeat each other or any train/validation/test text (after normalising)."""
    seen = {normalise(t) for t in existing}
    kept = []
    for row in rows:
        key = normalise(row["text"])
        if key and key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


def filter_by_classifier(rows: list[dict], classify: Callable[[list[str]], list[dict]],
                         min_confidence: float) -> list[dict]:
    """Keep a row only if the classifier gives its intended label at least min_confidence."""
    if not rows:
        return rows
    results = classify([r["text"] for r in rows])
    kept = []
    for row, result in zip(rows, results):
        confidence = result["probabilities"].get(row["label"], 0.0)
        if confidence >= min_confidence:
            kept.append({**row, "classifier_confidence": round(confidence, 4)})
    return kept


def generate_rows(config: RunConfig, generator: str, output: Path, per_class: int, prompt: str, filter_run: Path | None,
                  min_confidence: float, sampling: dict) -> dict:
    """Generate, dedupe against every split, optionally filter with a trained run; write JSONL; return counts."""
    if output.exists():
        raise NewstuneError(f"{output} already exists; choose another --output")
    bundle = load_dataset(config.data.model_copy(update={"augment": AugmentConfig()}), config.train.seed)
    rows = generate_synthetic(generator, bundle.label_names, per_class, prompt, config.train.seed, **sampling)
    existing = [t for split in bundle.splits.values() for t in split.texts]
    unique = dedupe(rows, existing)
    kept = unique
    if filter_run is not None:
        from newstune.serving.serve import load_served

        served = load_served([str(filter_run)])
        kept = filter_by_classifier(unique, next(iter(served.values())).classify, min_confidence)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    partial.write_text("".join(json.dumps(r) + "\n" for r in kept))
    partial.replace(output)
    return {"generated": len(rows), "after_dedupe": len(unique), "kept": len(kept), "output": str(output)}
