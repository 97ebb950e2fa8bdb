"""Reading data files (CSV/TSV/JSONL, maybe gzipped): every problem is one NewstuneError naming the file and line."""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import pandas as pd

from newstune.errors import NewstuneError

JsonlRow = tuple[int, dict | None, str | None]  # (line number, object or None, problem or None)


def table_kind(path: Path) -> str:
    """'jsonl' (.jsonl/.json), 'tsv' or 'csv' (anything else), ignoring a trailing .gz."""
    suffixes = [s for s in path.suffixes if s != ".gz"]
    kind = suffixes[-1].lstrip(".") if suffixes else "csv"
    return {"json": "jsonl", "jsonl": "jsonl", "tsv": "tsv"}.get(kind, "csv")


def open_binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def undecodable_line(path: Path) -> tuple[int, int] | None:
    """(line number, first bad byte) of the first line that is not UTF-8; a newline byte is never inside a character."""
    with open_binary(path) as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return number, raw[err.start]
    return None


def file_error(path: Path, err: BaseException) -> NewstuneError:
    """One line for an exception raised while reading `path`."""
    if isinstance(err, gzip.BadGzipFile):
        return NewstuneError(f"{path}: not gzip data although the name ends in .gz; "
                             "compress it with gzip or drop .gz from the name")
    if isinstance(err, EOFError | zlib.error):
        return NewstuneError(f"{path}: the gzip data is truncated or corrupt ({err}); re-create the file")
    if isinstance(err, UnicodeDecodeError):
        where = undecodable_line(path)
        at = f":{where[0]}" if where else ""
        byte = f" (byte 0x{where[1]:02x})" if where else ""
        return NewstuneError(f"{path}{at}: not UTF-8 text{byte}; re-save the file as UTF-8")
    if isinstance(err, pd.errors.EmptyDataError):
        return NewstuneError(f"{path}: the file is empty; it needs a header line and data rows")
    if isinstance(err, IsADirectoryError):
        return NewstuneError(f"{path} is a folder, not a file; give the data file's path")
    if isinstance(err, FileNotFoundError):
        return NewstuneError(f"file not found: {path} (check the path)")
    if isinstance(err, OSError):
        return NewstuneError(f"{path}: cannot read it ({err.strerror or err}); check its permissions")
    if isinstance(err, pd.errors.ParserError):
        return NewstuneError(f"cannot parse {path}: {str(err).strip().splitlines()[0]} "
                             "(quote fields that contain the separator)")
    return NewstuneError(f"cannot parse {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turns the ways reading a file fails (compression, encoding, emptiness, parsing, access) into file_error."""
    try:
        yield
    except (OSError, EOFError, zlib.error, ValueError) as err:  # UnicodeDecodeError and pandas' errors are ValueErrors
        raise file_error(path, err) from None


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise _DuplicateKey(repeated[0])
    return dict(pairs)


def _parse_json_line(raw: bytes) -> tuple[dict | None, str | None]:
    try:
        line = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as err:
        return None, f"not UTF-8 text (byte 0x{raw[err.start]:02x})"
    if not line.strip():
        return None, None
    try:
        record = json.loads(line, object_pairs_hook=_unique_keys)
    except _DuplicateKey as err:
        return None, f"key '{err}' appears twice in one object"
    except json.JSONDecodeError as err:
        return None, f"invalid JSON ({err.msg} at column {err.colno})"
    return (record, None) if isinstance(record, dict) else (None, "not a JSON object")


def iter_jsonl(path: Path) -> Iterator[JsonlRow]:
    """Every non-blank line as (line number, object, None) or (line number, None, problem), streamed."""
    with reading(path), open_binary(path) as handle:
        for number, raw in enumerate(handle, start=1):
            record, problem = _parse_json_line(raw)
            if record is not None or problem is not None:
                yield number, record, problem


def _as_text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


def read_jsonl(path: Path) -> pd.DataFrame:
    """All objects of a JSON Lines file as strings (null stays missing), indexed by line number; any bad line fails."""
    records, lines = [], []
    for number, record, problem in iter_jsonl(path):
        if problem:
            raise NewstuneError(f"{path}:{number}: {problem}; fix the line (one JSON object per line)")
        records.append({key: _as_text(value) for key, value in record.items()})
        lines.append(number)
    return pd.DataFrame.from_records(records, index=pd.Index(lines, name="line"))


def read_table(path: Path, **kwargs) -> pd.DataFrame:
    """CSV/TSV/JSONL (maybe gzipped), every field a string, no NaN conversion, indexed by line number."""
    if not path.is_file():
        raise NewstuneError(f"file not found: {path} (check the path in the config)")
    kind = table_kind(path)
    if kind == "jsonl":
        return read_jsonl(path)
    with reading(path):
        frame = pd.read_csv(path, sep="\t" if kind == "tsv" else ",", dtype=str, keep_default_na=False,
                            encoding="utf-8", **kwargs)
    first = 1 if kwargs.get("header", "infer") is None else 2
    frame.index = pd.RangeIndex(first, first + len(frame), name="line")
    return frame


def header_fields(path: Path) -> list[str]:
    """The raw header line of a CSV/TSV, duplicates kept (pandas renames a second 'text' to 'text.1')."""
    with reading(path), open_binary(path) as handle:
        text = io.TextIOWrapper(handle, encoding="utf-8-sig", newline="")
        return next(csv.reader(text, delimiter="\t" if table_kind(path) == "tsv" else ","), [])


def require_columns(path: Path, frame: pd.DataFrame, needed: list[str]) -> None:
    """Rows present, every needed column present once, and a value in it on every row."""
    if frame.empty:
        fix = "add one JSON object per line" if table_kind(path) == "jsonl" else "add rows below the header line"
        raise NewstuneError(f"{path}: no data rows; {fix}")
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise NewstuneError(f"{path}: no column(s) {missing}; columns are {list(frame.columns)} "
                            "(set data.text_columns / data.label_column)")
    if table_kind(path) != "jsonl":
        header = header_fields(path)
        repeated = sorted({c for c in needed if header.count(c) > 1})
        if repeated:
            raise NewstuneError(f"{path}:1: column(s) {repeated} appear more than once in the header, so which "
                                "one to use is ambiguous; rename or remove the extra column(s)")
    for column in needed:
        empty = frame.index[frame[column].isna()]
        if len(empty):
            raise NewstuneError(f"{path}:{empty[0]}: no '{column}' value ({len(empty)} row(s) lack it); "
                                "add it or remove the row(s)")
