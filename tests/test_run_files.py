"""A run folder is untrusted input: each tampered file gives one line naming it, exit 2, and nothing changes."""

import json
import shutil
import sys

import pytest

from newstune.cli import main
from newstune.config import validate
from newstune.training.train import train

from .conftest import tiny_config, write_csv


@pytest.fixture(scope="module")
def trained(tiny_models, tiny_data, tmp_path_factory):
    run_dir, _ = train(validate(tiny_config(tiny_models["bert"], tiny_data, **{"eval.baseline": False})),
                       tmp_path_factory.mktemp("run_files") / "run")
    return run_dir


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(argv, capsys, monkeypatch) -> str:
    monkeypatch.setattr(sys, "argv", ["newstune", *map(str, argv)])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Loading weights")]
    assert len(lines) == 1, lines  # transformers' own loading bar aside, one line
    return lines[0]


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


TAMPERS = {
    "metrics accuracy a string": ("metrics.json", lambda p: _edit_json(p, lambda m: m["test"].update(accuracy="99%")),
                                  "test.accuracy"),
    "metrics unknown precision": ("metrics.json", lambda p: _edit_json(
        p, lambda m: m["efficiency"].update(precision="int4")), "efficiency.precision"),
    "metrics split without accuracy": ("metrics.json", lambda p: _edit_json(p, lambda m: m["test"].pop("accuracy")),
                                       "test.accuracy"),
    "metrics a list": ("metrics.json", lambda p: p.write_text("[1, 2]"), "JSON object"),
    "metrics not json": ("metrics.json", lambda p: p.write_text("{accuracy: "), "not valid JSON"),
    "metrics confusion strings": ("metrics.json", lambda p: _edit_json(
        p, lambda m: m["validation"].update(confusion_matrix=[["a"]])), "validation.confusion_matrix"),
    "labels a dict": ("label_map.json", lambda p: p.write_text('{"0": "sports"}'), "list of label names"),
    "labels repeated": ("label_map.json", lambda p: p.write_text('["a", "a", "b"]'), "appears twice"),
    "labels too many": ("label_map.json", lambda p: p.write_text('["a", "b", "c", "d", "e"]'),
                        "cannot be loaded"),
    "labels not utf-8": ("label_map.json", lambda p: p.write_bytes(b"\xff\xfe["), "not valid JSON"),
    "config not yaml": ("config.yaml", lambda p: p.write_text("data: [unclosed"), "not valid YAML"),
    "config a list": ("config.yaml", lambda p: p.write_text("- 1\n- 2\n"), "mapping"),
    "config bad value": ("config.yaml", lambda p: p.write_text(p.read_text().replace("batch_size: 16",
                                                                                        "batch_size: -3")),
                         "batch_size"),
}


@pytest.mark.parametrize("case", sorted(TAMPERS))
def test_a_tampered_run_file_is_one_line_and_exit_2(case, run, capsys, monkeypatch):
    """Fails if a damaged metrics.json / label_map.json / config.yaml gives a traceback, loads silently, or lets
    `evaluate` rewrite the run."""
    name, tamper, field = TAMPERS[case]
    tamper(run / name)
    before = _snapshot(run)
    line = _refused(["evaluate", run, "--split", "validation"], capsys, monkeypatch)
    assert line.startswith("error: ") and name in line and field in line, line
    assert _snapshot(run) == before


def _fake_export(run, checks: dict, model_bytes: bytes = b"<net>garbage"):
    folder = run / "exports" / "openvino-fp32"
    folder.mkdir(parents=True)
    (folder / "export_checks.json").write_text(json.dumps(checks))
    (folder / "model.xml").write_bytes(model_bytes)
    (folder / "model.bin").write_bytes(b"\x00" * 16)
    return folder


GOOD_CHECKS = {"backend": "openvino", "precision": "fp32", "passed": True, "speed": {"speedup": 2.0},
               "validation": {"macro_f1_delta_points": 0.0}}


@pytest.mark.parametrize(("change", "field"), [({"passed": "yes"}, "passed"), ({"backend": "tensorrt"}, "backend"),
                                               ({"speed": {"speedup": "fast"}}, "speed.speedup"),
                                               ({"validation": None}, "validation.macro_f1_delta_points")])
def test_tampered_export_checks_are_refused(run, tmp_path, capsys, monkeypatch, change, field):
    """Fails if a hand-edited export_checks.json (e.g. 'passed' flipped to a string) is trusted or traces back."""
    pytest.importorskip("openvino")
    _fake_export(run, {**GOOD_CHECKS, **change})
    texts = write_csv(tmp_path / "in.csv", [("goal match win", "sports")])
    line = _refused(["predict", run, "--input", texts, "--output", tmp_path / "out.csv"], capsys, monkeypatch)
    assert "export_checks.json" in line and field in line, line
    assert not (tmp_path / "out.csv").exists()


def test_a_garbage_openvino_model_is_refused_with_one_line(run, tmp_path, capsys, monkeypatch):
    """Fails if a damaged model.xml reaches the user as an OpenVINO traceback."""
    pytest.importorskip("openvino")
    folder = _fake_export(run, GOOD_CHECKS)
    texts = write_csv(tmp_path / "in.csv", [("goal match win", "sports")])
    line = _refused(["predict", run, "--input", texts, "--output", tmp_path / "out.csv", "--backend", "openvino"],
                    capsys, monkeypatch)
    assert str(folder) in line and "cannot be loaded" in line and "--backend torch" in line, line


def test_report_never_overwrites_an_earlier_report(run, tmp_path, capsys, monkeypatch):
    """Fails if a second `newstune report` into the same folder replaces the first one's comparison.md."""
    out = tmp_path / "report"
    monkeypatch.setattr(sys, "argv", ["newstune", "report", str(run), "--output-dir", str(out)])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 0
    first = (out / "comparison.md").read_bytes()
    line = _refused(["report", run, "--output-dir", out], capsys, monkeypatch)
    assert "already holds a report (comparison.md)" in line and "--output-dir" in line
    assert (out / "comparison.md").read_bytes() == first
