"""Model building: LoRA lands on exactly the named projections of every architecture (peft's test style)."""

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    MPNetConfig,
    RobertaConfig,
)

from newstune.config import LoraSettings, ModelSettings
from newstune.errors import NewstuneError
from newstune.modeling.model import ARCH_MODULES, apply_lora, build_model, count_parameters, hold_frozen_in
from newstune.modeling.weights import resolve_model_path

LABELS = ["a", "b", "c"]
SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
             max_position_embeddings=66, pad_token_id=0)
CONFIGS = {
    "bert": lambda: BertConfig(**SMALL),
    "roberta": lambda: RobertaConfig(**SMALL),
    "mpnet": lambda: MPNetConfig(**SMALL),
    "electra": lambda: ElectraConfig(**SMALL, embedding_size=16),
    "deberta-v2": lambda: DebertaV2Config(**SMALL),
    "distilbert": lambda: DistilBertConfig(vocab_size=64, dim=32, n_layers=3, n_heads=2, hidden_dim=48,
                                           max_position_embeddings=66, pad_token_id=0),
}
# The real module of each projection in layer {i}, written out by hand from the transformers source
# (not derived from newstune's table, so a wrong table entry fails here).
ENCODER = "encoder.layer.{i}."
REAL_NAMES = {
    "bert": {"q": ENCODER + "attention.self.query", "k": ENCODER + "attention.self.key",
             "v": ENCODER + "attention.self.value", "o": ENCODER + "attention.output.dense",
             "ffn_in": ENCODER + "intermediate.dense", "ffn_out": ENCODER + "output.dense"},
    "mpnet": {"q": ENCODER + "attention.attn.q", "k": ENCODER + "attention.attn.k", "v": ENCODER + "attention.attn.v",
              "o": ENCODER + "attention.attn.o", "ffn_in": ENCODER + "intermediate.dense",
              "ffn_out": ENCODER + "output.dense"},
    "deberta-v2": {"q": ENCODER + "attention.self.query_proj", "k": ENCODER + "attention.self.key_proj",
                   "v": ENCODER + "attention.self.value_proj", "o": ENCODER + "attention.output.dense",
                   "ffn_in": ENCODER + "intermediate.dense", "ffn_out": ENCODER + "output.dense"},
    "distilbert": {"q": "transformer.layer.{i}.attention.q_lin", "k": "transformer.layer.{i}.attention.k_lin",
                   "v": "transformer.layer.{i}.attention.v_lin", "o": "transformer.layer.{i}.attention.out_lin",
                   "ffn_in": "transformer.layer.{i}.ffn.lin1", "ffn_out": "transformer.layer.{i}.ffn.lin2"},
}
REAL_NAMES["roberta"] = REAL_NAMES["electra"] = REAL_NAMES["bert"]
ROLES = {"qv": ["q", "v"], "qkv": ["q", "k", "v"], "qkvo": ["q", "k", "v", "o"], "ffn": ["ffn_in", "ffn_out"],
         "all": ["q", "k", "v", "o", "ffn_in", "ffn_out"]}


def tiny_classifier(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = CONFIGS[arch]()
    config.num_labels = len(LABELS)
    return AutoModelForSequenceClassification.from_config(config)


def lora_modules(model: torch.nn.Module) -> set[str]:
    """Names (inside the base model's encoder) of the modules that carry a LoRA adapter."""
    names = {name for name, module in model.named_modules() if hasattr(module, "lora_A") and module.lora_A}
    return {name.split(".", 3)[3] for name in names}  # drop "base_model.model.<encoder prefix>."


@pytest.mark.parametrize("shorthand", list(ROLES))
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_lora_lands_on_exactly_the_named_projections(arch, shorthand):
    model = apply_lora(tiny_classifier(arch), LoraSettings(r=2, target_modules=shorthand), ["classifier"])
    expected = {REAL_NAMES[arch][role].format(i=i) for role in ROLES[shorthand] for i in range(3)}
    assert lora_modules(model) == expected
    logits = model(input_ids=torch.tensor([[2, 10, 11, 3]])).logits
    assert logits.shape == (1, 3)


@pytest.mark.parametrize("arch", ["bert", "mpnet"])
def test_top_layers_puts_lora_only_in_the_top_layers(arch):
    model = apply_lora(tiny_classifier(arch), LoraSettings(r=2, target_modules="qkvo", top_layers=1), ["classifier"])
    assert lora_modules(model) == {REAL_NAMES[arch][role].format(i=2) for role in ROLES["qkvo"]}


def test_a_table_entry_that_misses_a_layer_is_an_error(monkeypatch):
    monkeypatch.setitem(ARCH_MODULES, "mpnet", {**ARCH_MODULES["mpnet"], "o": r"attention\.o"})
    with pytest.raises(NewstuneError, match=r"LoRA target 'o'.*layer\(s\) \[0, 1, 2\]"):
        apply_lora(tiny_classifier("mpnet"), LoraSettings(target_modules="qkvo"), ["classifier"])


def test_explicit_module_names_and_unknown_names():
    model = apply_lora(tiny_classifier("bert"), LoraSettings(r=2, target_modules=["query", "key"]), ["classifier"])
    assert lora_modules(model) == {f"encoder.layer.{i}.attention.self.{m}" for i in range(3) for m in ("query", "key")}
    with pytest.raises(NewstuneError, match="'nope' matches no linear module"):
        apply_lora(tiny_classifier("bert"), LoraSettings(target_modules=["nope"]), ["classifier"])


def test_trainable_count_is_lora_plus_head(tiny_models):
    loaded = build_model(ModelSettings(name=str(tiny_models["mpnet"])), LoraSettings(r=2, target_modules="qkvo"),
                         LABELS)
    hidden, layers, rank = 32, 2, 2
    head = sum(p.numel() for n, p in loaded.model.named_parameters() if p.requires_grad and "lora_" not in n)
    assert count_parameters(loaded.model)["trainable"] == layers * 4 * rank * (2 * hidden) + head
    # the classifier head (dense 32x32 + out_proj 32x3) and nothing else of the base is trainable
    assert head == (32 * 32 + 32) + (32 * 3 + 3)


def test_bias_all_trains_biases(tiny_models):
    with_bias = build_model(ModelSettings(name=str(tiny_models["bert"])), LoraSettings(r=2, bias="all"), LABELS)
    without = build_model(ModelSettings(name=str(tiny_models["bert"])), LoraSettings(r=2), LABELS)
    bert_biases = sum(p.numel() for n, p in without.model.named_parameters() if n.endswith(".bias") and "bert." in n
                      and "lora_" not in n)
    extra = count_parameters(with_bias.model)["trainable"] - count_parameters(without.model)["trainable"]
    assert extra == bert_biases


def test_full_finetuning_trains_everything(tiny_models):
    loaded = build_model(ModelSettings(name=str(tiny_models["bert"])), LoraSettings(method="full"), LABELS)
    counts = count_parameters(loaded.model)
    assert counts["trainable"] == counts["total"]


def test_model_path_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NewstuneError, match="not a model folder"):
        resolve_model_path(str(tmp_path / "empty"))


def test_hold_frozen_in_bf16_keeps_trainables_fp32(tiny_models):
    loaded = build_model(ModelSettings(name=str(tiny_models["bert"])), LoraSettings(r=2), LABELS)
    assert hold_frozen_in(loaded.model, torch.bfloat16) > 0
    for param in loaded.model.parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16)
