"""`newstune profile` measures the trainer's own step, not a look-alike."""

import torch

from newstune.config import validate
from newstune.training.profile import profiled_steps
from newstune.training.train import Trainer

from .conftest import tiny_config


def test_profiled_steps_run_the_trainers_step_with_accumulation_and_clipping(tiny_models, tiny_data):
    overrides = {"train.grad_accum": 2, "train.max_grad_norm": 0.5}
    config = validate(tiny_config(tiny_models["bert"], tiny_data, **overrides))
    trainer = Trainer(config, None)
    trainer.setup()
    clipped = []
    clip = trainer.accelerator.clip_grad_norm_
    trainer.accelerator.clip_grad_norm_ = lambda params, norm: clipped.append(norm) or clip(params, norm)
    prof, lengths, _ = profiled_steps(trainer, steps=4, warmup=0)
    # 4 micro-steps with grad_accum 2: two optimizer and scheduler steps, as in training
    adam_steps = {float(state["step"]) for state in trainer.optimizer.optimizer.state.values()}
    assert adam_steps == {2.0}
    assert trainer.scheduler.scheduler.last_epoch == 2
    # the trainer's own phases were profiled (fails for a look-alike step), and clipping ran once per optimizer step
    ops = {event.name for event in prof.events()}
    assert {"newstune::forward", "newstune::backward", "newstune::optimizer"} <= ops
    assert clipped == [0.5, 0.5]
    assert len(lengths) == 4 * config.train.batch_size
    assert all(isinstance(n, int) and n > 0 for n in lengths)
    assert torch.is_grad_enabled()
