import pytest
import torch

from newstune.config import LoraSettings, ModelSettings
from newstune.errors import NewstuneError
from newstune.model import build_model, count_parameters, hold_frozen_in, resolve_model_path, target_modules

LABELS = ["a", "b", "c"]


@pytest.mark.parametrize("arch, expected", [("bert", ["query", "value"]), ("roberta", ["query", "value"]),
                                            ("mpnet", ["q", "v"])])
def test_lora_on_every_architecture(tiny_models, arch, expected):
    loaded = build_model(ModelSettings(name=str(tiny_models[arch])), LoraSettings(r=2, alpha=4), LABELS)
    assert loaded.model_type == arch
    assert target_modules(arch, LoraSettings()) == expected
    lora_names = [n for n, p in loaded.model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora_names and all(any(f".{t}." in n for t in expected) for n in lora_names)
    head = [n for n, p in loaded.model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert head and all("classifier" in n for n in head)
    counts = count_parameters(loaded.model)
    hidden, layers = 32, 2
    lora = layers * len(expected) * 2 * (2 * hidden)
    assert counts["trainable"] == lora + sum(p.numel() for n, p in loaded.model.named_parameters()
                                             if p.requires_grad and "lora_" not in n)
    logits = loaded.model(input_ids=torch.tensor([[2, 10, 11, 3]])).logits
    assert logits.shape == (1, 3)


def test_target_shorthands_and_bias(tiny_models):
    assert target_modules("bert", LoraSettings(target_modules="qkv")) == ["query", "key", "value"]
    assert target_modules("mpnet", LoraSettings(target_modules=["all"]))[:4] == ["q", "k", "v", "attention.o"]
    with_bias = build_model(ModelSettings(name=str(tiny_models["bert"])), LoraSettings(r=2, bias="all"), LABELS)
    without = build_model(ModelSettings(name=str(tiny_models["bert"])), LoraSettings(r=2), LABELS)
    assert count_parameters(with_bias.model)["trainable"] > count_parameters(without.model)["trainable"]


def test_full_finetuning_trains_everything(tiny_models):
    loaded = build_model(ModelSettings(name=str(tiny_models["bert"])), LoraSettings(method="full"), LABELS)
    counts = count_parameters(loaded.model)
    assert counts["trainable"] == counts["total"]


def test_bad_target_modules(tiny_models):
    with pytest.raises(NewstuneError, match="do not fit bert"):
        build_model(ModelSettings(name=str(tiny_models["bert"])), LoraSettings(target_modules=["nope"]), LABELS)


def test_model_path_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NewstuneError, match="not a model folder"):
        resolve_model_path(str(tmp_path / "empty"))


def test_hold_frozen_in_bf16_keeps_trainables_fp32(tiny_models):
    loaded = build_model(ModelSettings(name=str(tiny_models["bert"])), LoraSettings(r=2), LABELS)
    assert hold_frozen_in(loaded.model, torch.bfloat16) > 0
    for param in loaded.model.parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16)
