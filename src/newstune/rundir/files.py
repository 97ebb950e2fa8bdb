"""What a run folder's JSON files may hold: a run is sent between users, so every file in it is untrusted input.

`run.py` reads each file and hands it here; a value a reader would trip over (a string where a figure belongs, a
dtype nobody knows, a label list that is not a list of names) becomes one line naming the file and the field.
Only the fields newstune reads are checked; keys it does not know are left alone (older and newer runs add some).
"""

from __future__ import annotations

import math
from pathlib import Path

from newstune.errors import NewstuneError

UNIT_FIGURES = ("accuracy", "macro_f1", "micro_f1", "samples_f1", "ece")  # in [0, 1]
POSITIVE_FIGURES = ("loss", "brier")
SPLIT_SECTIONS = ("validation", "test", "holdout")
PRECISIONS = ("fp32", "bf16", "fp16")
EXPORT_BACKENDS = ("onnx", "openvino")
EXPORT_PRECISIONS = ("fp32", "bf16", "int8")  # OpenVINO computes fp32 exports in bf16 where native


class _Bad(Exception):
    """A field and what is wrong with it; the caller adds the file and the fix."""


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _need(ok: bool, field: str, value: object, expected: str) -> None:
    if not ok:
        shown = repr(value)
        raise _Bad(f"field '{field}' is {shown[:60]}{'...' if len(shown) > 60 else ''}, expected {expected}")


def _scores(section: object, where: str) -> None:
    _need(isinstance(section, dict), where, section, "an object of figures")
    for key in UNIT_FIGURES:
        if section.get(key) is not None:
            _need(_number(section[key]) and 0 <= section[key] <= 1, f"{where}.{key}", section[key],
                  "a number in [0, 1]")
    for key in POSITIVE_FIGURES:
        if section.get(key) is not None:
            _need(_number(section[key]) and section[key] >= 0, f"{where}.{key}", section[key], "a number >= 0")
    if "n" in section:
        _need(isinstance(section["n"], int) and not isinstance(section["n"], bool) and section["n"] >= 0,
              f"{where}.n", section["n"], "a row count")
    per_class = section.get("per_class", {})
    _need(isinstance(per_class, dict), f"{where}.per_class", per_class, "an object per class")
    for name, figures in per_class.items():
        _need(isinstance(figures, dict) and all(_number(v) for v in figures.values()),
              f"{where}.per_class.{name}", figures, "an object of numbers")
    matrix = section.get("confusion_matrix", [])
    _need(isinstance(matrix, list) and all(isinstance(row, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in row) for row in matrix),
        f"{where}.confusion_matrix", matrix, "a list of rows of counts")


def _metrics(data: object) -> None:
    _need(isinstance(data, dict), "<top>", data, "a JSON object")
    for key, section in data.items():
        if key in SPLIT_SECTIONS or key.startswith("extra:"):
            _scores(section, key)
            for needed in ("n", "accuracy", "macro_f1"):  # what the card, report and tables read from every split
                _need(needed in section, f"{key}.{needed}", None, "present (every evaluated split has it)")
    threshold = data.get("threshold")
    _need(threshold is None or (_number(threshold) and 0 < threshold < 1), "threshold", threshold,
          "null or a number between 0 and 1")
    efficiency = data.get("efficiency", {})
    _need(isinstance(efficiency, dict), "efficiency", efficiency, "an object")
    for key in ("precision", "frozen_weights_dtype"):
        if key in efficiency:
            _need(efficiency[key] in PRECISIONS, f"efficiency.{key}", efficiency[key], f"one of {PRECISIONS}")
    for key, value in efficiency.items():
        if key.endswith(("_seconds", "_s", "_mb", "_ms_median", "_params", "_steps", "_fraction")):
            _need(value is None or (_number(value) and value >= 0), f"efficiency.{key}", value, "a number >= 0")
    baseline = data.get("baseline")
    if baseline is not None:
        _need(isinstance(baseline, dict), "baseline", baseline, "an object")
        for split in ("validation", "test", "holdout"):
            if split in baseline:
                _scores(baseline[split], f"baseline.{split}")
    for key in ("best_epoch", "best_step"):
        if data.get(key) is not None:
            _need(isinstance(data[key], int) and not isinstance(data[key], bool) and data[key] >= 0, key,
                  data[key], "a count")


def check_metrics(data: object, path: Path) -> dict:
    try:
        _metrics(data)
    except _Bad as bad:
        raise NewstuneError(f"{path}: {bad}; the file was changed or damaged: re-create it with "
                            "`newstune evaluate RUN` or ask the run's author for the original") from None
    return data


def check_labels(data: object, path: Path) -> list[str]:
    problem = None
    if not isinstance(data, list) or not all(isinstance(name, str) for name in data):
        problem = "expected a JSON list of label names"
    elif len(data) < 2:
        problem = f"it names {len(data)} label(s); a classifier needs at least 2"
    elif any(not name.strip() for name in data):
        problem = "a label name is empty"
    elif len(set(data)) != len(data):
        problem = "a label name appears twice"
    if problem:
        raise NewstuneError(f"{path}: {problem}; the file was changed or damaged: restore it from the run's author "
                            "(its order is the model's output order)")
    return data


def check_export(data: object, path: Path) -> dict:
    try:
        _need(isinstance(data, dict), "<top>", data, "a JSON object")
        _need(data.get("backend") in EXPORT_BACKENDS, "backend", data.get("backend"), f"one of {EXPORT_BACKENDS}")
        _need(data.get("precision") in EXPORT_PRECISIONS, "precision", data.get("precision"),
              f"one of {EXPORT_PRECISIONS}")
        _need(isinstance(data.get("passed"), bool), "passed", data.get("passed"), "true or false")
        speed = data.get("speed")
        _need(isinstance(speed, dict) and _number(speed.get("speedup")) and speed["speedup"] > 0, "speed.speedup",
              speed.get("speedup") if isinstance(speed, dict) else speed, "a number > 0")
        validation = data.get("validation")
        _need(isinstance(validation, dict) and _number(validation.get("macro_f1_delta_points")),
              "validation.macro_f1_delta_points",
              validation.get("macro_f1_delta_points") if isinstance(validation, dict) else validation, "a number")
    except _Bad as bad:
        raise NewstuneError(f"{path}: {bad}; the file was changed or damaged: delete {path.parent} and export "
                            "again (newstune export RUN --backend ...)") from None
    return data
