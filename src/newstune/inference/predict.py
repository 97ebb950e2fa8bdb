"""Batch prediction over large files: streamed in chunks, batched by length, bad rows reported by line.

Everything checkable is checked before any output exists; the output is written under a temporary name in its
folder and renamed only when every row is done, so a failure never leaves a partial or empty file behind.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from newstune.data.files import JsonlRow, iter_jsonl, reading
from newstune.data.registry import record_input_text
from newstune.data.text import VISIBLE, has_lone_surrogate, has_visible, model_text
from newstune.decisions import rule as decisions
from newstune.errors import NewstuneError
from newstune.rundir.run import LoadedRun
from newstune.rundir.staging import staged_file

CHUNK_ROWS = 2048


def file_kind(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    kind = suffixes[-1].lstrip(".") if suffixes else "csv"
    if kind not in ("csv", "tsv", "jsonl", "json"):
        raise NewstuneError(f"{path}: unknown file type '.{kind}'; use .csv, .tsv or .jsonl (optionally .gz)")
    return "jsonl" if kind == "json" else kind


def check_paths(input_path: Path, output_path: Path) -> None:
    """One line per problem with the two paths, before any work: nothing is read or written yet."""
    if not input_path.exists():
        raise NewstuneError(f"input file not found: {input_path}")
    if not input_path.is_file():
        raise NewstuneError(f"input {input_path} is a folder, not a file; give the file to label")
    if not os.access(input_path, os.R_OK):
        raise NewstuneError(f"input {input_path} is not readable; check its permissions")
    file_kind(input_path)
    file_kind(output_path)
    if output_path.suffix == ".gz":
        raise NewstuneError(f"--output {output_path}: compressed output is not supported; drop the .gz")
    if output_path.exists():
        raise NewstuneError(f"output file {output_path} already exists; choose another --output")
    if input_path.resolve() == output_path.resolve():
        raise NewstuneError("--output must differ from --input")
    if not output_path.parent.is_dir():
        raise NewstuneError(f"output folder {output_path.parent} does not exist; create it or choose another --output")


def read_chunks(path: Path) -> Iterator[list[JsonlRow]]:
    """(line number, record or None, parse error or None), CHUNK_ROWS at a time, never the whole file."""
    if not path.is_file():
        raise NewstuneError(f"input file not found: {path}")
    kind = file_kind(path)
    if kind == "jsonl":
        yield from _jsonl_chunks(path)
        return
    with reading(path):
        reader = pd.read_csv(path, sep="\t" if kind == "tsv" else ",", dtype=str, keep_default_na=False,
                             chunksize=CHUNK_ROWS, encoding="utf-8",
                             quoting=csv.QUOTE_NONE if kind == "tsv" else csv.QUOTE_MINIMAL)
        line = 2
        for frame in reader:
            records = frame.to_dict("records")
            if records:
                yield [(line + i, record, None) for i, record in enumerate(records)]
            line += len(records)


def _jsonl_chunks(path: Path) -> Iterator[list[JsonlRow]]:
    rows = iter_jsonl(path)
    while chunk := list(itertools.islice(rows, CHUNK_ROWS)):
        yield chunk


def row_text(record: dict | None, run: LoadedRun) -> tuple[str | None, str | None]:
    """The row's text as training built it, or why this row gets no prediction (the other rows still do)."""
    if record is None:
        return None, None
    try:
        raw = record_input_text(record, run.config.data)
    except NewstuneError as err:
        return None, str(err)
    if len(raw) > MAX_ROW_CHARS:  # before cleaning and tokenization: a 100 MB row once took 14 GB there
        return None, f"text of {len(raw):,} characters is over the {MAX_ROW_CHARS:,} a row may hold; split it"
    if has_lone_surrogate(raw):
        return None, "text holds a lone surrogate (invalid Unicode); fix the encoding of this row"
    text = model_text(raw, run.config.data.clean)
    if not text:
        return None, "empty text"
    return (text, None) if has_visible(text) else (None, f"text has no visible character (needs {VISIBLE})")


