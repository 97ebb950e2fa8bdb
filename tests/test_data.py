import gzip
import itertools
import re
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from newstune.config import CleanConfig, DataConfig
from newstune.data.batching import Collator, LengthGroupedBatchSampler, tokenize_texts
from newstune.data.registry import load_dataset
from newstune.data.splits import TextSplit, class_weights, stratified_split
from newstune.data.text import clean_text, fix_ag_artifacts, textualize_liar
from newstune.errors import NewstuneError

from .conftest import SHARED_DATA, make_tokenizer, needs_shared_data, write_csv


def test_ag_artifacts_are_fixed():
    raw = "Bush #39;s plan quot;works quot; \\ says \\$5 &lt;b&gt;bold&lt;/b&gt;"
    assert fix_ag_artifacts(raw).startswith("Bush 's plan \"works \"")
    assert clean_text(raw, CleanConfig()) == "Bush 's plan \"works \" says $5 bold"


def test_cleaning_options():
    text = "<p>Wow!!!  “Quoted” — Text</p>"
    assert clean_text(text, CleanConfig(punctuation=True, lowercase=True)) == 'wow! "quoted" - text'
    assert clean_text(text, CleanConfig(html=False)) == "<p>Wow!!! “Quoted” — Text</p>"


CLEAN_CONFIGS = [CleanConfig(ag_artifacts=a, html=h, punctuation=p, lowercase=low)
                 for a, h, p, low in itertools.product([False, True], repeat=4)]
# Arbitrary text, lone surrogates included, plus runs of the characters the cleaning rules look for.
PIECES = ["<", ">", "<b>", "&", "#", ";", "&#", "#x", "9" * 8, "0" * 8, "39", "&lt;", "quot;", "\\", "\\n", "!!!",
          "…", "—", " ", "\t", "\xa0", "\ud800", "\udfff", "A", "İ"]
ANY_TEXT = st.one_of(
    st.text(st.one_of(st.characters(codec=None), st.characters(categories=["Cs"]))),
    st.lists(st.sampled_from(PIECES), max_size=40).map("".join),
)


@settings(max_examples=300, deadline=None, database=None)
@given(text=ANY_TEXT, config=st.sampled_from(CLEAN_CONFIGS))
@example(text="#9999999;", config=CleanConfig())
@example(text="&#" + "9" * 5000 + ";", config=CleanConfig())
@example(text="\ud83d lone surrogate", config=CleanConfig(ag_artifacts=False, html=False))
def test_cleaning_any_text_never_raises_and_leaves_tokenizer_safe_text(text, config):
    out = clean_text(text, config)
    out.encode("utf-8")  # raises on a lone surrogate, as tokenizers do
    assert out == out.strip() and not re.search(r"\s\s", out)


@settings(max_examples=300, deadline=None, database=None)
@given(text=ANY_TEXT, config=st.sampled_from([c for c in CLEAN_CONFIGS if not (c.html or c.ag_artifacts)]))
def test_cleaning_is_idempotent_where_nothing_is_decoded(text, config):
    # Decoding is not idempotent by nature ('&amp;lt;' -> '&lt;' -> '<'), so html and ag_artifacts are left out.
    once = clean_text(text, config)
    assert clean_text(once, config) == once


@pytest.mark.parametrize("raw, cleaned", [
    ("x #9999999; y", "x \ufffd y"),  # chr() raised ValueError
    ("x #99999999999999999999; y", "x \ufffd y"),  # chr() raised OverflowError
    ("x &#" + "9" * 5000 + "; y", "x \ufffd y"),  # int() of > 4,300 digits raised inside html.unescape
    ("x &#00000000065; #39;s", "x A 's"),
    ("a\ud800b", "ab"),
])
def test_invalid_code_points_and_surrogates(raw, cleaned):
    assert clean_text(raw, CleanConfig()) == cleaned


@contextmanager
def fails_after(seconds: float):
    """Interrupts a runaway (quadratic) regex instead of waiting minutes for it: re matching is interruptible."""
    def stop(*_):
        raise AssertionError(f"cleaning took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("text", [
    "<" * 1_000_000,  # `<[^>]+>` rescanned to the end from every '<': 200k took 45 s
    "<a" * 500_000,
    "<" + "a" * 1_000_000,
    "&#" * 500_000,
    "&#" + "9" * 1_000_000 + ";",
    "#" + "9" * 1_000_000 + ";",
    "!" * 1_000_000,
    "\\" * 1_000_000,
])
def test_cleaning_is_linear_on_pathological_rows(text):
    """A catastrophic-regression guard (a 1M-character row in well under 2 s), not a benchmark."""
    with fails_after(2.0):
        clean_text(text, CleanConfig(punctuation=True, lowercase=True))


