"""Tiny random encoders and a synthetic news dataset, built inside the tests (no download)."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast, MPNetConfig, MPNetModel, RobertaConfig, RobertaModel

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TOPICS = {
    "sports": ["goal", "match", "team", "coach", "league", "season", "score"],
    "business": ["market", "stock", "profit", "shares", "bank", "earnings", "investor"],
    "science": ["space", "research", "software", "planet", "computer", "study", "nasa"],
}
FILLER = ["the", "a", "on", "after", "says", "new", "report", "today", "week", "over", "in", "of"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, *(w for ws in TOPICS.values() for w in ws)]


def synthetic_rows(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = list(TOPICS)[i % len(TOPICS)]
        words = rng.choices(TOPICS[label], k=rng.randint(2, 4)) + rng.choices(FILLER, k=rng.randint(2, 12))
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def make_tokenizer(folder: Path) -> BertTokenizerFast:
    folder.mkdir(parents=True, exist_ok=True)
    return BertTokenizerFast(vocab={word: i for i, word in enumerate(VOCAB)}, do_lower_case=True)


ARCHS = {
    "bert": lambda: BertModel(BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)),
    "roberta": lambda: RobertaModel(RobertaConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, intermediate_size=64,
                                                  max_position_embeddings=66, pad_token_id=0)),
    "mpnet": lambda: MPNetModel(MPNetConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=64,
                                            max_position_embeddings=66, pad_token_id=0)),
}


def make_tiny_model(folder: Path, arch: str = "bert") -> Path:
    torch.manual_seed(0)
    model = ARCHS[arch]()
    model.save_pretrained(folder)
    make_tokenizer(folder).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_csv(root / "train.csv", synthetic_rows(480, 1))
    write_csv(root / "valid.csv", synthetic_rows(60, 2))
    write_csv(root / "test.csv", synthetic_rows(60, 3))
    return root


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEWSTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def tiny_config(model_dir: Path, data_dir: Path, **overrides) -> dict:
    config = {
        "name": "tiny",
        "data": {"name": "files", "dir": str(data_dir), "train_file": "train.csv", "valid_file": "valid.csv",
                 "test_file": "test.csv", "max_length": 32},
        "model": {"name": str(model_dir)},
        "lora": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": 4, "batch_size": 16, "lr": 3e-2, "precision": "fp32", "seed": 7, "log_every_steps": 5,
                  "threads": 1},
        "eval": {"latency_samples": 3},
    }
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def make_served(model_dir: Path, labels: list[str], name: str = "topics", run_dir: Path | None = None):
    """A ServedModel over the untrained tiny encoder with a fresh head: HTTP behaviour without training a run."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from newstune.modeling.backends import torch_scorer
    from newstune.serving.serve import ServedModel

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels)).requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return ServedModel(name, run_dir or model_dir, torch_scorer(model, tokenizer.pad_token_id, "fp32"), tokenizer,
                       labels, None, 32, str(model_dir))


def needs_shared_data() -> pytest.MarkDecorator:
    return pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data not found at {SHARED_DATA}")


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
