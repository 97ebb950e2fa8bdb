"""Resumable training state on disk without pickle: tensors in one safetensors file, everything else as JSON.

A run folder is something users send each other, so loading it must never run code: `torch.load` of a
pickle can. Counters, scheduler and RNG state travel as JSON inside the safetensors header.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from newstune.errors import NewstuneError

LEGACY_PICKLES = ("last.pt", "best_trainable.pt")


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """Python/NumPy RNG state as JSON, torch (and CUDA) generator states as tensors."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(internal), gauss], "numpy": [name, int(pos), int(has_gauss), float(cached)]}
    tensors = {"rng.numpy_keys": torch.from_numpy(keys.astype(np.int64)), "rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    return meta, tensors


def restore_rng(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[key] for key in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    state = optimizer.state_dict()
    tensors = {f"optimizer.{index}.{name}": value.contiguous() for index, slots in state["state"].items()
               for name, value in slots.items()}
    return {"param_groups": state["param_groups"], "slots": {str(i): list(s) for i, s in state["state"].items()}}, \
        tensors


def load_optimizer_state(optimizer: torch.optim.Optimizer, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    slots = {int(index): {name: tensors[f"optimizer.{index}.{name}"] for name in names}
             for index, names in meta["slots"].items()}
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})


def save_weights(path: Path, weights: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Atomically: a crash mid-write leaves the previous file in place."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp),
              metadata={"newstune": json.dumps(meta or {})})
    tmp.replace(path)


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the JSON metadata of a file written by save_weights (no pickle is ever read)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("newstune", "{}"))
            return {key: handle.get_tensor(key) for key in handle.keys()}, meta
    except (OSError, ValueError, SafetensorError) as err:  # a damaged or hostile header too (no traceback)
        raise NewstuneError(f"{path} is not a readable newstune checkpoint ({str(err)[:120]}); "
                            "start a new run") from None


def refuse_pickles(folder: Path) -> None:
    for name in LEGACY_PICKLES:
        if (folder / name).exists():
            raise NewstuneError(f"{folder / name} is a pickle checkpoint; newstune never loads pickles (they can "
                                "run code). Delete it and start a new run, or resume only runs you made yourself "
                                "with this version")