def test_liar_textualization_and_credit_history():
    row = {"statement": "Taxes went up.", "speaker": "jane-doe", "job": "", "state": "Ohio", "party": "democrat",
           "subject": "taxes,economy", "context": "a speech", "barely_true_count": "1", "false_count": "2",
           "half_true_count": "3", "mostly_true_count": "4", "pants_fire_count": "5"}
    text = textualize_liar(row, ["speaker", "job", "subject"], credit_history=False)
    assert text == "Taxes went up. Speaker: jane doe. Subject: taxes, economy."
    assert "pants fire 5" in textualize_liar(row, [], credit_history=True)


def test_stratified_split_keeps_every_class():
    split = TextSplit([f"t{i}" for i in range(100)], [0] * 90 + [1] * 8 + [2] * 2)
    kept, held = stratified_split(split, 0.1, seed=1)
    assert len(kept) + len(held) == 100
    assert sorted(set(held.labels)) == [0, 1, 2]
    assert stratified_split(split, 0.1, seed=1)[1].texts == held.texts


def test_class_weights_are_balanced():
    labels = [0, 0, 0, 0, 1, 1, 2]  # 7 rows: 7 / (3 * count)
    assert class_weights(labels, 3) == pytest.approx([7 / 12, 7 / 6, 7 / 3])
    # a class without rows counts as one row, as train.class_weights 'auto' always did
    assert class_weights(labels, 4) == pytest.approx([7 / 16, 7 / 8, 7 / 4, 7 / 4])


def files_config(tmp_path, **kw):
    return DataConfig(name="files", dir=tmp_path, train_file="train.csv", **kw)


def test_files_loader_splits_and_maps_labels(tmp_path):
    write_csv(tmp_path / "train.csv", [(f"text {i}", ["b", "a"][i % 2]) for i in range(50)])
    bundle = load_dataset(files_config(tmp_path))
    assert bundle.label_names == ["a", "b"]
    assert sum(bundle.info["rows"].values()) == 50
    assert set(bundle.splits["test"].labels) == {0, 1}


def test_files_loader_template(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"title": "T", "body": "B", "y": 3}\n{"title": "U", "body": "C", "y": 4}\n')
    config = DataConfig(name="files", dir=tmp_path, train_file="train.jsonl", valid_file="train.jsonl",
                        test_file="train.jsonl", text_columns=["title", "body"], text_template="{title}: {body}",
                        label_column="y")
    bundle = load_dataset(config)
    assert bundle.splits["train"].texts == ["T: B", "U: C"]
    assert bundle.label_names == ["3", "4"]


@pytest.mark.parametrize("rows, kwargs, message", [
    ([("x", "a")], {"label_column": "category"}, r"no column\(s\) \['category'\]"),
    ([("x", "a"), ("  ", "b")], {}, "10 empty text.*first at data row 2"),
])
def test_files_loader_bad_input(tmp_path, rows, kwargs, message):
    write_csv(tmp_path / "train.csv", rows * 10)
    with pytest.raises(NewstuneError, match=message):
        load_dataset(files_config(tmp_path, **kwargs))


GOOD_CSV = b"text,label\n" + b"x,a\ny,b\n" * 10
GOOD_JSONL = b'{"text": "x", "label": "a"}\n{"text": "y", "label": "b"}\n' * 10


