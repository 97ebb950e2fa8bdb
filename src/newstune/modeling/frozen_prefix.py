"""The frozen lower layers of an encoder, run once per training text and replayed from a cache."""

from __future__ import annotations

import itertools
from contextlib import contextmanager

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from newstune.errors import NewstuneError
from newstune.modeling.infer import autocast_for, inference_batches


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

    def states(self, indices: list[int], attention_mask: torch.Tensor, device: str | torch.device) -> torch.Tensor:
        """The stored states of these texts laid out where the mask has its tokens, zeros at the padding.

        Placing them by the mask (not from position 0) keeps a left-padded batch aligned with its tokens.
        """
        mask = attention_mask.bool().cpu()
        out = torch.zeros((*mask.shape, self.flat.shape[1]), dtype=self.flat.dtype)
        for row, i in enumerate(indices):
            stored = self.flat[self.offsets[i]: self.offsets[i + 1]]
            if int(mask[row].sum()) != len(stored):
                raise NewstuneError(f"cached text {i} has {len(stored)} tokens but its batch row has "
                                    f"{int(mask[row].sum())}; the cache is stale: restart the run")
            out[row, mask[row]] = stored
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
