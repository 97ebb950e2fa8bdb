"""Knowledge distillation (Hinton et al. 2015): a finished teacher run's logits on the student's training texts,
computed once and cached, and the loss that mixes the teacher's temperature-softened probabilities with the labels.

Written here rather than taken from a library: transformers and peft ship no distillation loss for classifiers, and
the part that is newstune's own is where the teacher comes from (a run folder, validated like any other, and in a
seed group the run with the student's seed, whose validation split is the student's).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from newstune.config import CleanConfig, DistillSettings
from newstune.data.batching import tokenize_texts
from newstune.data.files import open_binary, read_table, reading, require_columns
from newstune.data.text import clean_text
from newstune.decisions.ensemble import ENSEMBLE_DIR
from newstune.errors import NewstuneError
from newstune.paths import cache_dir
from newstune.rundir.run import (
    DECISION_FILE,
    METRICS_FILE,
    MODEL_DIR,
    is_seed_group,
    load_run,
    read_config,
    read_metrics,
    require_run,
    seed_run_dir,
)

log = logging.getLogger("newstune")

UNLABELLED = -100  # CrossEntropyLoss's ignore_index: rows the student learns from the teacher only


@dataclass
class Teacher:
    """The teacher run that taught a student, and its logits on the student's training rows (labelled first)."""

    run_dir: Path
    logits: torch.Tensor
    unlabelled_texts: list[str]
    left_out: int  # unlabelled texts dropped because validation, test or holdout holds them

    def record(self) -> dict:
        """What the student's metrics.json says about its teacher."""
        metrics = read_metrics(self.run_dir)
        return {"run": str(self.run_dir.resolve()), "model": read_config(self.run_dir).model.name,
                **{split: {k: metrics[split][k] for k in ("accuracy", "macro_f1") if k in metrics[split]}
                   for split in ("validation", "test") if split in metrics},
                "unlabelled_texts": len(self.unlabelled_texts), "unlabelled_left_out": self.left_out}


def teacher_run_dir(teacher: Path, seed: int) -> Path:
    """The teacher folder itself, or in a seed group the run trained with the student's seed."""
    teacher = Path(teacher)
    if is_seed_group(teacher):
        member = seed_run_dir(teacher, seed)
        if not member.is_dir():
            raise NewstuneError(f"distill.teacher {teacher} is a seed group without seed-{seed}; train the student "
                                f"with a seed the group has, or pass one run folder as the teacher")
        teacher = member
    require_run(teacher)
    if not (teacher / METRICS_FILE).is_file() or not (teacher / MODEL_DIR).is_dir():
        raise NewstuneError(f"distill.teacher {teacher} has not finished training; finish it first "
                            f"(newstune train --resume {teacher})")
    return teacher


def read_unlabelled(path: Path, column: str, clean: CleanConfig, limit: int | None) -> list[str]:
    """Cleaned, non-empty texts of a CSV/TSV/JSONL (its `column`) or a .txt file (one text per line)."""
    path = Path(path)
    if not path.is_file():
        raise NewstuneError(f"distill.unlabelled_file not found: {path} (a CSV/TSV/JSONL with a '{column}' column "
                            "or a .txt with one text per line)")
    if [s for s in path.suffixes if s != ".gz"][-1:] == [".txt"]:
        with reading(path), open_binary(path) as handle:
            raw = io.TextIOWrapper(handle, encoding="utf-8").read().splitlines()
    else:
        frame = read_table(path)
        require_columns(path, frame, [column])
        raw = frame[column].tolist()
    texts = [cleaned for cleaned in (clean_text(t, clean) for t in raw) if cleaned.strip()]
    if not texts:
        raise NewstuneError(f"{path}: every text is empty after cleaning; give a file of news texts")
    return texts[:limit] if limit else texts


def _teacher_fingerprint(run_dir: Path) -> str:
    """One logits store per teacher state: a retrained or replaced teacher, or one whose decision rule now blends in
    its TF-IDF model, gets a new store."""
    digest = hashlib.sha256(str(run_dir.resolve()).encode())
    files = [*(run_dir / MODEL_DIR).iterdir(), run_dir / DECISION_FILE,
             *((run_dir / ENSEMBLE_DIR).iterdir() if (run_dir / ENSEMBLE_DIR).is_dir() else [])]
    for path in sorted(files):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def _text_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:16]


def _read_store(path: Path, label_names: list[str], multi_label: bool) -> tuple[dict[bytes, int], torch.Tensor]:
    """The store's rows by text digest, and its logits; empty for a missing, damaged or foreign file, or one
    written for other labels (recomputed, never trusted)."""
    empty = ({}, torch.empty(0, len(label_names)))
    if not path.is_file():
        return empty
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            digests, logits = handle.get_tensor("digests"), handle.get_tensor("logits")
    except Exception:  # noqa: BLE001 - any unreadable store is simply recomputed
        return empty
    if (meta.get("labels") != json.dumps(label_names) or meta.get("multi_label") != str(multi_label)
            or digests.dtype != torch.uint8 or digests.ndim != 2 or digests.shape[1] != 16
            or logits.dtype != torch.float32 or tuple(logits.shape) != (len(digests), len(label_names))
            or not torch.isfinite(logits).all()):
        return empty
    rows = {bytes(row): i for i, row in enumerate(digests.numpy())}
    return (rows, logits) if len(rows) == len(digests) else empty