@pytest.mark.parametrize("name, content, kwargs, message", [
    ("train.csv", b"", {}, r"train.csv: the file is empty; it needs a header line and data rows"),
    ("train.csv", b"text,label\n", {}, r"train.csv: no data rows; add rows below the header line"),
    ("train.jsonl", b"\n\n", {}, r"train.jsonl: no data rows; add one JSON object per line"),
    ("train.csv.gz", GOOD_CSV, {}, r"train.csv.gz: not gzip data .*drop .gz from the name"),
    ("train.csv.gz", gzip.compress(GOOD_CSV * 50)[:60], {}, r"train.csv.gz: the gzip data is truncated or corrupt"),
    ("train.csv", GOOD_CSV[:-1] + b"\nbad \xff text,a\n", {}, r"train.csv:22: not UTF-8 text \(byte 0xff\); re-save"),
    ("train.jsonl", GOOD_JSONL + b'{"text": "\xe9", "label": "a"}\n', {}, r"train.jsonl:21: not UTF-8 text"),
    ("train.jsonl", b'{"text": "x", "label": "a"}\n\n{"text": x}\n', {}, r"train.jsonl:3: invalid JSON .*column 10"),
    ("train.jsonl", GOOD_JSONL + b"[1, 2]\n", {}, r"train.jsonl:21: not a JSON object"),
    ("train.jsonl", b'{"text": "x", "text": "y", "label": "a"}\n', {}, r"train.jsonl:1: key 'text' appears twice"),
    ("train.jsonl", GOOD_JSONL + b'{"text": "z"}\n', {}, r"train.jsonl:21: no 'label' value \(1 row"),
    ("train.csv", b"text,text,label\n" + b"x,y,a\nz,w,b\n" * 10, {},
     r"train.csv:1: column\(s\) \['text'\] appear more than once in the header.*rename or remove"),
    ("train.csv", b"text,label\n" + b"x,a\n" * 20, {},
     r"train.csv: every training row has the label 'a'; a classifier needs two or more classes"),
    ("train.csv", b"text,label\n" + b"x,a\n" * 20 + b"y,b\n", {"min_class_count": 2},
     r"train.csv: every training row kept by data.min_class_count=2 has the label 'a'.*lower data.min_class_count"),
], ids=["0-byte", "header-only", "blank-jsonl", "not-gzip", "truncated-gzip", "not-utf8-csv", "not-utf8-jsonl",
        "bad-json-line", "json-array-line", "duplicate-json-key", "missing-label", "duplicate-column", "single-class",
        "single-class-after-min-count"])
def test_malformed_training_file_is_one_clear_error(tmp_path, name, content, kwargs, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(NewstuneError, match=message) as caught:
        load_dataset(DataConfig(name="files", dir=tmp_path, train_file=name, **kwargs))
    assert str(tmp_path / name) in str(caught.value) and "\n" not in str(caught.value)


def test_unknown_label_in_test_file(tmp_path):
    write_csv(tmp_path / "train.csv", [("x", "a"), ("y", "b")] * 10)
    write_csv(tmp_path / "test.csv", [("z", "c")])
    with pytest.raises(NewstuneError, match=r"unknown label value\(s\) \['c'\]"):
        load_dataset(files_config(tmp_path, test_file="test.csv"))


def test_missing_file(tmp_path):
    with pytest.raises(NewstuneError, match="file not found"):
        load_dataset(files_config(tmp_path))


def test_standard_dataset_without_local_copy_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.delenv("NEWSTUNE_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(NewstuneError, match="no local copy .*NEWSTUNE_DATA"):
        load_dataset(DataConfig(name="liar"))


def test_length_grouped_sampler_is_deterministic_and_grouped():
    lengths = [(i * 37) % 100 + 1 for i in range(400)]
    sampler = LengthGroupedBatchSampler(lengths, batch_size=8, seed=3, mega_batch_factor=10)
    sampler.set_epoch(1)
    first = list(sampler)
    assert first == list(sampler)
    assert sorted(i for batch in first for i in batch) == list(range(400))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in first) / len(first)
    sampler.set_epoch(2)
    assert list(sampler) != first
    plain = LengthGroupedBatchSampler(lengths, batch_size=8, seed=3, group_by_length=False)
    plain_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain) / len(first)
    assert spread < plain_spread / 4


def test_collator_pads_dynamically():
    items = [{"input_ids": [5, 6, 7], "labels": 1}, {"input_ids": [5], "labels": 0}]
    batch = Collator(pad_token_id=0, multiple=8)(items)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].sum().item() == 4
    assert batch["labels"].tolist() == [1, 0]


