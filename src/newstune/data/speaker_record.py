"""The LIAR speaker's credit record for each statement, as one `data.credit_history` mode defines it."""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

import numpy as np

from newstune.errors import NewstuneError

# Modes whose record carries the statement's own label. exclude_self is one of them on LIAR: a speaker's five
# counts are the same on all of their statements, so "counts minus this statement's rating" differs by label,
# and a model that met the speaker in training reads the label back (a speaker + record lookup from the
# training split labels 876 of the 1,283 test statements, 99.9% of them correctly).
LEAKY_MODES = ("raw", "exclude_self")
LIAR_CREDIT_FIELDS = ["barely_true_count", "false_count", "half_true_count", "mostly_true_count", "pants_fire_count"]
OWN_COUNT = {"barely-true": "barely_true_count", "false": "false_count", "half-true": "half_true_count",
             "mostly-true": "mostly_true_count", "pants-fire": "pants_fire_count"}
FOLDS = 5


def with_speaker_records(records: dict[str, list[dict]], mode: str) -> dict[str, list[dict]]:
    """Each split's LIAR rows (six-way rating in 'label') with the five counts replaced by the mode's record."""
    if mode in ("off", "raw"):
        return records
    if mode == "exclude_self":
        return {split: [minus_own_rating(row) for row in rows] for split, rows in records.items()}
    return training_records(records)


def minus_own_rating(row: dict) -> dict:
    field = OWN_COUNT.get(row["label"])
    if field is None:  # "true" has no count column
        return row
    return {**row, field: max(credit_count(row[field]) - 1, 0)}


def training_records(records: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The speaker's ratings on training statements other than this one, never read from this one's label.

    Validation and test rows get the whole training split's record: the same for every statement of a speaker,
    whatever its label. A training row gets the record of the other 4 folds (a fixed 5-way split by statement id).
    For a speaker with many statements the part left out mixes ratings; for one with few, each statement is often
    alone in its fold, its record is then "all but this one", and within that speaker the record shifts with the
    label. That shortcut exists in training only (evaluation records do not shift), so it can cost accuracy but
    cannot inflate a validation or test figure.
    """
    per_fold: dict[str, list[Counter]] = defaultdict(lambda: [Counter() for _ in range(FOLDS)])
    for row in records["train"]:
        field = OWN_COUNT.get(row["label"])
        if field and speaker_key(row):
            per_fold[speaker_key(row)][fold_of(row)][field] += 1
    totals = {speaker: sum(folds, Counter()) for speaker, folds in per_fold.items()}

    def record(row: dict, split: str) -> dict:
        speaker = speaker_key(row)
        counts = totals.get(speaker, Counter())
        if split == "train" and speaker in per_fold:
            counts = counts - per_fold[speaker][fold_of(row)]
        return {**row, **{field: counts[field] for field in LIAR_CREDIT_FIELDS}}

    return {split: [record(row, split) for row in rows] for split, rows in records.items()}


def speaker_key(row: dict) -> str:
    return str(row.get("speaker") or "").strip().lower()


def fold_of(row: dict) -> int:
    digits = "".join(ch for ch in str(row.get("id", "")).split(".")[0] if ch.isdigit())
    return int(digits) % FOLDS if digits else sum(map(ord, str(row.get("statement", "")))) % FOLDS


def record_numbers(rows: list[dict]) -> np.ndarray:
    """The record as numbers, one row per statement: the five shares and log(1 + rated statements)."""
    counts = np.array([[credit_count(row[field], field) for field in LIAR_CREDIT_FIELDS] for row in rows], dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    return np.hstack([counts / np.maximum(totals, 1), np.log1p(totals)]).reshape(len(rows), len(LIAR_CREDIT_FIELDS) + 1)


def credit_text(counts: dict[str, int]) -> str:
    """Counts with their shares: the shares read the same whether a record is PolitiFact's or the training split's."""
    total = sum(counts.values())
    items = []
    for name, count in counts.items():
        share = f" ({count / total:.0%})" if total else ""
        items.append(f"{name.removesuffix('_count').replace('_', ' ')} {count}{share}")
    return f"History ({total} rated): {', '.join(items)}."


def credit_count(value: object, column: str = "count") -> int:
    """A credit-history count from a file cell: empty means 0; anything but a whole number >= 0 is an error."""
    text = str(value).strip() if value is not None else ""
    if not text:
        return 0
    try:
        number = float(text)
    except ValueError:
        number = -1.0
    if not math.isfinite(number) or number < 0 or number != int(number):
        raise NewstuneError(f"LIAR credit-history {column} '{text[:40]}' is not a whole number >= 0; "
                            f"give the speaker's counts ({', '.join(LIAR_CREDIT_FIELDS)}) as integers")
    return int(number)


CREDIT_TEXT = re.compile(r"History \((\d+) rated\): ([^.]*)\.")
CREDIT_ITEM = re.compile(r"([a-z ]+?) (\d+)(?: \(\d+%\))?$")


def record_numbers_from_text(text: str) -> np.ndarray | None:
    """The inverse of credit_text inside a LIAR text: the record as record_numbers gives it, None when the text
    holds no record. Lets a consumer of the texts alone (the TF-IDF baseline) put the numbers beside the words."""
    match = CREDIT_TEXT.search(text)
    if match is None:
        return None
    counts = {}
    for item in match.group(2).split(", "):
        found = CREDIT_ITEM.match(item.strip())
        if found is None:
            return None
        counts[found.group(1).replace(" ", "_") + "_count"] = int(found.group(2))
    if sorted(counts) != sorted(LIAR_CREDIT_FIELDS):
        return None
    return record_numbers([counts])[0]
