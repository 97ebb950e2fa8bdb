"""EDA operations, determinism, provenance, synthetic rows, and out-of-distribution evaluation."""

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from newstune.config import AugmentConfig, DataConfig
from newstune.data.augment import (
    eda_copies,
    random_deletion,
    random_insertion,
    random_swap,
    read_synthetic,
    synonym_replacement,
    wordnet,
)
from newstune.data.registry import load_dataset, load_eval_set
from newstune.errors import NewstuneError
from newstune.inference.generate import dedupe, filter_by_classifier, generate_rows, generate_synthetic

from .conftest import SHARED_DATA, needs_shared_data, synthetic_rows, write_csv

WORDS = "the market rallied after strong bank earnings lifted investor mood".split()
SYNONYMS = {"market": ["marketplace"], "rallied": ["recovered"], "strong": ["potent"], "bank": ["depository"],
            "earnings": ["net income"], "lifted": ["raised"], "investor": ["capitalist"], "mood": ["humor"]}


def lookup(word):
    return SYNONYMS.get(word, [])


def test_synonym_replacement_changes_only_content_words():
    out = synonym_replacement(WORDS, 2, random.Random(0), lookup)
    changed = [(a, b) for a, b in zip(WORDS, out) if a != b]
    assert len(changed) == 2 and all(b in SYNONYMS[a] for a, b in changed)
    assert out[0] == "the"


def test_random_insertion_adds_synonyms():
    out = random_insertion(WORDS, 3, random.Random(1), lookup)
    assert len(out) == len(WORDS) + 3
    extra = list(out)
    for word in WORDS:
        extra.remove(word)
    assert all(any(e in s for s in SYNONYMS.values()) for e in extra)


def test_random_swap_keeps_the_words():
    out = random_swap(WORDS, 2, random.Random(2))
    assert sorted(out) == sorted(WORDS) and out != WORDS


def test_random_deletion_never_empties():
    assert 0 < len(random_deletion(WORDS, 0.5, random.Random(3))) < len(WORDS)
    assert len(random_deletion(WORDS, 1.0, random.Random(3))) == 1
    assert random_deletion(["solo"], 0.9, random.Random(3)) == ["solo"]


def test_eda_is_deterministic_under_a_seed_and_tags_origin():
    config = AugmentConfig(eda=True, eda_copies=4, synonym_rate=0.2, insert_rate=0.2, swap_rate=0.2, delete_rate=0.2)
    text = " ".join(WORDS)
    first = eda_copies(text, config, random.Random(7), lookup)
    assert first == eda_copies(text, config, random.Random(7), lookup)
    assert first != eda_copies(text, config, random.Random(8), lookup)
    assert {origin for _, origin in first} <= {"eda:sr", "eda:ri", "eda:rs", "eda:rd"}
    only_swap = AugmentConfig(eda=True, eda_copies=3, synonym_rate=0, insert_rate=0, swap_rate=0.3, delete_rate=0)
    assert {o for _, o in eda_copies(text, only_swap, random.Random(1), lookup)} == {"eda:rs"}


@needs_shared_data()
def test_wordnet_from_the_shared_copy():
    wn = wordnet(SHARED_DATA / "wordnet" / "nltk_data")
    assert "automobile" in {lemma.name() for s in wn.synsets("car") for lemma in s.lemmas()}


def test_missing_wordnet_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("NLTK_DATA", raising=False)
    monkeypatch.delenv("NEWSTUNE_DATA", raising=False)
    wordnet.cache_clear()
    with pytest.raises(NewstuneError, match="WordNet not found"):
        wordnet(tmp_path)


@needs_shared_data()
def test_augmented_rows_only_reach_train(tmp_path):
    write_csv(tmp_path / "train.csv", synthetic_rows(60, 1))
    (tmp_path / "synthetic.jsonl").write_text(
        json.dumps({"text": "brand new generated goal story", "label": "sports"}) + "\n")
    config = DataConfig(name="files", dir=tmp_path, train_file="train.csv",
                        augment={"eda": True, "eda_copies": 2, "synthetic_file": str(tmp_path / "synthetic.jsonl"),
                                 "wordnet_dir": str(SHARED_DATA / "wordnet" / "nltk_data")})
    plain = load_dataset(config.model_copy(update={"augment": AugmentConfig()}))
    bundle = load_dataset(config)
    train = bundle.splits["train"]
    assert len(train) > 2 * len(plain.splits["train"])
    assert train.origins.count("synthetic") == 1 and any(o.startswith("eda:") for o in train.origins)
    for split in ("validation", "test"):
        assert bundle.splits[split].texts == plain.splits[split].texts
        assert set(bundle.splits[split].origins) == {"original"}
    again = load_dataset(config)
    assert again.splits["train"].texts == train.texts


def test_synthetic_rows_repeating_evaluation_texts_are_dropped(tmp_path):
    rows = synthetic_rows(30, 1)
    write_csv(tmp_path / "train.csv", rows)
    bundle = load_dataset(DataConfig(name="files", dir=tmp_path, train_file="train.csv"))
    leaked = bundle.splits["test"].texts[0]
    (tmp_path / "syn.jsonl").write_text(json.dumps({"text": leaked.upper(), "label": "sports"}) + "\n")
    augmented = load_dataset(DataConfig(name="files", dir=tmp_path, train_file="train.csv",
                                        augment={"synthetic_file": str(tmp_path / "syn.jsonl")}))
    assert "synthetic" not in augmented.splits["train"].origins


