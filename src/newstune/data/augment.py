"""Training-set augmentation: EDA (Wei & Zou 2019) with WordNet synonyms, and generator-made synthetic rows.

Every augmented row carries its origin (eda:sr, eda:ri, eda:rs, eda:rd, synthetic) and is only ever added to
the training split.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from newstune.config import AugmentConfig
from newstune.data.registry import TextSplit, encode_labels
from newstune.errors import NewstuneError

STOPWORDS = frozenset("""a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have having he
her here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now
of off on once only or other our ours ourselves out over own same she should so some such than that the their theirs
them themselves then there these they this those through to too under until up very was we were what when where
which while who whom why will with would you your yours yourself yourselves says said""".split())
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*$")


# ---------------------------------------------------------------- WordNet


def _wordnet_dirs(config_dir: Path | None) -> list[Path]:
    candidates = [config_dir] if config_dir else []
    if os.environ.get("NLTK_DATA"):
        candidates += [Path(p) for p in os.environ["NLTK_DATA"].split(os.pathsep)]
    if os.environ.get("NEWSTUNE_DATA"):
        candidates.append(Path(os.environ["NEWSTUNE_DATA"]) / "wordnet" / "nltk_data")
    return [c for c in candidates if c is not None]


@lru_cache(maxsize=4)
def wordnet(config_dir: Path | None = None):
    """NLTK's WordNet reader from a local NLTK data folder (no download)."""
    try:
        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError:
        raise NewstuneError("EDA needs NLTK: pip install 'newstune[augment]'") from None
    for folder in _wordnet_dirs(config_dir):
        if (folder / "corpora" / "wordnet.zip").is_file() or (folder / "corpora" / "wordnet").is_dir():
            if str(folder) not in nltk.data.path:
                nltk.data.path.insert(0, str(folder))
            root = nltk.data.find("corpora/wordnet.zip/wordnet/") if (folder / "corpora" / "wordnet.zip").is_file() \
                else nltk.data.find("corpora/wordnet")
            return WordNetCorpusReader(root, None)
    raise NewstuneError("WordNet not found: set data.augment.wordnet_dir or NLTK_DATA to a folder with "
                        "corpora/wordnet.zip (here: ../shared/data/wordnet/nltk_data)")


def synonyms(word: str, wn) -> list[str]:
    found = {lemma.name().replace("_", " ") for synset in wn.synsets(word.lower()) for lemma in synset.lemmas()}
    found.discard(word.lower())
    return sorted(s for s in found if s.isascii())


# ---------------------------------------------------------------- the four EDA operations


def synonym_replacement(words: list[str], n: int, rng: random.Random, lookup: Callable[[str], list[str]]) -> list[str]:
    """Replace up to n distinct non-stopwords by a random synonym."""
    out = list(words)
    candidates = [i for i, w in enumerate(words) if w.lower() not in STOPWORDS and _WORD.match(w)]
    rng.shuffle(candidates)
    replaced = 0
    for i in candidates:
        options = lookup(words[i])
        if options:
            out[i] = rng.choice(options)
            replaced += 1
        if replaced >= n:
            break
    return out


def random_insertion(words: list[str], n: int, rng: random.Random, lookup: Callable[[str], list[str]]) -> list[str]:
    """Insert, n times, a synonym of a random word at a random position."""
    out = list(words)
    for _ in range(n):
        for _attempt in range(10):
            options = lookup(rng.choice(words)) if words else []
            if options:
                out.insert(rng.randint(0, len(out)), rng.choice(options))
                break
    return out