def neutral_cell(value: object) -> object:
    """A CSV/TSV cell a spreadsheet will not run as a formula (OWASP CSV injection): text that begins with =, +, -,
    @, a tab or a carriage return gets a leading apostrophe. Numbers are left alone."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


MAX_ROW_CHARS = 100_000  # far beyond what max_length tokens read; bounds memory before tokenization
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class OutputWriter:
    """Writes predictions in the output file's format: input columns + predicted label + one probability per class."""

    def __init__(self, path: Path, label_names: list[str], kind: str | None = None) -> None:
        self.kind = kind or file_kind(path)
        self.label_names = label_names
        # a lone surrogate in an echoed input column is written escaped instead of failing the whole file
        self.handle = path.open("w", newline="", encoding="utf-8", errors="backslashreplace")
        self.writer: csv.DictWriter | None = None

    def write(self, record: dict) -> None:
        if self.kind == "jsonl":
            self.handle.write(json.dumps(record) + "\n")
            return
        flat = {k: "|".join(v) if isinstance(v, list) else v for k, v in record.items() if k != "probabilities"}
        flat.update({f"prob_{name}": p for name, p in (record.get("probabilities") or {}).items()})
        if self.writer is None:
            fields = [*flat.keys(), *(f"prob_{n}" for n in self.label_names if f"prob_{n}" not in flat)]
            self.writer = csv.DictWriter(self.handle, fieldnames=fields, delimiter="\t" if self.kind == "tsv" else ",",
                                         extrasaction="ignore")
            self.writer.writerow({name: neutral_cell(name) for name in fields})
        self.writer.writerow({k: neutral_cell(v) for k, v in flat.items()})

    def close(self) -> None:
        self.handle.close()


def predict_file(run: LoadedRun, input_path: Path, output_path: Path, batch_size: int = 64) -> dict:
    """Predict every row; rows that cannot be read get an `error` and are counted, never dropped."""
    check_paths(input_path, output_path)
    chunks = read_chunks(input_path)
    first = next(chunks, None)
    if first is None:
        fix = "add one JSON object per line" if file_kind(input_path) == "jsonl" else "add rows below the header line"
        raise NewstuneError(f"{input_path}: no data rows; {fix}")
    with staged_file(output_path, f"output file {output_path} appeared while predicting; choose another --output") \
            as partial:
        writer = OutputWriter(partial, run.label_names, file_kind(output_path))
        try:
            return _predict_chunks(run, itertools.chain([first], chunks), writer, input_path, batch_size)
        finally:
            writer.close()


def _predict_chunks(run: LoadedRun, chunks: Iterator[list[JsonlRow]], writer: OutputWriter, input_path: Path,
                    batch_size: int) -> dict:
    counts = {"rows": 0, "predicted": 0, "errors": 0}
    with tqdm(desc="predict", unit="rows") as bar:
        for chunk in chunks:
            texts = [(number, record, *row_text(record, run)) for number, record, _ in chunk]
            parse_errors = {number: error for number, _, error in chunk if error}
            good = [(n, r, t) for n, r, t, e in texts if t is not None]
            probs = probabilities(run, [t for _, _, t in good], batch_size)
            by_line = {n: p for (n, _, _), p in zip(good, probs)}
            for number, record, _, error in texts:
                error = parse_errors.get(number) or error
                writer.write(_output_record(number, record, by_line.get(number), error, run))
                counts["rows"] += 1
                counts["errors" if error else "predicted"] += 1
                if error:
                    print(f"{input_path}:{number}: {error}", file=sys.stderr)
            bar.update(len(chunk))
    return counts


def probabilities(run: LoadedRun, texts: list[str], batch_size: int) -> np.ndarray:
    if not texts:
        return np.zeros((0, len(run.label_names)))
    ids = run.tokenizer(texts, truncation=True, max_length=run.config.data.max_length)["input_ids"]
    logits = run.logits(texts, ids, batch_size)
    return decisions.probabilities(logits, run.decision)


def _output_record(number: int, record: dict | None, probs: np.ndarray | None, error: str | None,
                   run: LoadedRun) -> dict:
    out = {"line": number, **(record or {})}
    if probs is None:
        return {**out, "predicted_label": "", "error": error or "unreadable row"}
    decided = decisions.labels(probs[None, :], run.decision)
    label = decisions.label_names(decided, run.label_names, run.decision)[0]  # multi-label: the list of labels on
    return {**out, "predicted_label": label, "error": "",
            "probabilities": {name: round(float(p), 6) for name, p in zip(run.label_names, probs)}}