def test_tokenization_is_cached(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tok")
    cache = tmp_path / "cache"
    ids = tokenize_texts(tokenizer, ["goal match", "stock market today"], 16, cache)
    assert len(list(cache.glob("*.safetensors"))) == 1
    assert tokenize_texts(tokenizer, ["goal match", "stock market today"], 16, cache) == ids
    tokenize_texts(tokenizer, ["goal match", "stock market today"], 4, cache)
    assert len(list(cache.glob("*.safetensors"))) == 2


class _Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_planted_or_damaged_cache_entry_is_never_unpickled(tmp_path, monkeypatch):
    """Fails if the cache is read with torch.load / pickle (a planted entry would run code even where torch's
    weights_only default is switched off), or if a damaged entry is trusted instead of tokenizing again."""
    import torch

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    tokenizer = make_tokenizer(tmp_path / "tok")
    cache = tmp_path / "cache"
    texts = ["goal match", "stock market today"]
    ids = tokenize_texts(tokenizer, texts, 16, cache)
    entry = next(cache.glob("*.safetensors"))
    marker = tmp_path / "code-ran"
    torch.save(_Planted(marker), entry)
    assert tokenize_texts(tokenizer, texts, 16, cache) == ids
    assert not marker.exists()
    entry.write_bytes(entry.read_bytes()[:-3])  # the rewritten entry, truncated
    assert tokenize_texts(tokenizer, texts, 16, cache) == ids


# ------------------------------------------------------------------ the real data in ../shared/data


@needs_shared_data()
def test_liar_counts_match_the_release():
    bundle = load_dataset(DataConfig(name="liar", dir=SHARED_DATA / "liar", labels="six"))
    assert bundle.info["rows"] == {"train": 10269, "validation": 1284, "test": 1283}
    train_labels = [bundle.label_names[i] for i in bundle.splits["train"].labels]
    assert train_labels.count("pants-fire") == 842 and train_labels.count("half-true") == 2123
    binary = load_dataset(DataConfig(name="liar", dir=SHARED_DATA / "liar"))
    assert binary.label_names == ["fake", "true"]
    assert binary.splits["train"].labels.count(0) == 842 + 1998 + 1657


@needs_shared_data()
def test_liar_credit_history_is_marked_leaky():
    with pytest.warns(UserWarning, match="label leakage"):
        bundle = load_dataset(DataConfig(name="liar", dir=SHARED_DATA / "liar", credit_history=True))
    assert bundle.info["leaky"] is True


@needs_shared_data()
def test_ag_news_counts_and_formats(tmp_path):
    bundle = load_dataset(DataConfig(name="ag_news", dir=SHARED_DATA / "ag_news"))
    rows = bundle.info["rows"]
    assert rows["train"] + rows["validation"] == 18415 and rows["test"] == 7600
    assert bundle.splits["test"].labels.count(0) == 1900
    assert not any("#39;" in t or "quot;" in t for t in bundle.splits["test"].texts)
    (tmp_path / "ag").mkdir()
    (tmp_path / "ag" / "train_partial.csv.gz").symlink_to(SHARED_DATA / "ag_news" / "train_partial.csv.gz")
    (tmp_path / "ag" / "test.csv.gz").symlink_to(SHARED_DATA / "ag_news" / "test.csv.gz")
    original = load_dataset(DataConfig(name="ag_news", dir=tmp_path / "ag"))
    assert original.info["rows"]["train"] + original.info["rows"]["validation"] == 10519


@needs_shared_data()
def test_huffpost_merge_and_split():
    bundle = load_dataset(DataConfig(name="huffpost", dir=SHARED_DATA / "huffpost", merge_categories=True))
    assert sum(bundle.info["rows"].values()) == 10000
    assert "MONEY" not in bundle.label_names and "BUSINESS" in bundle.label_names
    assert len(bundle.label_names) == 28


def test_the_visible_pattern_is_has_visible():
    """Fails if the service schema's pattern and the rule predict and the service apply disagree on any character:
    the schema would call a text valid that the service then refuses (or the reverse)."""
    from newstune.data.text import has_visible, visible_pattern

    pattern = re.compile(visible_pattern())
    for point in list(range(0, 0x3100)) + [0xFEFF, 0xFFF9, 0x1BCA0, 0xE0001, 0xE0020, 0x1F600, 0x10FFFF]:
        char = chr(point)
        assert bool(pattern.search(char)) == has_visible(char), hex(point)
    assert not pattern.search(" \t\u200b\x00") and pattern.search("\x00 a")
