"""A folder written under a temporary name beside its target and renamed to it only when complete."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from newstune.errors import NewstuneError


@contextmanager
def staged_folder(target: Path, fix: str) -> Iterator[Path]:
    """Yields an empty temporary folder; renamed to `target` when the block succeeds, removed on any failure.

    `fix` finishes the one-line error given when `target` appeared meanwhile (nothing is ever overwritten).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # only ever a leftover partial folder of this same name
    staging.mkdir()
    try:
        yield staging
        if target.exists():
            raise NewstuneError(f"{target} appeared while it was being written; {fix}")
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
