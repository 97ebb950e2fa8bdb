"""`newstune profile` measures the trainer's own step, not a look-alike."""

import torch

from newstune.config import validate
from newstune.profile import profiled_steps
from newstune.train import Trainer

from .conftest import tiny_config


def test_profiled_steps_run_the_trainers_step_with_accumulation_and_clipping(tiny_models, tiny_data):
    overrides = {"train.grad_accum": 2, "train.max_grad_norm": 0.5}
    config = validate(tiny_config(tiny_models["bert"], tiny_data, **overrides))
    trainer = Trainer(config, None)
    trainer.setup()
    prof, lengths, _ = profiled_steps(trainer, steps=4, warmup=0)
    # 4 micro-steps with grad_accum 2: two optimizer and scheduler steps, as in training
    adam_steps = {float(state["step"]) for state in trainer.optimizer.optimizer.state.values()}
    assert adam_steps == {2.0}
    assert trainer.scheduler.scheduler.last_epoch == 2
    ops = {event.name for event in prof.events()}
    assert "aten::linalg_vector_norm" in ops or "aten::norm" in ops or any("clip_grad" in op for op in ops)
    assert len(lengths) == 4 * config.train.batch_size
    assert all(isinstance(n, int) and n > 0 for n in lengths)
    assert torch.is_grad_enabled()