@pytest.mark.parametrize("line, message", [
    ("{not json", r"syn.jsonl:2: invalid JSON"),  # json.loads raised a traceback
    ('{"label": "sports"}', r"syn.jsonl:2: lacks a 'text' string"),
    ('{"text": 5, "label": "sports"}', r"syn.jsonl:2: lacks a 'text' string"),  # normalise() raised TypeError
])
def test_bad_synthetic_line_is_named(tmp_path, line, message):
    path = tmp_path / "syn.jsonl"
    path.write_text(json.dumps({"text": "fine", "label": "sports"}) + "\n" + line + "\n")
    with pytest.raises(NewstuneError, match=message):
        read_synthetic(path)


def test_dedupe_and_classifier_filter():
    rows = [{"text": "Goal!", "label": "sports"}, {"text": "goal", "label": "sports"},
            {"text": "Stocks up", "label": "business"}, {"text": "old text", "label": "business"}]
    unique = dedupe(rows, ["Old text."])
    assert [r["text"] for r in unique] == ["Goal!", "Stocks up"]

    def classify(texts):
        return [{"probabilities": {"sports": 0.9, "business": 0.1}} for _ in texts]

    assert [r["label"] for r in filter_by_classifier(unique, classify, 0.7)] == ["sports"]


def tiny_gpt2(folder: Path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<eos>", "goal", "team", "market", "stock", "news", ":", "sports",
                                         "business", "the", "a"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=16, n_layer=1, n_head=2,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_generator_with_a_tiny_random_gpt2(tmp_path):
    gpt2 = tiny_gpt2(tmp_path / "gpt2")
    rows = generate_synthetic(gpt2, ["sports", "business"], per_class=3, prompt="{label} news :",
                              seed=1, min_new_tokens=3, max_new_tokens=6)
    assert len(rows) == 6 and {r["label"] for r in rows} == {"sports", "business"}
    assert all(r["origin"] == "synthetic" and r["text"] for r in rows)
    again = generate_synthetic(gpt2, ["sports", "business"], per_class=3,
                               prompt="{label} news :", seed=1, min_new_tokens=3, max_new_tokens=6)
    assert [r["text"] for r in again] == [r["text"] for r in rows]


def test_generate_rows_writes_readable_rows_and_never_overwrites(tmp_path):
    gpt2 = tiny_gpt2(tmp_path / "gpt2")
    write_csv(tmp_path / "train.csv", synthetic_rows(30, 1))
    config = SimpleNamespace(data=DataConfig(name="files", dir=tmp_path, train_file="train.csv"),
                             train=SimpleNamespace(seed=1))
    output = tmp_path / "out" / "syn.jsonl"
    sampling = {"min_new_tokens": 3, "max_new_tokens": 6}
    counts = generate_rows(config, gpt2, output, 3, "{label} news :", None, 0.7, sampling)
    assert counts["generated"] == 9 and counts["kept"] == counts["after_dedupe"] == len(read_synthetic(output))
    assert [p.name for p in output.parent.iterdir()] == ["syn.jsonl"]
    output.write_text("earlier results\n")
    with pytest.raises(NewstuneError, match="already exists"):
        generate_rows(config, gpt2, output, 3, "{label} news :", None, 0.7, sampling)
    assert output.read_text() == "earlier results\n"


@needs_shared_data()
def test_huffpost_mapped_onto_ag_classes():
    mapping = {"WORLD NEWS": "World", "SPORTS": "Sports", "BUSINESS": "Business", "MONEY": "Business",
               "TECH": "Sci/Tech", "SCIENCE": "Sci/Tech"}
    split = load_eval_set(DataConfig(name="huffpost", dir=SHARED_DATA / "huffpost"), mapping,
                          ["World", "Sports", "Business", "Sci/Tech"])
    assert len(split) == 1194 + 209 + 65 + 49 + 38 + 34
    assert split.labels.count(2) == 65 + 49


def test_training_evaluates_extra_sets_and_evaluate_cli_adds_more(tiny_models, tiny_data, tmp_path):
    from newstune.config import validate
    from newstune.reporting.report import evaluate_run
    from newstune.training.train import train

    from .conftest import tiny_config

    ood = tmp_path / "ood"
    ood.mkdir()
    write_csv(ood / "all.csv", [(text, {"sports": "athletics", "business": "money", "science": "tech"}[label])
                                for text, label in synthetic_rows(30, 11)])
    config = tiny_config(tiny_models["bert"], tiny_data, **{"train.epochs": 1})
    config["eval"]["extra"] = [{"name": "ood", "label_map": {"athletics": "sports", "money": "business"},
                                "data": {"name": "files", "dir": str(ood), "train_file": "all.csv"}}]
    run_dir, metrics = train(validate(config), tmp_path / "run")
    assert metrics["extra:ood"]["n"] == 20
    extra_file = write_csv(tmp_path / "more.csv", synthetic_rows(9, 12))
    updated, _ = evaluate_run(run_dir, "test", [f"more={extra_file}"])
    assert updated["extra:more"]["n"] == 9 and "extra:ood" in updated
    assert (run_dir / "confusion_extra_more.png").is_file()
