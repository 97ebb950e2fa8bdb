"""Build a classifier from a pretrained encoder, put LoRA on it, and save or reload a run's model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from newstune.config import LoraSettings, ModelSettings
from newstune.errors import NewstuneError
from newstune.modeling.weights import resolve_model_path

transformers.logging.set_verbosity_error()

# Where each projection lives, per architecture, as a regex over the end of the module's full name. Full names
# keep `o` (attention output) apart from `ffn_out` (the layer output): both end in "output.dense" in BERT.
ARCH_MODULES: dict[str, dict[str, str]] = {
    "bert": dict(q=r"attention\.self\.query", k=r"attention\.self\.key", v=r"attention\.self\.value",
                 o=r"attention\.output\.dense", ffn_in=r"intermediate\.dense", ffn_out=r"layer\.\d+\.output\.dense"),
    "mpnet": dict(q=r"attention\.attn\.q", k=r"attention\.attn\.k", v=r"attention\.attn\.v", o=r"attention\.attn\.o",
                  ffn_in=r"intermediate\.dense", ffn_out=r"layer\.\d+\.output\.dense"),
    "distilbert": dict(q=r"attention\.q_lin", k=r"attention\.k_lin", v=r"attention\.v_lin", o=r"attention\.out_lin",
                       ffn_in=r"ffn\.lin1", ffn_out=r"ffn\.lin2"),
    "deberta-v2": dict(q=r"attention\.self\.query_proj", k=r"attention\.self\.key_proj",
                       v=r"attention\.self\.value_proj", o=r"attention\.output\.dense", ffn_in=r"intermediate\.dense",
                       ffn_out=r"layer\.\d+\.output\.dense"),
}
for _alias in ("roberta", "xlm-roberta", "electra", "camembert"):
    ARCH_MODULES[_alias] = ARCH_MODULES["bert"]
SHORTHANDS = {"q": ["q"], "k": ["k"], "v": ["v"], "o": ["o"], "qv": ["q", "v"], "qkv": ["q", "k", "v"],
              "qkvo": ["q", "k", "v", "o"], "ffn": ["ffn_in", "ffn_out"],
              "all": ["q", "k", "v", "o", "ffn_in", "ffn_out"]}
DEFAULT_TARGETS = "qv"
_LAYER_INDEX = re.compile(r"\.(?:layer|layers)\.(\d+)\.")


def target_roles(settings: LoraSettings) -> tuple[list[str], list[str]]:
    """(table roles such as q/v/ffn_out from the shorthands, other names given literally)."""
    roles: list[str] = []
    literal: list[str] = []
    for item in settings.target_modules or [DEFAULT_TARGETS]:
        if item in SHORTHANDS:
            roles += SHORTHANDS[item]
        else:
            literal.append(item)
    return list(dict.fromkeys(roles)), literal


def encoder_layer_count(model: PreTrainedModel) -> int:
    config = model.config
    return getattr(config, "num_hidden_layers", None) or config.n_layers


def target_modules(model: PreTrainedModel, settings: LoraSettings) -> list[str]:
    """Full names of the linear modules that get LoRA; every shorthand role must be found in every chosen layer."""
    roles, literal = target_roles(settings)
    model_type = model.config.model_type
    table = ARCH_MODULES.get(model_type)
    if roles and table is None:
        raise NewstuneError(f"no LoRA target table for architecture '{model_type}'; "
                            "set lora.target_modules to module names explicitly")
    layers = lora_layers(model, settings.top_layers)
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    chosen: list[str] = []
    for role in roles:
        pattern = re.compile(rf"(^|\.){table[role]}$")
        found = {name: _layer_of(name) for name in linear if pattern.search(name)}
        found = {name: layer for name, layer in found.items() if layer in layers}
        missing = sorted(set(layers) - set(found.values()))
        if missing:
            raise NewstuneError(f"LoRA target '{role}' ({table[role]}) matched no module in layer(s) {missing} of "
                                f"this {model_type} model; the architecture's module names differ from newstune's "
                                "table: set lora.target_modules to module names explicitly")
        chosen += found
    for name in literal:
        found = [m for m in linear if (m == name or m.endswith(f".{name}")) and _layer_of(m) in (None, *layers)]
        if not found:
            raise NewstuneError(f"lora.target_modules '{name}' matches no linear module of this {model_type} model "
                                f"in layers {layers[0]}-{layers[-1]}; use a shorthand ({', '.join(SHORTHANDS)}) "
                                "or a module name such as 'query'")
        chosen += found
    return list(dict.fromkeys(chosen))


def _layer_of(module_name: str) -> int | None:
    match = _LAYER_INDEX.search(module_name)
    return int(match.group(1)) if match else None


def lora_layers(model: PreTrainedModel, top_layers: int | None) -> list[int]:
    """Indices of the encoder layers that get LoRA: the top `top_layers`, or all."""
    count = encoder_layer_count(model)
    if top_layers is not None and top_layers > count:
        raise NewstuneError(f"lora.top_layers={top_layers} but the model has {count} layers; use 1..{count}")
    return list(range(count - (top_layers or count), count))


# Architectures whose position ids start after the padding index, so two positions are never used by text.
PADDING_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "mpnet")


def max_positions(model: PreTrainedModel) -> int | None:
    config = model.config
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and config.model_type in PADDING_OFFSET_POSITIONS:
        limit -= (config.pad_token_id or 0) + 1
    return limit


def check_max_length(model: PreTrainedModel, max_length: int) -> None:
    limit = max_positions(model)
    if limit is not None and max_length > limit:
        raise NewstuneError(f"data.max_length {max_length} is longer than this {model.config.model_type} model's "
                            f"{limit} positions; set data.max_length to at most {limit}")


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


def load_tokenizer(path: str) -> transformers.PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise NewstuneError(f"cannot load a tokenizer from '{path}': {str(err).splitlines()[0][:200]}") from None


def attention(setting: str) -> str | None:
    return None if setting == "auto" else setting


def problem_type(multi_label: bool) -> str:
    """The HF config's problem_type: what a plain `from_pretrained` + pipeline of an export applies (sigmoid or not)."""
    return "multi_label_classification" if multi_label else "single_label_classification"


