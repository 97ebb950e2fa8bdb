"""Folders written under a temporary name: renamed when complete, gone on failure, never over another."""

import pytest

from newstune.errors import NewstuneError
from newstune.rundir.staging import staged_folder


def test_a_failed_block_leaves_nothing_and_a_finished_one_is_renamed(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_folder(target, "fix") as folder:
        (folder / "model").write_text("half")
        raise RuntimeError("conversion failed")
    assert list(tmp_path.iterdir()) == []
    with staged_folder(target, "fix") as folder:
        (folder / "model").write_text("whole")
    assert (target / "model").read_text() == "whole" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_target_that_appears_meanwhile_is_never_overwritten(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(NewstuneError, match=r"out appeared while it was being written; delete it first$"), \
            staged_folder(target, "delete it first") as folder:
        (folder / "model").write_text("new")
        target.mkdir()
        (target / "model").write_text("the user's")
    assert (target / "model").read_text() == "the user's" and [p.name for p in tmp_path.iterdir()] == ["out"]
