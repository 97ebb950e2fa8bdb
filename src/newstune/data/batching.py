"""Tokenize once (cached on disk), then batch with dynamic padding and length grouping."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

TOKENIZE_CHUNK = 4096  # texts per tokenizer call: a progress bar for large sets, same ids as one call


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of the vocabulary and rules; the call-time truncation/padding state is left out."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        identity = json.dumps(spec, sort_keys=True)
    else:
        identity = f"{tokenizer.name_or_path}:{len(tokenizer)}"
    return hashlib.sha256(f"{type(tokenizer).__name__}|{identity}".encode()).hexdigest()[:16]


def tokenize_texts(tokenizer, texts: list[str], max_length: int, cache: Path | None = None) -> list[list[int]]:
    """Token ids per text, truncated to max_length; cached under `cache` keyed by tokenizer, texts and length."""
    digest = hashlib.sha256()
    digest.update(f"{tokenizer_fingerprint(tokenizer)}|{max_length}|".encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\x00")
    path = cache / f"{digest.hexdigest()[:24]}.safetensors" if cache is not None else None
    if path is not None and path.is_file():
        cached = _read_cached(path, len(texts))
        if cached is not None:
            return cached
    ids = []
    chunks = range(0, len(texts), TOKENIZE_CHUNK)
    for start in tqdm(chunks, desc="tokenize", unit="chunk", disable=len(chunks) < 4, leave=False):
        ids += tokenizer(texts[start:start + TOKENIZE_CHUNK], truncation=True, max_length=max_length)["input_ids"]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # processes of one launch may write the same entry at once
        lengths = torch.tensor([len(row) for row in ids], dtype=torch.int64)
        flat = torch.tensor([token for row in ids for token in row], dtype=torch.int32)
        save_file({"ids": flat, "lengths": lengths}, str(tmp))
        tmp.replace(path)
    return ids


def _read_cached(path: Path, n_texts: int) -> list[list[int]] | None:
    """A cache entry as lists of ids; None (tokenize again) when it is damaged. Safetensors, never a pickle: the
    cache folder is a file any process could have written."""
    try:
        tensors = load_file(str(path))
        flat, lengths = tensors["ids"], tensors["lengths"]
        if lengths.numel() != n_texts or int(lengths.sum()) != flat.numel() or bool((lengths < 0).any()):
            return None
    except (SafetensorError, KeyError, OSError, RuntimeError):
        return None
    return [chunk.tolist() for chunk in torch.split(flat, lengths.tolist())]


class EncodedDataset(Dataset):
    """Token ids with, optionally, labels, each row's index (frozen-prefix cache) and a teacher's logits."""

    def __init__(self, input_ids: list[list[int]], labels: list[int] | None = None, with_index: bool = False,
                 teacher: torch.Tensor | None = None) -> None:
        if teacher is not None and len(teacher) != len(input_ids):
            raise ValueError(f"{len(teacher)} teacher rows for {len(input_ids)} texts")
        self.input_ids = input_ids
        self.labels = labels
        self.with_index = with_index
        self.teacher = teacher

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict:
        item = {"input_ids": self.input_ids[index]}
        if self.labels is not None:
            item["labels"] = self.labels[index]
        if self.with_index:
            item["index"] = index
        if self.teacher is not None:
            item["teacher"] = self.teacher[index]
        return item

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


def pad_multiple(device: str) -> int:
    """Batch widths are rounded up to this: 8 on CUDA (tensor-core tiles), none on a CPU. Measured on AMD Zen 4
    (bf16, MiniLM forward + backward, batch 32, 2026-12-06): 57 tokens wide took 294 ms and 64 took 351 ms, 5.2
    against 5.5 ms per token column, so rounding up to 8 only adds the padding's cost there. On an Intel Xeon with
    AMX (bf16 tiles of 16 rows by 32 columns; 2026-12-06, `python benchmarks/pad_width.py`, widths 49-64) the step
    grows with the width too (292 ms at 49, 394 ms at 64, 5.9-6.2 ms per column): rounding to 8 / 16 / 32 would cost
    7% / 15% / 15% more per step there, so no multiple on any CPU measured."""
    return 8 if device.startswith("cuda") else 1


class Collator:
    """Pads to the longest text in the batch (rounded up to `multiple`, see pad_multiple).

    transformers' DataCollatorWithPadding(pad_to_multiple_of=8) gives the same tensors but took 0.69 ms per batch of
    32 AG News texts against 0.36 ms here (AMD Zen 4, 2026-12-06), and it would need a wrapper for the row index and
    the teacher's logits, which tokenizer.pad does not know; so this stays hand-written.
    """

    def __init__(self, pad_token_id: int, multiple: int = 8) -> None:
        self.pad_token_id = pad_token_id
        self.multiple = multiple

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(item["input_ids"]) for item in items)
        width = -(-longest // self.multiple) * self.multiple
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.tensor(item["input_ids"])
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        for key in ("labels", "index"):
            if key in items[0]:
                batch[key] = torch.tensor([item[key] for item in items])
        if "teacher" in items[0]:
            batch["teacher"] = torch.stack([item["teacher"] for item in items])
        return batch


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Shuffled batches of similar-length texts: shuffle, sort within mega-batches, shuffle the batches.

    Kept because it is measurably better: on 10,519 AG News training texts (MiniLM tokenizer, batch 32, padded to a
    multiple of 8) random batches compute 2.06 tokens per real token, these 1.08, so an epoch costs about half.
    transformers' LengthGroupedSampler does the same grouping but yields indices with the longest batch first and
    draws from a torch generator; this one yields whole batches whose order depends only on (seed, epoch).

    The order depends only on (seed, epoch), so a resumed run sees the same batches as an uninterrupted one.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool = True,
                 mega_batch_factor: int = 50, drop_last: bool = False) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.mega_batch = batch_size * mega_batch_factor
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed * 1000 + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        if self.group_by_length:
            mega = [order[i:i + self.mega_batch] for i in range(0, len(order), self.mega_batch)]
            order = [i for chunk in mega for i in sorted(chunk, key=lambda j: -self.lengths[j])]
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.group_by_length:
            rng.shuffle(batches)
        yield from batches


def sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Inference batches, longest first: least padding, and the first batch shows the peak memory."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
