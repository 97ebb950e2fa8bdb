"""The Ray engine: distributed batch scoring (sharded, resumable), Ray Train, sweeps on Ray and on shared storage.

Tests that start Ray are marked slow (run them under the shared lock: flock /tmp/newstune-heavy.lock pytest -m slow
tests/test_ray.py); the checks of inputs, planning and errors run without Ray.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from newstune.config import validate
from newstune.errors import NewstuneError
from newstune.inference.predict import predict_file
from newstune.inference.ray_predict import MANIFEST, expand_inputs, piece_chunks, plan_pieces, predict_files
from newstune.rundir.run import load_run
from newstune.training.sweep import sweep
from newstune.training.train import train

from .conftest import synthetic_rows, tiny_config


@pytest.fixture(scope="module")
def topic_run(tiny_models, tiny_data, tmp_path_factory) -> Path:
    run_dir, _ = train(validate(tiny_config(tiny_models["bert"], tiny_data, **{"train.epochs": 2})),
                       tmp_path_factory.mktemp("runs") / "topics")
    return run_dir


@pytest.fixture
def small_ray():
    """A 2-CPU local Ray without dashboard or worker logs, started once per test and shut down after it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def jsonl_lines(n: int, seed: int) -> list[str]:
    return [json.dumps({"text": text, "id": f"{seed}-{i}"}) for i, (text, _) in enumerate(synthetic_rows(n, seed))]


def write_inputs(folder: Path) -> dict[str, int]:
    """Three inputs of three kinds; b.jsonl.gz has a bad row at line 7. Returns rows per file."""
    folder.mkdir()
    a = jsonl_lines(25, 1)
    b = jsonl_lines(30, 2)
    b.insert(6, "{not json")
    (folder / "a.jsonl").write_text("\n".join(a) + "\n")
    with gzip.open(folder / "b.jsonl.gz", "wt") as handle:
        handle.write("\n".join(b) + "\n")
    rows = synthetic_rows(18, 3)
    (folder / "c.csv").write_text("text,id\n" + "".join(f"{t},3-{i}\n" for i, (t, _) in enumerate(rows)))
    return {"a.jsonl": 25, "b.jsonl.gz": 31, "c.csv": 18}


def read_shards(out_dir: Path) -> list[dict]:
    import csv

    rows = []
    for shard in sorted(out_dir.glob("*.part-*")):
        if shard.suffix == ".jsonl":
            rows += [json.loads(line) for line in shard.read_text().splitlines()]
        else:
            rows += list(csv.DictReader(shard.open()))
    return rows


# ---------------------------------------------------------------- without Ray