def random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    """Swap two random positions, n times."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: list[str], p: float, rng: random.Random) -> list[str]:
    """Delete each word with probability p; never return an empty text."""
    if len(words) <= 1:
        return list(words)
    kept = [w for w in words if rng.random() > p]
    return kept or [rng.choice(words)]


def apply_operation(name: str, rate: float, words: list[str], rng: random.Random,
                    lookup: Callable[[str], list[str]]) -> list[str]:
    n = max(1, int(rate * len(words)))
    if name == "sr":
        return synonym_replacement(words, n, rng, lookup)
    if name == "ri":
        return random_insertion(words, n, rng, lookup)
    if name == "rs":
        return random_swap(words, n, rng)
    return random_deletion(words, rate, rng)


def eda_copies(text: str, config: AugmentConfig, rng: random.Random, lookup: Callable[[str], list[str]]
               ) -> list[tuple[str, str]]:
    """config.eda_copies augmented texts, cycling through the enabled operations; (text, origin) pairs."""
    words = text.split()
    operations = [(name, rate) for name, rate in (("sr", config.synonym_rate), ("ri", config.insert_rate),
                                                  ("rs", config.swap_rate), ("rd", config.delete_rate)) if rate > 0]
    out = []
    for copy in range(config.eda_copies if operations else 0):
        name, rate = operations[(copy + rng.randrange(len(operations))) % len(operations)]
        augmented = " ".join(apply_operation(name, rate, words, rng, lookup))
        if augmented != text:
            out.append((augmented, f"eda:{name}"))
    return out


# ---------------------------------------------------------------- applying it to the training split


def normalise(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def augment_train(splits: dict[str, TextSplit], label_names: list[str], config: AugmentConfig, seed: int) -> TextSplit:
    """The training split plus EDA copies and synthetic rows; evaluation splits are untouched by construction."""
    train = splits["train"]
    rng = random.Random(config.seed if config.seed is not None else seed)
    texts, labels, origins = list(train.texts), list(train.labels), list(train.origins)
    if config.eda:
        wn = wordnet(config.wordnet_dir)
        cache: dict[str, list[str]] = {}

        def lookup(word: str) -> list[str]:
            if word not in cache:
                cache[word] = synonyms(word, wn)
            return cache[word]

        for text, label in zip(train.texts, train.labels):
            for augmented, origin in eda_copies(text, config, rng, lookup):
                texts.append(augmented)
                labels.append(label)
                origins.append(origin)
    if config.synthetic_file:
        evaluation = {normalise(t) for split in ("validation", "test") for t in splits[split].texts}
        rows = read_synthetic(config.synthetic_file)
        kept = [r for r in rows if normalise(r["text"]) not in evaluation]
        texts += [r["text"] for r in kept]
        labels += encode_labels([r["label"] for r in kept], label_names, str(config.synthetic_file))
        origins += ["synthetic"] * len(kept)
    return TextSplit(texts, labels, origins)


def read_synthetic(path: Path) -> list[dict]:
    if not Path(path).is_file():
        raise NewstuneError(f"data.augment.synthetic_file {path} not found; make it with `newstune generate`")
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    bad = [i + 1 for i, r in enumerate(rows) if not isinstance(r, dict) or not r.get("text") or "label" not in r]
    if bad:
        raise NewstuneError(f"{path}: line(s) {bad[:5]} lack 'text' or 'label'")
    return rows


# ---------------------------------------------------------------- generator-based augmentation


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


def generate_rows(config, generator: str, output: Path, per_class: int, prompt: str, filter_run: Path | None,
                  min_confidence: float, sampling: dict) -> dict:
    """Generate, dedupe against every split, optionally filter with a trained run; write JSONL; return counts."""
    from newstune.data.registry import load_dataset

    if output.exists():
        raise NewstuneError(f"{output} already exists; choose another --output")
    bundle = load_dataset(config.data.model_copy(update={"augment": AugmentConfig()}), config.train.seed)
    rows = generate_synthetic(generator, bundle.label_names, per_class, prompt, config.train.seed, **sampling)
    existing = [t for split in bundle.splits.values() for t in split.texts]
    unique = dedupe(rows, existing)
    kept = unique
    if filter_run is not None:
        from newstune.serve import load_served

        served = load_served([str(filter_run)])
        kept = filter_by_classifier(unique, next(iter(served.values())).classify, min_confidence)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return {"generated": len(rows), "after_dedupe": len(unique), "kept": len(kept), "output": str(output)}
