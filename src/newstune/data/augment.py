"""Training-set augmentation: EDA (Wei & Zou 2019) with WordNet synonyms, plus synthetic rows read from a file.

Every augmented row carries its origin (eda:sr, eda:ri, eda:rs, eda:rd, synthetic) and is only ever added to
the training split. Making synthetic rows with a language model is application work: newstune.inference.generate.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from newstune.config import AugmentConfig
from newstune.data.files import iter_jsonl
from newstune.data.splits import TextSplit, encode_labels
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
    """The rows of a `newstune generate` JSONL file; a bad line is an error naming it."""
    if not Path(path).is_file():
        raise NewstuneError(f"data.augment.synthetic_file {path} not found; make it with `newstune generate`")
    rows = []
    for number, record, problem in iter_jsonl(Path(path)):
        text = record.get("text") if record else None
        if problem is None and not (isinstance(text, str) and text.strip() and "label" in record):
            problem = "lacks a 'text' string or a 'label'"
        if problem:
            raise NewstuneError(f"{path}:{number}: {problem}; fix or remove the line")
        rows.append({**record, "label": str(record["label"])})
    return rows