def test_ray_not_installed_is_one_line_naming_the_extra(monkeypatch, topic_run, tmp_path):
    (tmp_path / "in.jsonl").write_text("\n".join(jsonl_lines(3, 1)) + "\n")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(NewstuneError, match=r"^--engine ray needs Ray, which is not installed; "
                                            r"pip install 'newstune\[ray\]'$"):
        predict_files(topic_run, str(tmp_path / "*.jsonl"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_local_paths_import_without_ray():
    blocker = ("import sys, importlib.abc\n"
               "class NoRay(importlib.abc.MetaPathFinder):\n"
               "    def find_spec(self, name, path, target=None):\n"
               "        if name == 'ray' or name.startswith('ray.'): raise ImportError(name)\n"
               "sys.meta_path.insert(0, NoRay())\n"
               "import newstune.cli, newstune.inference.predict, newstune.training.train, newstune.training.sweep\n"
               "import newstune.serving.serve, newstune.inference.ray_predict, newstune.training.ray_train\n"
               "import newstune.distributed.sweep, newstune.distributed.cluster\n"
               "assert 'ray' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_unreachable_address_fails_in_seconds():
    from newstune.distributed.cluster import check_reachable

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    start = time.perf_counter()
    with pytest.raises(NewstuneError, match=rf"cannot reach a Ray cluster at --address 127.0.0.1:{port} .*ray start"):
        check_reachable(f"127.0.0.1:{port}")
    assert time.perf_counter() - start < 10  # ray.init itself retries for minutes


def test_no_matching_input_files(topic_run, tmp_path):
    with pytest.raises(NewstuneError, match=r"no files match; check the pattern and quote it"):
        predict_files(topic_run, str(tmp_path / "nothing" / "*.jsonl"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_folder_conflicts_leave_earlier_results_alone(topic_run, tmp_path):
    write_inputs(tmp_path / "in")
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.csv").write_text("mine\n")
    with pytest.raises(NewstuneError, match=r"output folder .*other is not empty and holds no newstune predict"):
        predict_files(topic_run, str(tmp_path / "in" / "*"), other)
    assert [p.name for p in other.iterdir()] == ["results.csv"]
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / MANIFEST).write_text(json.dumps({"run": "/elsewhere/run", "shard_rows": 8192, "inputs": {}}))
    with pytest.raises(NewstuneError, match=r"holds predictions of /elsewhere/run in shards of 8192 rows"):
        predict_files(topic_run, str(tmp_path / "in" / "*"), earlier)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(NewstuneError, match="is a file; with --engine ray --output is a folder"):
        predict_files(topic_run, str(tmp_path / "in" / "*"), a_file)


def test_pieces_cover_every_row_once_with_its_line(tmp_path):
    counts = write_inputs(tmp_path / "in")
    inputs = expand_inputs(str(tmp_path / "in" / "*"))
    pieces, files = plan_pieces(inputs, 7, {})
    assert {Path(k).name: v["rows"] for k, v in files.items()} == counts
    lines = {}
    for piece in pieces:
        chunk_rows = [row for chunk in piece_chunks(Path(piece.source), piece.start, piece.rows) for row in chunk]
        assert len(chunk_rows) == piece.rows
        for number, _, error in chunk_rows:
            key = (Path(piece.source).name, number)
            assert key not in lines  # no row in two pieces
            lines[key] = error
    assert len(lines) == sum(counts.values())
    assert "invalid JSON" in lines[("b.jsonl.gz", 7)]
    assert sorted(n for name, n in lines if name == "c.csv") == list(range(2, 20))  # CSV rows from line 2
    assert len({p.shard for p in pieces}) == len(pieces) == 4 + 5 + 3


def test_same_file_names_in_two_folders_get_distinct_shards(tmp_path):
    for folder in ("x", "y"):
        (tmp_path / "in" / folder).mkdir(parents=True)
        (tmp_path / "in" / folder / "news.jsonl").write_text("\n".join(jsonl_lines(3, 1)) + "\n")
    pieces, _ = plan_pieces(expand_inputs(str(tmp_path / "in" / "*" / "*.jsonl")), 100, {})
    assert sorted(p.shard for p in pieces) == ["x__news.jsonl.part-00000.jsonl", "y__news.jsonl.part-00000.jsonl"]


def test_changed_input_is_refused_on_resume(tmp_path):
    write_inputs(tmp_path / "in")
    inputs = expand_inputs(str(tmp_path / "in" / "*"))
    _, files = plan_pieces(inputs, 10, {})
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(jsonl_lines(40, 1)) + "\n")
    with pytest.raises(NewstuneError, match=r"a.jsonl changed since the earlier predict"):
        plan_pieces(inputs, 10, files)


def test_sweep_machines_share_one_study_through_storage(tiny_models, tiny_data, tmp_path, monkeypatch):
    import newstune.training.sweep as sweep_module

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config(tiny_models["bert"], tiny_data, **{"train.epochs": 1})))
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    real_train, calls = sweep_module.train_in_subprocess, []

    def counting(*args):
        calls.append(args[2])
        return real_train(*args)

    monkeypatch.setattr(sweep_module, "train_in_subprocess", counting)
    rows_a = sweep(recipe, [], ["lora.r=2,4"], tmp_path / "machine_a", None, storage=shared)
    assert len(calls) == 2 and not (tmp_path / "machine_a" / "study.db").exists()
    rows_b = sweep(recipe, [], ["lora.r=2,4"], tmp_path / "machine_b", None, storage=shared)
    assert len(calls) == 2  # the second machine found every configuration done in the shared study
    assert rows_b == rows_a


def test_unusable_storage_is_one_line_without_the_password(tiny_models, tiny_data, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config(tiny_models["bert"], tiny_data)))
    with pytest.raises(NewstuneError, match=r"cannot open the study storage --storage nosuchdb://u:\*\*\*@h/db") as e:
        sweep(recipe, [], ["lora.r=2"], tmp_path / "sw", None, storage="nosuchdb://u:secret@h/db")
    assert "secret" not in str(e.value)


# ---------------------------------------------------------------- on a small local Ray (slow)


@pytest.mark.slow
def test_scoring_many_files_on_ray_keeps_every_row_and_the_bad_one(topic_run, tmp_path, small_ray):
    counts = write_inputs(tmp_path / "in")
    result = predict_files(topic_run, str(tmp_path / "in" / "*"), tmp_path / "out", batch_size=8, workers=2,
                           shard_rows=10)
    total = sum(counts.values())
    assert result == {"rows": total, "predicted": total - 1, "errors": 1, "shards": 3 + 4 + 2,
                      "skipped_shards": 0, "skipped_rows": 0}
    rows = read_shards(tmp_path / "out")
    keys = [(Path(r["source_file"]).name, int(r["line"])) for r in rows]
    assert len(keys) == len(set(keys)) == total
    bad = [r for r in rows if r["error"]]
    assert [(Path(r["source_file"]).name, int(r["line"])) for r in bad] == [("b.jsonl.gz", 7)]
    assert bad[0]["error"].startswith("invalid JSON")
    assert not list((tmp_path / "out").glob(".*.partial"))
    # the same labels and probabilities as local predict on the same file
    predict_file(load_run(topic_run), tmp_path / "in" / "a.jsonl", tmp_path / "local.jsonl")
    local = {o["line"]: o for o in map(json.loads, (tmp_path / "local.jsonl").read_text().splitlines())}
    on_ray = {r["line"]: r for r in rows if r["source_file"].endswith("a.jsonl")}
    assert {n: o["predicted_label"] for n, o in local.items()} == {n: o["predicted_label"] for n, o in on_ray.items()}
    # shards batch other rows together than one local pass: another padded width rounds the 6th decimal
    for n, ours in local.items():
        assert list(on_ray[n]["probabilities"].values()) == pytest.approx(list(ours["probabilities"].values()),
                                                                          abs=2e-6)


