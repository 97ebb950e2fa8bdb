"""Files and folders written under a temporary name beside their target, renamed to it only when complete."""

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
    staging = _partial(target)
    shutil.rmtree(staging, ignore_errors=True)  # only ever a leftover partial folder of this same name
    staging.mkdir()
    try:
        yield staging
        _claim(staging, target, f"{target} appeared while it was being written; {fix}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def staged_file(path: Path, appeared: str) -> Iterator[Path]:
    """A temporary file in path's folder, renamed to path on success and removed on any failure.

    `appeared` is the one-line error given when `path` appeared meanwhile (it is never overwritten).
    """
    partial = _partial(path)
    try:
        yield partial
        _claim(partial, path, appeared)
    finally:
        partial.unlink(missing_ok=True)


def _partial(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.partial")


def _claim(partial: Path, target: Path, appeared: str) -> None:
    if target.exists():
        raise NewstuneError(appeared)
    partial.replace(target)