def load_base(model_settings: ModelSettings, label_names: list[str],
              multi_label: bool = False) -> tuple[PreTrainedModel, list[str], str]:
    path = resolve_model_path(model_settings.name)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)}, output_loading_info=True,
            problem_type=problem_type(multi_label),
            attn_implementation=attention(model_settings.attn_implementation),
        )
    except (OSError, ValueError) as err:
        raise NewstuneError(f"cannot load model '{model_settings.name}': {str(err).splitlines()[0][:200]} "
                            "(use a hub id with internet, a local model folder, or an alias: minilm, mpnet)") from None
    return model, new_head_modules(model, info["missing_keys"]), path


def build_model(model_settings: ModelSettings, lora: LoraSettings, label_names: list[str],
                multi_label: bool = False) -> LoadedModel:
    model, head, path = load_base(model_settings, label_names, multi_label)
    tokenizer = load_tokenizer(path)
    if lora.method == "lora":
        model = apply_lora(model, lora, head)
    return LoadedModel(model, tokenizer)


def apply_lora(model: PreTrainedModel, lora: LoraSettings, head: list[str]) -> PeftModel:
    targets = target_modules(model, lora)
    peft_config = LoraConfig(task_type="SEQ_CLS", r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=targets, bias=lora.bias, modules_to_save=head)
    return get_peft_model(model, peft_config)


def hold_frozen_in(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Cast frozen floating-point weights once (autocast would re-cast them every step). Returns count cast.

    A module that also holds a trainable parameter (a LayerNorm whose bias trains under `lora.bias: all`) keeps its
    frozen ones in their dtype: ops such as layer_norm need weight and bias in one dtype."""
    count = 0
    with torch.no_grad():
        for module in model.modules():
            own = list(module.parameters(recurse=False))
            if any(p.requires_grad for p in own):
                continue
            for param in own:
                if param.is_floating_point() and param.dtype != dtype:
                    param.data = param.data.to(dtype)
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
                     attn_implementation: str = "auto", multi_label: bool = False) -> PeftModel | PreTrainedModel:
    """The model saved by save_model: a LoRA adapter (+ head) over the base weights, or a full model."""
    if (folder / "adapter_config.json").is_file():
        base = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(base_name), num_labels=len(label_names), id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)}, attn_implementation=attention(attn_implementation),
            problem_type=problem_type(multi_label))
        return PeftModel.from_pretrained(base, folder)
    return AutoModelForSequenceClassification.from_pretrained(folder,
                                                              attn_implementation=attention(attn_implementation))


def merge_lora(model: torch.nn.Module) -> PreTrainedModel:
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model
