"""Text cleaning and building input text from structured fields.

Every step is total (no exception on any str) and linear in the text's length: each regex either has a bounded
body or a body that cannot contain the character a match starts with, so the spans that match attempts read do not
overlap and no attempt rescans text another attempt already covered.
"""

from __future__ import annotations

import html
import re
import unicodedata
from functools import lru_cache

from newstune.config import CleanConfig
from newstune.data.speaker_record import LIAR_CREDIT_FIELDS, credit_count, credit_text

# A tag may not contain '<': an attempt starting at one '<' never reads past the next '<', so the attempts over a
# row of unclosed '<' cover disjoint spans (linear); `<[^>]+>` rescanned to the end of the text from every '<'.
_TAG = re.compile(r"<[^<>]+>")
# html.unescape's own entity pattern: it is linear, but int() of a long decimal reference raises ValueError.
_ENTITY = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")
_AG_NUMERIC = re.compile(r"&?#([0-9]+);")
_AG_NAMED = re.compile(r"&?(quot|amp|lt|gt);")
_SURROGATES = re.compile(r"[\ud800-\udfff]")
_SPACES = re.compile(r"\s+")
_REPEATED_PUNCT = re.compile(r"([!?.,])\1{2,}")
_PUNCT_MAP = str.maketrans({"“": '"', "”": '"', "‘": "'", "’": "'", "–": "-", "—": "-", "…": "..."})
_MAX_CODE_POINT_DIGITS = 7  # 0x10FFFF = 1114111: more significant digits can only be an invalid code point


def numeric_reference(digits: str, base: int = 10) -> str:
    """The character of a numeric reference, U+FFFD where it is no valid code point (as html.unescape does)."""
    significant = digits.lstrip("0")
    if len(significant) > _MAX_CODE_POINT_DIGITS:
        return "\ufffd"
    return html.unescape(f"&#{'x' if base == 16 else ''}{significant or '0'};")


def _unescape_entity(match: re.Match) -> str:
    body = match.group(1)
    if body.startswith(("#x", "#X")):
        return numeric_reference(body[2:].rstrip(";"), 16)
    if body.startswith("#"):
        return numeric_reference(body[1:].rstrip(";"))
    return html.unescape(match.group(0))


def unescape(text: str) -> str:
    """html.unescape without its ValueError on a decimal reference longer than 4,300 digits."""
    return _ENTITY.sub(_unescape_entity, text)


def fix_ag_artifacts(text: str) -> str:
    """AG News stores entities without '&' ('#39;', 'quot;') and backslash escapes for newlines."""
    text = _AG_NUMERIC.sub(lambda m: numeric_reference(m.group(1)), text)
    text = _AG_NAMED.sub(lambda m: html.unescape(f"&{m.group(1)};"), text)
    text = text.replace("\\$", "$")
    return re.sub(r"\\+n?", " ", text)


def clean_text(text: str, config: CleanConfig) -> str:
    """Cleaned text; lone surrogates (which tokenizers reject) are removed first."""
    text = _SURROGATES.sub("", text)
    if config.ag_artifacts:
        text = fix_ag_artifacts(text)
    if config.html:
        text = unescape(_TAG.sub(" ", text))
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


def textualize_liar(row: dict[str, str], fields: list[str], credit_history: bool) -> str:
    """'statement Speaker: x. Job: y. ... History (n rated): ...' -- metadata as natural text the encoder reads."""
    parts = [row["statement"].strip()]
    for field in fields:
        value = row[field].strip().replace("-", " ") if field == "speaker" else row[field].strip()
        if field == "subject":
            value = value.replace(",", ", ")
        if value:
            parts.append(f"{LIAR_FIELD_TITLES[field]}: {value}.")
    if credit_history:
        parts.append(credit_text({name: credit_count(row[name], name) for name in LIAR_CREDIT_FIELDS}))
    return " ".join(parts)


def model_text(text: str, config: CleanConfig) -> str:
    """What a trained run reads at prediction time: the cleaned text or, when the cleaning leaves nothing visible (a
    text of markup only, `<b></b>`), the text as given. One rule for the service and predict: every text with a
    visible character -- what the service's schema asks for -- gets a label. (Training drops or refuses such rows,
    data.drop_empty: there the label would teach nothing.)"""
    cleaned = clean_text(text, config)
    return cleaned if has_visible(cleaned) else _SPACES.sub(" ", _SURROGATES.sub("", text)).strip()


# Characters that show nothing: controls, zero-width/format characters, surrogates, spaces and separators.
_INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Zs", "Zl", "Zp"})
VISIBLE = "a character that is not whitespace, a control or a zero-width/format character"


@lru_cache(maxsize=1)
def visible_pattern() -> str:
    """has_visible as a regular expression (a character class outside _INVISIBLE, searched anywhere), for the
    service's OpenAPI schema: a client or a schema fuzzer then knows that a control-only text is invalid."""
    ranges, start = [], None
    for point in range(0x110001):
        invisible = point <= 0x10FFFF and unicodedata.category(chr(point)) in _INVISIBLE
        if invisible and start is None:
            start = point
        elif not invisible and start is not None:
            ranges.append((start, point - 1))
            start = None

    def escape(point: int) -> str:  # \\uXXXX reads the same in Python and ECMA-262; outside the BMP the character
        return f"\\u{point:04x}" if point <= 0xFFFF else chr(point)  # itself (Python has no \\u{...}, ECMA no \\U)

    return "[^" + "".join(escape(a) if a == b else f"{escape(a)}-{escape(b)}" for a, b in ranges) + "]"


def has_visible(text: str) -> bool:
    """One rule for the service and predict: a text must hold something a reader can see."""
    return not all(unicodedata.category(char) in _INVISIBLE for char in text)


def has_lone_surrogate(text: str) -> bool:
    """Half of a UTF-16 pair with no other half: not valid Unicode, and no UTF-8 file can hold it."""
    return any("\ud800" <= char <= "\udfff" for char in text)