def _write_store(path: Path, rows: dict[bytes, int], logits: torch.Tensor, label_names: list[str],
                 multi_label: bool) -> None:
    """Atomically, through a file of this process's own: students training at once never write into one file.
    `rows` maps each digest to its row of `logits` (rows 0..n-1, as teacher_logits builds them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = sorted(rows, key=rows.get)
    partial = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.partial")
    save_file({"digests": torch.tensor([list(d) for d in ordered], dtype=torch.uint8).reshape(-1, 16),
               "logits": logits.contiguous()}, str(partial),
              metadata={"labels": json.dumps(label_names), "multi_label": str(multi_label)})
    partial.replace(path)


def teacher_logits(run_dir: Path, texts: list[str], label_names: list[str], multi_label: bool,
                   batch_size: int = 64) -> torch.Tensor:
    """The teacher's fp32 logits for `texts` (its own tokenizer, max_length and precision), cached on disk per text:
    a later call computes only the texts the store does not hold yet (a longer unlabelled file, a new split)."""
    store = cache_dir() / "teacher" / _teacher_fingerprint(run_dir) / "logits.safetensors"
    rows, known = _read_store(store, label_names, multi_label)
    digests = [_text_digest(text) for text in texts]
    cached = sum(d in rows for d in digests)
    missing = list(dict.fromkeys(d for d in digests if d not in rows))  # in order, each text once
    if missing:
        run = load_run(run_dir)  # validates the teacher's files like any run's
        if run.label_names != label_names or run.decision.multi_label != multi_label:
            raise NewstuneError(f"distill.teacher {run_dir} predicts labels {run.label_names} but the student's "
                                f"data has {label_names}; a teacher must be trained on the same labels, in the same "
                                "order")
        text_of = {d: t for d, t in zip(digests, texts, strict=True)}
        new_texts = [text_of[d] for d in missing]
        ids = tokenize_texts(run.tokenizer, new_texts, run.config.data.max_length, cache_dir() / "tokens")
        new = torch.from_numpy(run.logits(new_texts, ids, batch_size, progress=True, desc="teacher")).float()
        rows |= {d: len(known) + i for i, d in enumerate(missing)}
        known = torch.cat([known, new])
        # rows another student wrote meanwhile are kept (last writer wins only for rows both computed)
        others, other_logits = _read_store(store, label_names, multi_label)
        extra = [d for d in others if d not in rows]
        rows |= {d: len(known) + i for i, d in enumerate(extra)}
        known = torch.cat([known, other_logits[[others[d] for d in extra]]]) if extra else known
        _write_store(store, rows, known, label_names, multi_label)
    log.info("teacher logits of %d texts: %d from the cache %s, %d computed", len(texts), cached, store,
             len(missing))
    return known[[rows[d] for d in digests]]


def prepare_teacher(settings: DistillSettings, seed: int, train_texts: list[str], held_out: set[str],
                    clean: CleanConfig, label_names: list[str], multi_label: bool) -> Teacher:
    """The teacher for a student with this seed, its logits on the training texts then the unlabelled ones."""
    run_dir = teacher_run_dir(settings.teacher, seed)
    unlabelled, left_out = [], 0
    if settings.unlabelled_file is not None:
        if multi_label:
            raise NewstuneError("distill.unlabelled_file is for single-label tasks; a multi-label student learns "
                                "from the teacher on its labelled training rows only (drop the file)")
        texts = read_unlabelled(settings.unlabelled_file, settings.unlabelled_column, clean,
                                settings.max_unlabelled)
        unlabelled = [t for t in texts if t not in held_out]  # never learn the teacher's view of evaluation texts
        left_out = len(texts) - len(unlabelled)
        if left_out:
            log.info("distill: %d unlabelled text(s) are in validation/test/holdout and were left out", left_out)
    logits = teacher_logits(run_dir, list(train_texts) + unlabelled, label_names, multi_label)
    return Teacher(run_dir, logits, unlabelled, left_out)


def distillation_loss(logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                      hard_loss: torch.nn.Module, alpha: float, temperature: float,
                      multi_label: bool) -> torch.Tensor:
    """(1 - alpha) * the labels' loss over labelled rows + alpha * T^2 * the soft-label loss over every row.

    Single-label: KL(teacher || student) of the softmaxes at temperature T; multi-label: binary cross-entropy
    against the teacher's sigmoids at T. T^2 keeps the soft term's gradients on the labels' scale as T grows.
    """
    t = temperature
    if multi_label:
        soft = F.binary_cross_entropy_with_logits(logits / t, torch.sigmoid(teacher / t))
        return (1 - alpha) * hard_loss(logits, labels) + alpha * t * t * soft
    soft = F.kl_div(F.log_softmax(logits / t, dim=-1), F.log_softmax(teacher / t, dim=-1), log_target=True,
                    reduction="batchmean")
    labelled = labels != UNLABELLED
    # mean over labelled rows only, with class weights as CrossEntropyLoss weighs them, and without a host sync
    # (a batch of only unlabelled rows gives 0, not 0/0)
    per_row = F.cross_entropy(logits, labels, weight=hard_loss.weight, ignore_index=UNLABELLED, reduction="none")
    weights = labelled.float() if hard_loss.weight is None else hard_loss.weight[labels.clamp(min=0)] * labelled
    hard = per_row.sum() / weights.sum().clamp(min=1e-12)
    return (1 - alpha) * hard + alpha * t * t * soft
