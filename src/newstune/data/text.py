"""Text cleaning and building input text from structured fields."""

from __future__ import annotations

import html
import re

from newstune.config import CleanConfig

_TAG = re.compile(r"<[^>]+>")
_SPACES = re.compile(r"\s+")
_REPEATED_PUNCT = re.compile(r"([!?.,])\1{2,}")
_PUNCT_MAP = str.maketrans({"“": '"', "”": '"', "‘": "'", "’": "'", "–": "-", "—": "-", "…": "..."})


def fix_ag_artifacts(text: str) -> str:
    """AG News stores entities without '&' ('#39;', 'quot;') and backslash escapes for newlines."""
    text = re.sub(r"&?#(\d+);", lambda m: chr(int(m.group(1))), text)
    text = re.sub(r"&?(quot|amp|lt|gt);", lambda m: html.unescape(f"&{m.group(1)};"), text)
    text = text.replace("\\$", "$")
    return re.sub(r"\\+n?", " ", text)


def clean_text(text: str, config: CleanConfig) -> str:
    if config.ag_artifacts:
        text = fix_ag_artifacts(text)
    if config.html:
        text = html.unescape(_TAG.sub(" ", text))
    if config.punctuation:
        text = _REPEATED_PUNCT.sub(r"\1", text.translate(_PUNCT_MAP))
    if config.lowercase:
        text = text.lower()
    return _SPACES.sub(" ", text).strip()


LIAR_FIELD_TITLES = {
    "speaker": "Speaker",
    "job": "Job",
    "state": "State",
    "party": "Party",
    "subject": "Subject",
    "context": "Context",
}
LIAR_CREDIT_FIELDS = ["barely_true_count", "false_count", "half_true_count", "mostly_true_count", "pants_fire_count"]


def textualize_liar(row: dict[str, str], fields: list[str], credit_history: bool) -> str:
    """'statement [SEP-like] Speaker: x. Job: y. ...' -- metadata as natural text the encoder can read."""
    parts = [row["statement"].strip()]
    for field in fields:
        value = row[field].strip().replace("-", " ") if field == "speaker" else row[field].strip()
        if field == "subject":
            value = value.replace(",", ", ")
        if value:
            parts.append(f"{LIAR_FIELD_TITLES[field]}: {value}.")
    if credit_history:
        counts = ", ".join(f"{name.removesuffix('_count').replace('_', ' ')} {row[name]}"
                           for name in LIAR_CREDIT_FIELDS)
        parts.append(f"History: {counts}.")
    return " ".join(parts)
