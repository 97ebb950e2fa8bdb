"""LayerNorm returning bf16 under CPU autocast: fp32 statistics, one rounding of the output, gradients to fp32."""

import torch
from transformers import AutoModelForSequenceClassification, BertConfig

from newstune.modeling.low_precision_norm import use_low_precision_norm_output

SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
             max_position_embeddings=66, pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_norm_output_is_bf16_under_autocast_and_unchanged_without():
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(32)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(4, 7, 32) * 3 + 1
    reference = norm(x)
    assert use_low_precision_norm_output(torch.nn.Sequential(norm)) == 1
    assert torch.equal(norm(x), reference)  # no autocast: the plain fp32 LayerNorm
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.bfloat16  # fails if autocast's fp32 output comes back
    # statistics in fp32, output rounded once: within bf16's rounding of the fp32 result
    torch.testing.assert_close(out.float(), reference, rtol=2**-8, atol=1e-6)
    out.float().sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.dtype == torch.float32


def test_a_bert_trained_under_autocast_keeps_its_hidden_states_and_casts_less():
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(BertConfig(**SMALL, num_labels=3)).train()
    ids = torch.randint(5, 60, (2, 12))

    def casts_to_float() -> tuple[torch.Tensor, int]:
        with torch.profiler.profile(record_shapes=True) as prof, torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        # activation casts bf16 -> fp32 (not weight casts: those have 2-D shapes)
        n = sum(1 for e in prof.events() if e.name == "aten::_to_copy" and len(e.input_shapes[0]) == 3)
        return hidden, n

    before, casts_before = casts_to_float()
    assert use_low_precision_norm_output(model) == 5  # embeddings + 2 per layer
    after, casts_after = casts_to_float()
    assert casts_after < casts_before  # fails if the norm output still comes back in fp32
    assert after.dtype == torch.bfloat16 and before.dtype == torch.float32
    # the last hidden state (LayerNorm output, unit scale): bf16 rounding through two layers, not another model
    torch.testing.assert_close(after.float(), before, atol=0.08, rtol=0.05)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # evaluation: the plain LayerNorm, as saved
        assert model(input_ids=ids, output_hidden_states=True).hidden_states[-1].dtype == torch.float32
