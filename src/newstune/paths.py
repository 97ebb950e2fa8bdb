"""Where newstune keeps its caches (tokenized texts, installed model weights)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("NEWSTUNE_CACHE", Path.home() / ".cache" / "newstune"))
