"""The training loop, on HF Accelerate: setup, loop, evaluate, checkpoint, in that order."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import resource
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, set_seed
from torch.profiler import record_function
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from newstune.config import RunConfig
from newstune.data.batching import (
    Collator,
    EncodedDataset,
    LengthGroupedBatchSampler,
    pad_multiple,
    tokenize_texts,
)
from newstune.data.registry import DatasetBundle, load_dataset
from newstune.data.splits import class_weights, positive_weights
from newstune.decisions.ensemble import check_combiner
from newstune.decisions.metrics import classification_metrics
from newstune.decisions.rule import Decision
from newstune.errors import Interrupted, NewstuneError
from newstune.modeling.attention_dropout import move_attention_dropout_to_context
from newstune.modeling.fast_dropout import use_fast_dropout
from newstune.modeling.first_token import restore_full_last_layer, run_last_layer_on_first_token
from newstune.modeling.frozen_prefix import FrozenPrefix
from newstune.modeling.infer import cpu_has_native_bf16, predict_logits
from newstune.modeling.low_precision_norm import use_low_precision_norm_output
from newstune.modeling.model import (
    build_model,
    check_max_length,
    count_parameters,
    hold_frozen_in,
)
from newstune.paths import cache_dir
from newstune.rundir.run import (
    check_new_run_dir,
    create_run_dir,
    planned_run_dir,
    read_config,
    read_labels,
    write_run_header,
)
from newstune.training import steps
from newstune.training.checkpoint import (
    load_optimizer_state,
    load_weights,
    optimizer_state,
    refuse_pickles,
    restore_rng,
    rng_state,
    save_weights,
)
from newstune.training.distill import UNLABELLED, Teacher, distillation_loss, prepare_teacher
from newstune.training.steps import TrainedModel
from newstune.training.trackers import check_trackers, flat_config, make_trackers, tracked_values

log = logging.getLogger("newstune")
LAYER_INDEX = re.compile(r"\.layers?\.(\d+)\.")
CHECKPOINT = "checkpoints/last.safetensors"
BEST_WEIGHTS = "checkpoints/best_trainable.safetensors"


# ---------------------------------------------------------------- precision and threads


def resolve_precision(requested: str, device: str) -> str:
    """auto: bf16 where the hardware runs it natively, fp16 (with loss scaling) on older CUDA, else fp32."""
    if device == "cuda":
        native_bf16 = torch.cuda.get_device_capability()[0] >= 8
        if requested == "auto":
            return "bf16" if native_bf16 else "fp16"
        return requested
    if requested == "fp16":
        raise NewstuneError("train.precision fp16 needs a CUDA GPU; on CPU use bf16 or fp32")
    if requested == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if requested == "bf16" and not cpu_has_native_bf16():
        warnings.warn("this CPU has no native bf16 (avx512_bf16/AMX): bf16 will be emulated and slow", stacklevel=2)
    return requested


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def set_threads(requested: int | None, num_processes: int) -> int:
    threads = requested or max(1, physical_cores() // num_processes)
    torch.set_num_threads(threads)
    return threads


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- state that survives a resume


@dataclass
class TrainState:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    best_step: int | None = None
    last_eval_step: int | None = None
    stopped_early: bool = False
    evals_without_improvement: int = 0
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    epoch_seconds: list[float] = field(default_factory=list)
    tokens: int = 0
    padded_tokens: int = 0
    samples: int = 0
    epoch_started_at: float = 0.0  # train_seconds when the current epoch began (survives mid-epoch checkpoints)


def layer_depth(name: str, n_layers: int) -> int:
    """How many layers below the top a parameter sits, for layer-wise lr decay: encoder layer i of L -> L - i,
    embeddings -> L + 1, anything else (head, pooler, relative-position bias) -> 0.

    Written here rather than taken from a library: transformers' Trainer has no layer-wise decay, and peft's
    LoRA+ optimizer groups by A/B matrices, not by depth."""
    match = LAYER_INDEX.search(name)
    if match:
        return n_layers - int(match.group(1))
    return n_layers + 1 if "embeddings." in name else 0


def plain_name(name: str) -> str:
    """A parameter name without torch.compile's wrapper prefix: checkpoints resume with compile on or off."""
    return name.replace("_orig_mod.", "")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {plain_name(name): p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- the trainer


class Trainer:
    """setup() builds data, model, optimizer; fit() trains with its evaluations and checkpoints; trained() hands the
    best model to the post-training steps (`steps.finish`). Nothing after the loop lives here."""

    def __init__(self, config: RunConfig, run_dir: Path | None, resume: bool = False,
                 called: float | None = None) -> None:
        self.config = config
        self.called = time.perf_counter() if called is None else called  # when train() was called: the wall clock
        self.seconds_to_trained: float | None = None  # from the call to the end of the loop (evaluations included)
        self.run_dir = run_dir  # None until setup() has validated the inputs: a failed start leaves no folder
        self.resume = resume
        self.state = TrainState()
        self.pending_rng: tuple[dict, dict] | None = None
        self.stop_requested = threading.Event()
        self.interrupted = False
        self.tokens_on_device: torch.Tensor | None = None  # non-padding tokens not yet added to state.tokens
        self.teacher: Teacher | None = None  # distill.teacher: its logits on the training texts
        self.teacher_seconds = 0.0
        # Built by setup() (the loader, optimizer and model by accelerate.prepare), declared here so that a trainer's
        # whole state is visible in one place.
        self.accelerator: Accelerator | None = None
        self.precision, self.device, self.threads = "fp32", "cpu", 1
        self.bundle: DatasetBundle | None = None
        self.label_names: list[str] = []
        self.multi_label = False
        self.decision = Decision()  # the default rule for evaluations during training; steps.finish fits the real one
        self.model: torch.nn.Module | None = None
        self.tokenizer = None
        self.parameters: dict = {}
        self.frozen_dtype = "fp32"
        self.fast_dropout = self.first_token_only = self.bf16_norm_output = False
        self.attention_dropout = "probabilities"  # where the model's attention dropout applies once set up
        self.encoded: dict[str, list[list[int]]] = {}
        self.train_ids: list[list[int]] = []  # the training split's ids, then any unlabelled texts' (distill)
        self.batch_sampler: LengthGroupedBatchSampler | None = None
        self.train_loader: DataLoader | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self.loss_fn: torch.nn.Module | None = None
        self.steps_per_epoch = self.total_steps = 0
        self.prefix: FrozenPrefix | None = None  # train.cache_frozen_layers
        self.prefix_seconds = 0.0
        self.setup_seconds = 0.0  # wall time of setup() outside the loop's clock (which holds the prefix cache)
        # called after every validation evaluation with (epochs trained, selection score); a search's pruner
        # reads it and may raise to stop the trial
        self.on_evaluate: Callable[[float, float], None] | None = None

    # ------------------------------------------------------------ setup

    def setup(self, bundle: DatasetBundle | None = None) -> None:
        start = time.perf_counter()
        cfg = self.config.train
        check_trackers(cfg.report_to)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.precision = resolve_precision(cfg.precision, device)
        # One process may train several runs (compare, sweep, tests) with different precisions.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(mixed_precision="no" if self.precision == "fp32" else self.precision,
                                       cpu=device == "cpu", gradient_accumulation_steps=cfg.grad_accum)
        self.device = self.accelerator.device.type
        self.threads = set_threads(cfg.threads, self.accelerator.num_processes)
        set_seed(cfg.seed)
        self.bundle = bundle or load_dataset(self.config.data, cfg.seed)
        self.label_names = self.bundle.label_names
        self.multi_label = bool(self.bundle.info.get("multi_label"))
        if self.config.eval.ensemble != "none":  # before training, not after it
            check_combiner(self.config.eval.ensemble_combiner, self.multi_label)
        self.decision = Decision(multi_label=self.multi_label)
        loaded = build_model(self.config.model, self.config.lora, self.label_names, self.multi_label)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        check_max_length(self.model, self.config.data.max_length)
        self.parameters = count_parameters(self.model)
        self.frozen_dtype = "fp32"
        if self.config.lora.method == "lora" and self.precision == "bf16" and cfg.bf16_frozen_weights:
            hold_frozen_in(self.model, torch.bfloat16)
            self.frozen_dtype = "bf16"
        moved = cfg.attention_dropout == "context" and move_attention_dropout_to_context(self.model) > 0
        self.attention_dropout = "context" if moved else "probabilities"
        self.bf16_norm_output = cfg.bf16_norm_output and self.device == "cpu" and self.precision == "bf16" \
            and use_low_precision_norm_output(self.model) > 0
        self.fast_dropout = cfg.fast_dropout and self.device == "cpu"
        if self.fast_dropout:
            use_fast_dropout(self.model)
        # before torch.compile wraps the model; the frozen-prefix cache never runs the last layer
        self.first_token_only = cfg.first_token_last_layer and run_last_layer_on_first_token(self.model)
        self.encoded = {split: tokenize_texts(self.tokenizer, part.texts, self.config.data.max_length,
                                              cache_dir() / "tokens") for split, part in self.bundle.splits.items()}
        self.teacher = self._teacher() if self.config.distill.teacher is not None else None
        # the texts the loop trains on: the training split, then any unlabelled texts learnt from the teacher only
        self.train_ids = self.encoded["train"] + (
            tokenize_texts(self.tokenizer, self.teacher.unlabelled_texts, self.config.data.max_length,
                           cache_dir() / "tokens") if self.teacher is not None else [])
        self.train_loader = self._train_loader()
        self.optimizer = self._optimizer()
        self.steps_per_epoch = math.ceil(len(self.train_loader) / cfg.grad_accum)
        self.total_steps = max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.scheduler = get_scheduler(cfg.scheduler, self.optimizer, int(cfg.warmup_ratio * self.total_steps),
                                       self.total_steps)
        self.loss_fn = (torch.nn.BCEWithLogitsLoss(pos_weight=self._class_weights()) if self.multi_label
                        else torch.nn.CrossEntropyLoss(weight=self._class_weights()))
        if cfg.compile:
            self.model = torch.compile(self.model, dynamic=True)
        self.model, self.optimizer, self.train_loader, self.scheduler = self.accelerator.prepare(
            self.model, self.optimizer, self.train_loader, self.scheduler)
        self.loss_fn.to(self.accelerator.device)
        self.prefix = self._frozen_prefix() if cfg.cache_frozen_layers else None
        if self.resume:
            self._load_checkpoint()
        self.setup_seconds = time.perf_counter() - start - self.prefix_seconds

    def _teacher(self) -> Teacher:
        """The teacher's logits on this run's training texts (and unlabelled ones), before any folder is made."""
        start = time.perf_counter()
        held_out = {text for split, part in self.bundle.splits.items() if split != "train" for text in part.texts}
        teacher = prepare_teacher(self.config.distill, self.config.train.seed, self.bundle.splits["train"].texts,
                                  held_out, self.config.data.clean, self.label_names, self.multi_label)
        self.teacher_seconds = time.perf_counter() - start
        log.info("teacher %s: logits of %d texts in %.1f s", teacher.run_dir, len(teacher.logits),
                 self.teacher_seconds)
        return teacher

    def _frozen_prefix(self) -> FrozenPrefix:
        """Lower-layer states of every training text, computed once (the time counts as training time)."""
        start = time.perf_counter()
        prefix = FrozenPrefix(self.accelerator.unwrap_model(self.model))
        prefix.compute(self.train_ids, self.tokenizer.pad_token_id, self.precision, self.device,
                       self.config.train.eval_batch_size, progress=self.accelerator.is_main_process)
        self.prefix_seconds = self._add_time(start)
        log.info("cached layers 0-%d of %d texts: %.0f MB in %.1f s", prefix.depth - 1, len(self.train_ids),
                 prefix.nbytes / 2**20, self.prefix_seconds)
        return prefix

    def _train_loader(self) -> DataLoader:
        cfg = self.config.train
        labels = list(self.bundle.splits["train"].labels) + [UNLABELLED] * (len(self.train_ids)
                                                                           - len(self.encoded["train"]))
        train = EncodedDataset(self.train_ids, labels, with_index=cfg.cache_frozen_layers,
                               teacher=self.teacher.logits if self.teacher is not None else None)
        sampler = self.batch_sampler = LengthGroupedBatchSampler(train.lengths, cfg.batch_size, cfg.seed,
                                                                 cfg.group_by_length)
        return DataLoader(train, batch_sampler=sampler, num_workers=cfg.num_workers,
                          collate_fn=Collator(self.tokenizer.pad_token_id, pad_multiple(self.device)))

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config.train
        head_names = ("classifier", "score", "pre_classifier", "pooler")
        groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
        n_layers = getattr(self.model.config, "num_hidden_layers", 0)
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            is_head = any(f"{h}." in name for h in head_names) and "lora_" not in name
            lr = cfg.head_lr if (is_head and cfg.head_lr) else cfg.lr
            if cfg.layer_lr_decay is not None and not is_head:
                lr *= cfg.layer_lr_decay ** layer_depth(name, n_layers)
            decay = 0.0 if (param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name) else cfg.weight_decay
            groups.setdefault((lr, decay), []).append(param)
        return torch.optim.AdamW([{"params": p, "lr": lr, "weight_decay": wd} for (lr, wd), p in groups.items()],
                                 lr=cfg.lr, fused=cfg.fused_adamw or None)

    def _class_weights(self) -> torch.Tensor | None:
        weights = self.config.train.class_weights
        if weights == "none":
            return None
        n_classes = len(self.label_names)
        if weights == "auto" and self.multi_label:
            weights = positive_weights(self.bundle.splits["train"].labels)
        elif weights == "auto":
            weights = class_weights(self.bundle.splits["train"].labels, n_classes)
        if len(weights) != n_classes:
            raise NewstuneError(f"train.class_weights has {len(weights)} values but the data has {n_classes} "
                                f"classes {self.label_names}")
        return torch.tensor(weights, dtype=torch.float32)

    # ------------------------------------------------------------ checkpoints

    def _save_checkpoint(self) -> None:
        self._sync_token_count()
        if not self.accelerator.is_main_process:
            return
        rng_meta, rng_tensors = rng_state()
        optimizer_meta, optimizer_tensors = optimizer_state(self.optimizer)
        trainable = {f"trainable.{k}": v for k, v in trainable_state(self.accelerator.unwrap_model(self.model)).items()}
        meta = {"optimizer": optimizer_meta, "scheduler": self.scheduler.state_dict(), "rng": rng_meta,
                "state": asdict(self.state)}
        if self.accelerator.scaler is not None:
            meta["scaler"] = self.accelerator.scaler.state_dict()
        save_weights(self.run_dir / CHECKPOINT, {**trainable, **optimizer_tensors, **rng_tensors}, meta)

    def _load_checkpoint(self) -> None:
        path = self.run_dir / CHECKPOINT
        if not path.is_file():
            raise NewstuneError(f"{self.run_dir} has no checkpoint to resume from ({CHECKPOINT})")
        tensors, meta = load_weights(path)
        trainable = {plain_name(k.removeprefix("trainable.")): v for k, v in tensors.items()
                     if k.startswith("trainable.")}
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        expected = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if set(trainable) != set(expected) or any(trainable[k].shape != p.shape for k, p in expected.items()):
            missing, unexpected = sorted(set(expected) - set(trainable)), sorted(set(trainable) - set(expected))
            raise NewstuneError(f"{path}: its trainable tensors do not match this run's model (missing "
                                f"{missing[:3]}, unexpected {unexpected[:3]}, or other shapes); the checkpoint was "
                                "changed or belongs to another config: start a new run")
        state = self._checked_state(path, meta)
        try:
            model.load_state_dict(trainable, strict=False)  # strict over the trainable names, checked above
            load_optimizer_state(self.optimizer, meta["optimizer"], tensors)
            self.scheduler.load_state_dict(meta["scheduler"])
            if "scaler" in meta and self.accelerator.scaler is not None:
                self.accelerator.scaler.load_state_dict(meta["scaler"])
            restore_rng(meta["rng"], tensors)  # checked here; restored again below at the right moment
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
            raise NewstuneError(f"{path}: damaged resume state ({err.__class__.__name__}: {str(err)[:100]}); "
                                "start a new run") from None
        self.state = state
        # Creating a DataLoader iterator draws from the torch RNG: mid-epoch, restore after that draw.
        self.pending_rng = (meta["rng"], tensors) if self.state.step_in_epoch else None
        if self.pending_rng is None:
            restore_rng(meta["rng"], tensors)
        log.info("resumed at epoch %d, step %d", self.state.epoch, self.state.global_step)

    def _checked_state(self, path: Path, meta: dict) -> TrainState:
        """The counters of a checkpoint, refused unless they fit this run's config (a hand-edited step of 10^9
        'finished' a run after 3 real steps)."""
        try:
            state = TrainState(**meta["state"])
        except (KeyError, TypeError) as err:
            raise NewstuneError(f"{path}: the checkpoint's training state is missing or has unknown fields "
                                f"({str(err)[:80]}); start a new run") from None
        counters = {"epoch": (state.epoch, math.ceil(self.config.train.epochs)),
                    "global_step": (state.global_step, self.total_steps),
                    "step_in_epoch": (state.step_in_epoch, self.steps_per_epoch)}
        for name, (value, most) in counters.items():
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= most:
                raise NewstuneError(f"{path}: {name} {value!r} is outside 0..{most} for this run's config; the "
                                    "checkpoint was changed or belongs to another config: start a new run")
        return state

    # ------------------------------------------------------------ evaluation

    def evaluate_split(self, split: str, decision: Decision | None = None) -> tuple[dict, torch.Tensor]:
        """Metrics and logits of a split during training (the default decision rule until steps.finish fits one)."""
        model = self.accelerator.unwrap_model(self.model)
        logits = predict_logits(model, self.encoded[split], self.tokenizer.pad_token_id,
                                self.config.train.eval_batch_size, self.precision, self.device,
                                progress=self.accelerator.is_main_process, desc=f"evaluate {split}")
        labels = np.asarray(self.bundle.splits[split].labels)
        return classification_metrics(labels, logits.numpy(), self.label_names, decision or self.decision), logits

    def _evaluate_epoch(self, epoch: int) -> bool:
        """Validation metrics at this step; keeps the best weights; returns True when training should stop."""
        cfg = self.config.train
        self.state.last_eval_step = self.state.global_step
        if self.accelerator.is_main_process:
            metrics, _ = self.evaluate_split("validation")
            record = {"kind": "eval", "epoch": epoch, "step": self.state.global_step,
                      "train_seconds": round(self.state.train_seconds, 2),
                      **{k: metrics[k] for k in ("accuracy", "macro_f1", "loss")}}
            self._log(record)
            if self.config.eval.test_curve:
                test_metrics, _ = self.evaluate_split("test")
                self._log({**record, "kind": "test", **{k: test_metrics[k] for k in ("accuracy", "macro_f1", "loss")}})
            score = -metrics["loss"] if cfg.metric == "loss" else metrics[cfg.metric]
            if self.on_evaluate is not None:
                self.on_evaluate(self.state.global_step / self.steps_per_epoch, score)
            if self.state.best_metric is None or score > self.state.best_metric:
                self.state.best_metric, self.state.best_epoch = score, epoch
                self.state.best_step = self.state.global_step
                self.state.evals_without_improvement = 0
                save_weights(self.run_dir / BEST_WEIGHTS, trainable_state(self.accelerator.unwrap_model(self.model)))
            else:
                self.state.evals_without_improvement += 1
            patience = cfg.early_stopping_patience
            if patience is not None and self.state.evals_without_improvement >= patience:
                log.info("early stopping: %s has not improved for %d evaluation(s)", cfg.metric, patience)
                self.accelerator.set_trigger()
        self.accelerator.wait_for_everyone()
        self.state.stopped_early = self.accelerator.check_trigger()
        return self.state.stopped_early

    # ------------------------------------------------------------ training

    def _log(self, record: dict) -> None:
        log.info(json.dumps(record))
        self.state.history.append(record)
        with (self.run_dir / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log(tracked_values(record), step=record["step"])

    def fit(self, stop_after_steps: int | None = None) -> bool:
        """Train to the end (True) or until stop_after_steps, leaving a resumable checkpoint (False)."""
        cfg = self.config.train
        if self.accelerator.is_main_process and cfg.report_to:
            self.accelerator.log_with = make_trackers(self.config, self.run_dir)
            self.accelerator.init_trackers(self.config.name, config=flat_config(self.config))
        bar = tqdm(total=self.total_steps, initial=self.state.global_step, desc="train", unit="step",
                   disable=not self.accelerator.is_main_process, dynamic_ncols=True)
        n_epochs = math.ceil(cfg.epochs)
        finished = True
        with self._stop_on_signals(), self._closing(bar):
            # an early stop is part of the saved state: a resume after it does not train on
            while (not self.state.stopped_early and self.state.epoch < n_epochs
                   and self.state.global_step < self.total_steps):
                if not self._train_epoch(bar, stop_after_steps):
                    finished = False
                    break
                if cfg.eval_every_epoch and self.state.last_eval_step != self.state.global_step:
                    self._evaluate_epoch(self.state.epoch)
                self.state.epoch += 1
                self.state.step_in_epoch = 0
                self._save_checkpoint()
                if self.stop_requested.is_set() and not self.state.stopped_early:
                    self.interrupted, finished = True, False
                    break
        return finished

    @contextmanager
    def _closing(self, bar: tqdm) -> Iterator[None]:
        """The progress bar and the trackers close however fit ends (a search's pruner raises inside it)."""
        try:
            yield
        finally:
            bar.close()
            for tracker in self.accelerator.trackers:  # not end_training(): it would also end the process group
                tracker.finish()
            self.accelerator.trackers = []

    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """Ctrl-C / SIGTERM: finish the optimizer step, save a resumable checkpoint, stop. A second one aborts."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame) -> None:
            if self.stop_requested.is_set():
                raise KeyboardInterrupt
            self.stop_requested.set()

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _train_epoch(self, bar: tqdm, stop_after_steps: int | None) -> bool:
        cfg = self.config.train
        self.model.train()
        loader = self.train_loader
        skip = self.state.step_in_epoch * cfg.grad_accum
        if skip:
            loader = self.accelerator.skip_first_batches(loader, skip)
        loader.set_epoch(self.state.epoch)  # the batch order depends only on (seed, epoch)
        # accelerate's multi-process shard of the batch sampler does not pass set_epoch on: every epoch had epoch 0's
        # batch order there
        self.batch_sampler.set_epoch(self.state.epoch)
        if self.state.step_in_epoch == 0:
            self.state.epoch_started_at = self.state.train_seconds
        # Loss and token counts add up on the device; .item() or int() every micro-step would make the host wait
        # for the GPU each time (nanoGPT syncs only at its log interval too).
        window_loss, window_steps = torch.zeros((), device=self.accelerator.device), 0
        self.tokens_on_device = torch.zeros((), dtype=torch.long, device=self.accelerator.device)
        start = time.perf_counter()
        for batch in self._batches(loader):
            self.tokens_on_device += batch["attention_mask"].sum()
            self.state.padded_tokens += batch["attention_mask"].numel()
            self.state.samples += len(batch["labels"])
            window_loss += self.train_step(batch)
            window_steps += 1
            if not self.accelerator.sync_gradients:
                continue
            self.state.global_step += 1
            self.state.step_in_epoch += 1
            bar.update(1)
            if self.state.global_step % cfg.log_every_steps == 0 or self.state.global_step == self.total_steps:
                record = {"kind": "train", "epoch": self.state.epoch, "step": self.state.global_step,
                          "loss": window_loss.item() / window_steps, "lr": self.scheduler.get_last_lr()[0]}
                if self.accelerator.is_main_process:
                    self._log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                window_loss, window_steps = torch.zeros_like(window_loss), 0
            # evaluate before checkpointing: a checkpoint at step N holds step N's evaluation
            if cfg.eval_every_steps and self.state.global_step % cfg.eval_every_steps == 0:
                self._add_time(start)
                stopped = self._evaluate_epoch(self.state.epoch)
                start = time.perf_counter()  # evaluation time is not training time
                if stopped:
                    break  # fit saves the checkpoint
            if cfg.checkpoint_every_steps and self.state.global_step % cfg.checkpoint_every_steps == 0:
                self._add_time(start)
                start = time.perf_counter()
                self._save_checkpoint()
            if self.stop_requested.is_set() or (stop_after_steps is not None
                                                 and self.state.global_step >= stop_after_steps):
                self.interrupted = self.stop_requested.is_set()
                self._add_time(start)
                self._save_checkpoint()
                return False
            if self.state.global_step >= self.total_steps:
                break
        self._add_time(start)
        self._sync_token_count()
        if self.state.step_in_epoch == self.steps_per_epoch:  # a partial epoch (early stop, fractional) has no time
            self.state.epoch_seconds.append(self.state.train_seconds - self.state.epoch_started_at)
        return True

    def train_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One micro-step: forward, backward and, when gradients are due, clip + optimizer + scheduler step.

        The phases are marked for `newstune profile`, which profiles this very method (record_function costs
        nothing measurable while no profiler runs).
        """
        cfg = self.config.train
        with self.accelerator.accumulate(self.model):
            labels = batch.pop("labels")
            labels = labels.float() if self.multi_label else labels
            teacher = batch.pop("teacher", None)
            with record_function("newstune::forward"):
                logits = self.forward_logits(batch).float()
                if teacher is None:
                    loss = self.loss_fn(logits, labels)
                else:
                    distill = self.config.distill
                    loss = distillation_loss(logits, teacher, labels, self.loss_fn, distill.alpha,
                                             distill.temperature, self.multi_label)
            with record_function("newstune::backward"):
                self.accelerator.backward(loss)
            with record_function("newstune::optimizer"):
                if self.accelerator.sync_gradients and cfg.max_grad_norm is not None:
                    self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def _sync_token_count(self) -> None:
        if self.tokens_on_device is not None:
            self.state.tokens += int(self.tokens_on_device)
            self.tokens_on_device.zero_()

    def forward_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training logits; with a frozen-prefix cache only the upper layers run, from the stored states."""
        indices = batch.pop("index", None)
        if self.prefix is None:
            return self.model(**batch).logits
        states = self.prefix.states(indices.tolist(), batch["attention_mask"], self.accelerator.device)
        with self.prefix.upper_layers_only(states):
            return self.model(**batch).logits

    def _batches(self, loader: DataLoader):
        """The loader's batches; a mid-epoch resume restores the RNG after the loader's own first draw."""
        batches = iter(loader)
        first = next(batches, None)
        if self.pending_rng is not None:
            restore_rng(*self.pending_rng)
            self.pending_rng = None
        if first is not None:
            yield first
            yield from batches

    def _add_time(self, start: float) -> float:
        elapsed = time.perf_counter() - start
        self.state.train_seconds += elapsed
        return elapsed

    # ------------------------------------------------------------ the trained model

    def trained(self) -> TrainedModel:
        """The model with its best weights back in, as it is saved, predicted with and served (load_run runs the last
        layer for token 0 only where training did): what the post-training steps (`steps.finish`) score and write."""
        model = self.accelerator.unwrap_model(self.model)
        restore_full_last_layer(model)  # checked again below on the best weights, as load_run does
        if (self.run_dir / BEST_WEIGHTS).is_file():  # plain names (trainable_state): load past torch.compile
            best = load_weights(self.run_dir / BEST_WEIGHTS)[0]
            plain = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            missing = set(best) - {name for name, _ in plain.named_parameters()}
            if missing:
                raise NewstuneError(f"{self.run_dir / BEST_WEIGHTS}: tensors {sorted(missing)[:3]} are not in this "
                                    "run's model; the file was changed")
            plain.load_state_dict(best, strict=False)
        if self.first_token_only:  # recorded as what the saved model is scored with: off if the check now disagrees
            self.first_token_only = run_last_layer_on_first_token(model)
        return TrainedModel(self.config, self.run_dir, self.bundle, model, self.tokenizer, self.encoded,
                            self.precision, self.device, self.state.history)

    def loop_figures(self) -> dict:
        """What the loop measured: precision, threads, steps, seconds, throughput, padding, memory, parameters."""
        s = self.state
        figures = {
            "precision": self.precision, "frozen_weights_dtype": self.frozen_dtype, "device": self.device,
            "fast_dropout": self.fast_dropout, "first_token_last_layer": self.first_token_only,
            "bf16_norm_output": self.bf16_norm_output, "attention_dropout": self.attention_dropout,
            "threads": self.threads, "num_processes": self.accelerator.num_processes,
            "epochs_run": round(s.global_step / self.steps_per_epoch, 2), "optimizer_steps": s.global_step,
            "train_seconds": s.train_seconds, "setup_seconds": self.setup_seconds,
            "wall_seconds_to_trained": self.seconds_to_trained,
            "epoch_seconds_mean": float(np.mean(s.epoch_seconds)) if s.epoch_seconds else s.train_seconds,
            "train_samples_per_s": s.samples * self.accelerator.num_processes / max(s.train_seconds, 1e-9),
            "train_tokens_per_s": s.tokens * self.accelerator.num_processes / max(s.train_seconds, 1e-9),
            "padding_fraction": 1 - s.tokens / max(s.padded_tokens, 1),
            "peak_rss_mb": peak_rss_mb(),
            "trainable_params": self.parameters["trainable"], "total_params": self.parameters["total"],
        }
        if self.prefix is not None:
            figures["cached_layers"] = self.prefix.depth
            figures["cache_mb"] = self.prefix.nbytes / 2**20
            figures["cache_seconds"] = self.prefix_seconds
        return figures

    def run_facts(self) -> dict:
        """What only the loop knows for metrics.json: the data it trained on, the best evaluation, the teacher."""
        train = self.bundle.splits["train"]
        origins = {origin: train.origins.count(origin) for origin in sorted(set(train.origins))}
        facts = {"data": {**self.bundle.info, "train_origins": origins}, "best_epoch": self.state.best_epoch,
                 "best_step": self.state.best_step}
        if self.teacher is not None:
            facts["distill"] = {**self.teacher.record(), "teacher_seconds": self.teacher_seconds}
        return facts


# ---------------------------------------------------------------- entry points


@contextmanager
def logging_to(run_dir: Path) -> Iterator[None]:
    """The run's train.log receives this run's log lines (and no later run's)."""
    log.setLevel(logging.INFO)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()


def train(config: RunConfig, output_dir: Path | None = None, stop_after_steps: int | None = None,
          bundle: DatasetBundle | None = None,
          on_evaluate: Callable[[float, float], None] | None = None) -> tuple[Path, dict]:
    """A new run: returns its directory and metrics (empty when stopped early by stop_after_steps).

    The run folder is created only after the data and model loaded: a failed start leaves nothing behind.
    on_evaluate receives (epochs trained, validation selection score) after every validation evaluation.
    """
    called = time.perf_counter()
    check_new_run_dir(planned_run_dir(config, output_dir))
    trainer = Trainer(config, None, called=called)
    trainer.on_evaluate = on_evaluate
    trainer.setup(bundle)
    trainer.run_dir = _shared_run_dir(config, output_dir)
    if trainer.accelerator.is_main_process:
        write_run_header(trainer.run_dir, config, trainer.label_names)
    return _fit_and_finish(trainer, stop_after_steps)


def resume(run_dir: Path, stop_after_steps: int | None = None) -> tuple[Path, dict]:
    config = read_config(run_dir)
    if (run_dir / "metrics.json").is_file():
        raise NewstuneError(f"{run_dir} already finished (metrics.json exists); nothing to resume")
    refuse_pickles(run_dir / "checkpoints")
    trainer = Trainer(config, run_dir, resume=True)
    trainer.setup()
    if trainer.label_names != read_labels(run_dir):
        raise NewstuneError(f"{run_dir}: the data's labels changed since the run started; cannot resume")
    return _fit_and_finish(trainer, stop_after_steps)


def _fit_and_finish(trainer: Trainer, stop_after_steps: int | None) -> tuple[Path, dict]:
    with logging_to(trainer.run_dir):
        finished = trainer.fit(stop_after_steps)
        trainer.seconds_to_trained = time.perf_counter() - trainer.called
        if trainer.interrupted:
            raise Interrupted(f"interrupted at step {trainer.state.global_step} of {trainer.total_steps}; "
                              f"checkpoint saved. Continue with: newstune train --resume {trainer.run_dir}")
        return trainer.run_dir, finish_run(trainer) if finished else {}


def finish_run(trainer: Trainer) -> dict:
    """The post-training steps on the trained model (main process only): what makes a run folder of a loop."""
    if not trainer.accelerator.is_main_process:
        return {}
    return steps.finish(trainer.trained(), trainer.loop_figures(), trainer.run_facts())


def _shared_run_dir(config: RunConfig, output_dir: Path | None) -> Path:
    """All processes of a multi-process launch agree on one folder: the main one creates it and tells the rest."""
    state = PartialState(cpu=not torch.cuda.is_available())
    names = [str(create_run_dir(planned_run_dir(config, output_dir))) if state.is_main_process else ""]
    if state.num_processes > 1:
        broadcast_object_list(names)
    return Path(names[0])