def complete_shards(out_dir: Path) -> list[Path]:
    """Finished shards only: pathlib's glob also matches the hidden `.<shard>.<pid>.partial` being written."""
    return [p for p in out_dir.glob("*.part-*") if not p.name.startswith(".")]


@pytest.mark.slow
def test_killed_ray_scoring_resumes_without_loss_or_duplicates(topic_run, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        (folder / f"part{i}.jsonl").write_text("\n".join(jsonl_lines(500, 10 + i)) + "\n")
    command = [sys.executable, "-m", "newstune.cli", "predict", str(topic_run), "--input", str(folder / "*.jsonl"),
               "--output", str(tmp_path / "out"), "--engine", "ray", "--workers", "2", "--shard-rows", "10",
               "--batch-size", "8"]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 480  # Ray starts slowly on 2 busy cores
    while time.time() < deadline and len(complete_shards(tmp_path / "out")) < 5:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(3)  # Ray's processes die with the driver that started them
    written = len(complete_shards(tmp_path / "out"))
    assert 5 <= written < 200, "the kill did not land midway"
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{200 - written} new shards; {written} shards already complete" in again.stdout
    rows = read_shards(tmp_path / "out")
    keys = [(Path(r["source_file"]).name, r["line"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2000
    assert sorted(r["id"] for r in rows) == sorted(f"{10 + i}-{j}" for i in range(4) for j in range(500))
    assert not list((tmp_path / "out").glob(".*.partial"))


@pytest.mark.slow
def test_train_with_two_ray_workers_matches_a_local_run(tiny_models, tiny_data, tmp_path, small_ray):
    from newstune.training.ray_train import train_on_ray

    # the same effective batch: 2 workers x 16, or 1 process x 16 x 2 accumulated micro-batches
    # 10 epochs: both runs learn the tiny task (at 6 the local run's accuracy ranged 0.80-0.93 with the dropout draws)
    config = tiny_config(tiny_models["bert"], tiny_data, **{"train.epochs": 10})
    local_dir, local = train(validate({**config, "train": {**config["train"], "grad_accum": 2}}), tmp_path / "local")
    ray_dir, on_ray = train_on_ray(validate(config), tmp_path / "ray", workers=2)
    assert ray_dir == (tmp_path / "ray").resolve()
    assert on_ray["efficiency"]["num_processes"] == 2 and local["efficiency"]["num_processes"] == 1
    assert sorted(p.name for p in ray_dir.iterdir()) == sorted(p.name for p in local_dir.iterdir())
    assert on_ray["efficiency"]["optimizer_steps"] == local["efficiency"]["optimizer_steps"]
    assert abs(on_ray["test"]["accuracy"] - local["test"]["accuracy"]) <= 0.05
    assert on_ray["test"]["accuracy"] > 0.6
    assert not list(tmp_path.glob(".ray-train-*"))


@pytest.mark.slow
def test_sweep_on_ray_retries_a_failed_trial(tiny_models, tiny_data, tmp_path, monkeypatch, small_ray):
    import newstune.training.sweep as sweep_module

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config(tiny_models["bert"], tiny_data, **{"train.epochs": 1})))
    real_train, marks = sweep_module.train_in_subprocess, tmp_path / "marks"
    marks.mkdir()

    def fails_once_for_r4(recipe, overrides, run_dir, log_path):  # runs in a Ray worker: state lives in files
        (marks / f"{os.getpid()}-{run_dir.name}").touch()
        if "lora.r=4" in overrides and not (marks / "failed").exists():
            (marks / "failed").touch()
            run_dir.mkdir(parents=True)
            (run_dir / "FAILED").write_text("RuntimeError: worker lost\n")
            return False
        return real_train(recipe, overrides, run_dir, log_path)

    monkeypatch.setattr(sweep_module, "train_in_subprocess", fails_once_for_r4)
    rows = sweep(recipe, [], ["lora.r=2,4"], tmp_path / "sw", None, engine="ray", workers=2)
    assert {r["lora.r"]: (r["status"], r["failures"]) for r in rows} == {2: ("ok", 0), 4: ("ok", 1)}
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'sw' / 'study.db'}")
    assert sorted((t.params["lora.r"], t.state.name) for t in study.trials) == \
           [(2, "COMPLETE"), (4, "COMPLETE"), (4, "FAIL")]
    pids = {int(p.name.split("-")[0]) for p in marks.iterdir() if p.name != "failed"}
    assert len(list(marks.iterdir())) == 4 and os.getpid() not in pids  # 3 tries, all in Ray workers
    assert yaml.safe_load((Path(rows[0]["run_dir"]) / "config.yaml").read_text())["train"]["threads"] == 1
