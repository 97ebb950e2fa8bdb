"""Distillation: a student learns a teacher run's soft labels (tiny models; the real figures are in docs/)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from newstune.cli import app
from newstune.config import validate
from newstune.errors import NewstuneError
from newstune.rundir.run import load_run, read_config
from newstune.training import distill
from newstune.training.distill import UNLABELLED, distillation_loss, teacher_logits, teacher_run_dir
from newstune.training.train import train

from .conftest import synthetic_rows, tiny_config, write_csv

ROTATED = {"sports": "business", "business": "science", "science": "sports"}


@pytest.fixture(scope="module")
def teacher(tiny_models, tiny_data, tmp_path_factory) -> Path:
    """A tiny run that has learnt the keyword topics."""
    root = tmp_path_factory.mktemp("teacher")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NEWSTUNE_CACHE", str(root / "cache"))
        run_dir, metrics = train(validate(tiny_config(tiny_models["bert"], tiny_data, **{"train.epochs": 6})),
                                 root / "run")
    assert metrics["test"]["accuracy"] > 0.75
    return run_dir


def rotated_data(folder: Path, tiny_data: Path) -> Path:
    """Training labels rotated (sports -> business, ...); validation and test keep the true ones."""
    folder.mkdir()
    write_csv(folder / "train.csv", [(text, ROTATED[label]) for text, label in synthetic_rows(480, 1)])
    for name in ("valid.csv", "test.csv"):
        shutil.copy(tiny_data / name, folder / name)
    return folder


def student(tiny_models, data: Path, out: Path, teacher: Path | None, keep_last: bool = False,
            **distill_settings) -> tuple[Path, dict]:
    # a full fine-tune at lr 3e-3 learns the tiny task in every seed tried (LoRA at 3e-2 did in most, not all);
    # keep_last: no per-epoch evaluation, so the last weights are kept (validation holds the true labels, and
    # selecting on it would keep a student of rotated labels at its least-trained epoch)
    raw = tiny_config(tiny_models["bert"], data, **{"train.epochs": 6, "lora.method": "full", "train.lr": 3e-3,
                                                    "train.eval_every_epoch": not keep_last})
    if teacher is not None:
        raw["distill"] = {"teacher": str(teacher), **distill_settings}
    return train(validate(raw), out)


def test_a_student_on_soft_labels_follows_its_teacher_not_its_labels(teacher, tiny_models, tiny_data, tmp_path):
    # Fails when the soft-label loss is zero or the teacher's logits are not what it reads: with alpha 1 the
    # rotated labels carry no weight, so only the teacher can make the student right on the true test labels.
    data = rotated_data(tmp_path / "rotated", tiny_data)
    run_dir, metrics = student(tiny_models, data, tmp_path / "student", teacher, alpha=1.0, temperature=1.0)
    assert metrics["distill"]["test"]["accuracy"] > 0.75
    assert metrics["test"]["accuracy"] > 0.6, "chance is 0.33, and the labels alone teach the rotation"
    _, plain = student(tiny_models, data, tmp_path / "plain", None, keep_last=True)
    assert plain["test"]["accuracy"] < 0.25, "without the teacher the rotated labels are learnt"
    assert metrics["distill"]["run"] == str(teacher.resolve()) and metrics["distill"]["teacher_seconds"] >= 0
    assert read_config(run_dir).distill.teacher == teacher


def test_unlabelled_texts_are_learnt_and_evaluation_texts_left_out(teacher, tiny_models, tiny_data, tmp_path):
    # A student with 30 labelled rows and 420 teacher-labelled texts; 10 of the file's texts are test texts.
    data = tmp_path / "few"
    data.mkdir()
    write_csv(data / "train.csv", synthetic_rows(30, 1))
    for name in ("valid.csv", "test.csv"):
        shutil.copy(tiny_data / name, data / name)
    test_texts = [text for text, _ in synthetic_rows(60, 3)][:10]
    unlabelled = [text for text, _ in synthetic_rows(480, 5)][:420] + test_texts
    (tmp_path / "more.txt").write_text("\n".join(unlabelled) + "\n")
    _, metrics = student(tiny_models, data, tmp_path / "student", teacher, alpha=0.9,
                         unlabelled_file=str(tmp_path / "more.txt"))
    assert metrics["distill"]["unlabelled_left_out"] == len(set(test_texts))
    assert metrics["distill"]["unlabelled_texts"] == len(unlabelled) - len(set(test_texts))
    assert metrics["efficiency"]["train_samples_per_s"] > 0
    history = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    steps = max(h["step"] for h in history if h["kind"] == "train")
    assert steps == 6 * -(-(30 + 420) // 16), "every epoch runs over the labelled and the unlabelled texts"


def test_distillation_loss_matches_its_formula():
    torch.manual_seed(0)
    logits, teacher = torch.randn(6, 3), torch.randn(6, 3)
    labels = torch.tensor([0, 2, UNLABELLED, 1, UNLABELLED, 0])
    hard = torch.nn.CrossEntropyLoss()
    t, alpha = 3.0, 0.25
    kl = (F.softmax(teacher / t, -1) * (F.log_softmax(teacher / t, -1) - F.log_softmax(logits / t, -1))).sum(-1)
    labelled = labels != UNLABELLED
    expected = (1 - alpha) * F.cross_entropy(logits[labelled], labels[labelled]) + alpha * t * t * kl.mean()
    assert distillation_loss(logits, teacher, labels, hard, alpha, t, False) == pytest.approx(expected.item())
    # the same student and teacher: nothing left to learn from the teacher
    assert distillation_loss(teacher, teacher, labels, hard, 1.0, t, False) == pytest.approx(0.0, abs=1e-6)
    # a batch of unlabelled rows only: the soft term alone, not 0/0
    none = torch.full((6,), UNLABELLED)
    assert torch.isfinite(distillation_loss(logits, teacher, none, hard, 0.5, t, False))
    weighted = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0]))
    assert distillation_loss(logits, teacher, labels, weighted, 0.0, t, False) == pytest.approx(
        weighted(logits[labelled], labels[labelled]).item())


def test_teacher_logits_are_cached_and_a_damaged_cache_is_recomputed(teacher, monkeypatch):
    texts = [text for text, _ in synthetic_rows(20, 9)]
    labels = load_run(teacher).label_names
    first = teacher_logits(teacher, texts, labels, False)
    monkeypatch.setattr(distill, "load_run", lambda *a, **k: pytest.fail("the cached logits were not used"))
    assert torch.equal(teacher_logits(teacher, texts, labels, False), first)
    stores = list((Path.cwd() / "cache" / "teacher").rglob("*.safetensors"))
    assert stores
    for cached in stores:
        cached.write_bytes(b"not a safetensors file")
    monkeypatch.undo()
    assert torch.equal(teacher_logits(teacher, texts, labels, False), first)


def test_teacher_logits_are_computed_once_per_text(teacher, monkeypatch):
    # fails if the cache is keyed by the whole list (a longer unlabelled file recomputed every text) or if rows come
    # back in another order than the texts asked for
    old = [text for text, _ in synthetic_rows(12, 21)]
    new = [text for text, _ in synthetic_rows(5, 22)]
    labels = load_run(teacher).label_names
    computed: list[int] = []
    real_load_run = distill.load_run

    def counting_load_run(*args, **kwargs):
        run = real_load_run(*args, **kwargs)
        real_logits = run.logits
        run.logits = lambda texts, *a, **k: (computed.append(len(texts)), real_logits(texts, *a, **k))[1]
        return run

    monkeypatch.setattr(distill, "load_run", counting_load_run)
    first = teacher_logits(teacher, old, labels, False)
    assert computed == [len(set(old))]
    with pytest.raises(NewstuneError, match="same labels"):  # cached texts, labels in another order: refused
        teacher_logits(teacher, old, labels[::-1], False)
    computed.clear()
    assert torch.equal(teacher_logits(teacher, old, labels, False), first) and not computed
    both = teacher_logits(teacher, new + old + new[:2], labels, False)  # a repeated text is computed once
    assert computed == [len(set(new) - set(old))]
    torch.testing.assert_close(both[len(new):len(new) + len(old)], first)
    torch.testing.assert_close(both[-2:], both[:2])
    alone = teacher_logits(teacher, new[::-1], labels, False)  # all known now: nothing computed, texts' order
    assert len(computed) == 1
    torch.testing.assert_close(alone, both[:len(new)].flip(0))


def test_a_teacher_of_other_labels_or_unfinished_is_refused_in_one_line(teacher, tmp_path):
    with pytest.raises(NewstuneError, match="predicts labels .* same labels"):
        teacher_logits(teacher, ["goal match"], ["a", "b", "c"], False)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(teacher, unfinished)
    (unfinished / "metrics.json").unlink()
    with pytest.raises(NewstuneError, match="has not finished training"):
        teacher_run_dir(unfinished, 7)


def test_a_seed_group_teaches_with_the_students_seed(teacher, tmp_path):
    group = tmp_path / "group"
    group.mkdir()
    (group / "seeds.yaml").write_text(yaml.safe_dump({"seeds": [7, 8]}))
    shutil.copytree(teacher, group / "seed-7")
    assert teacher_run_dir(group, 7) == group / "seed-7"
    with pytest.raises(NewstuneError, match="without seed-9"):
        teacher_run_dir(group, 9)


def test_cli_distill_names_the_run_and_refuses_bad_settings(teacher, tiny_models, tiny_data, tmp_path):
    recipe = tmp_path / "student.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config(tiny_models["bert"], tiny_data, **{"train.epochs": 1})))
    runner = CliRunner()
    bad = runner.invoke(app, ["distill", str(teacher), str(recipe), "--alpha", "1.5"])
    assert bad.exit_code != 0 and "distill.alpha" in str(bad.exception)
    done = runner.invoke(app, ["distill", str(teacher), str(recipe), "--temperature", "4",
                               "--output-dir", str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    config = read_config(tmp_path / "out")
    assert config.name == "tiny_distilled" and config.distill.temperature == 4.0
    assert np.isfinite(json.loads((tmp_path / "out" / "metrics.json").read_text())["test"]["loss"])
