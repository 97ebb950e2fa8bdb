"""Batch prediction over the AG News test set: the HF pipeline against newstune on every backend, in one run.

Contenders: transformers.pipeline("text-classification") on the merged fp32 model at batch 1 and 64, newstune on
PyTorch (the run's precision), and newstune on each backend export of the run (ONNX Runtime and OpenVINO, fp32 and
int8; made with `newstune export RUN --backend ...` first when missing, so each passed the validation gate).
Every contender is timed over the same boundary: texts in, labels out (tokenization included), after a warm-up
on the first 256 texts (several batches, so a backend that prepares its batch path on first use -- OpenVINO's
two-stream compilation -- is ready, as it is for every file after the first). Accuracy is on the test labels;
agreement is against the pipeline at batch 64.

    python benchmarks/predict_speed.py runs/ag_news_minilm_lora
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, cpu_line, machine, markdown_table, write_results  # noqa: E402

EXPORTS = [("onnx", False), ("onnx", True), ("openvino", False), ("openvino", True)]


def timed(label_fn, texts: list[str]) -> tuple[list[int], float]:
    label_fn(texts[:256])
    start = time.perf_counter()
    labels = label_fn(texts)
    return labels, len(texts) / (time.perf_counter() - start)


def pipeline_rows(run_dir: Path, texts: list[str], max_length: int) -> list[dict]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from newstune.inference.export import export_merged

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        export_merged(run_dir, Path(tmp) / "merged")
        tokenizer = AutoTokenizer.from_pretrained(Path(tmp) / "merged")
        model = AutoModelForSequenceClassification.from_pretrained(Path(tmp) / "merged").eval()
    classifier = pipeline("text-classification", model=model, tokenizer=tokenizer, device="cpu", truncation=True,
                          max_length=max_length)
    for batch_size in (1, 64):
        def label(batch: list[str], size: int = batch_size) -> list[int]:
            return [model.config.label2id[o["label"]] for o in classifier(batch, batch_size=size)]

        labels, speed = timed(label, texts)
        rows.append({"contender": f"HF pipeline b={batch_size}", "backend": "torch-fp32", "gate": "-",
                     "samples_per_s": speed, "labels": labels})
    return rows


def newstune_row(run, texts: list[str], gate: str) -> dict:
    import numpy as np

    def label(batch: list[str]) -> list[int]:
        ids = run.tokenizer(batch, truncation=True, max_length=run.config.data.max_length)["input_ids"]
        return np.asarray(run.scorer.logits(ids, 64, throughput=True)).argmax(1).tolist()

    labels, speed = timed(label, texts)
    return {"contender": f"newstune {run.scorer.backend}", "backend": run.backend, "gate": gate,
            "samples_per_s": speed, "labels": labels}


def ensure_exports(run_dir: Path) -> dict[str, dict]:
    """Each backend export of the run, made (and gated on validation) when missing; refused ones are reported."""
    from newstune.errors import NewstuneError
    from newstune.inference.backend_export import export_backend
    from newstune.rundir.run import export_dir, read_exports

    for backend, int8 in EXPORTS:
        if not export_dir(run_dir, backend, "int8" if int8 else "fp32").exists():
            try:
                export_backend(run_dir, backend, int8)
            except NewstuneError as err:
                print(f"export: {err}", file=sys.stderr)
    return {f"{e['backend']}-{e['precision']}": e for e in read_exports(run_dir)}


def main() -> None:
    import numpy as np

    from newstune.data.registry import load_dataset
    from newstune.modeling.backends import export_scorer
    from newstune.rundir.run import load_run

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--rows", type=int, default=None, help="test rows (default all 7,600)")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    run = load_run(args.run, backend="torch")
    data = run.config.data.model_copy(update={"dir": SHARED_DATA / "ag_news", "max_eval_rows": None})
    test = load_dataset(data, run.config.train.seed).splits["test"]
    texts, gold = test.texts[: args.rows or None], np.asarray(test.labels[: args.rows or None])
    exports = ensure_exports(args.run)
    auto = load_run(args.run, backend="auto").backend
    rows = pipeline_rows(args.run, texts, run.config.data.max_length)
    rows.append(newstune_row(run, texts, "reference"))
    for checks in exports.values():
        run.scorer = export_scorer(Path(checks["folder"]), checks["backend"], checks["precision"],
                                   run.tokenizer.pad_token_id)
        gate = f"{'passed' if checks['passed'] else 'refused'} ({checks['validation']['macro_f1_delta_points']:+.2f})"
        rows.append({**newstune_row(run, texts, gate), "passed": checks["passed"]})
    pipeline_b64, reference = rows[1], np.asarray(rows[1]["labels"])
    for row in rows:
        labels = np.asarray(row.pop("labels"))
        row["accuracy"] = float((labels == gold).mean())
        row["agreement"] = float((labels == reference).mean())
    for row in rows:
        row["vs_pipeline_b64"] = row["samples_per_s"] / pipeline_b64["samples_per_s"]
        row["accuracy_delta_points"] = 100 * (row["accuracy"] - pipeline_b64["accuracy"])
    table = markdown_table(rows, [("contender", "contender"), ("backend", "runs as"),
                                  ("gate", "validation gate (macro-F1 points)"), ("samples_per_s", "texts/s"),
                                  ("vs_pipeline_b64", "x pipeline b=64"), ("accuracy", "test accuracy"),
                                  ("accuracy_delta_points", "accuracy vs pipeline (points)"),
                                  ("agreement", "same label as pipeline b=64")])
    eligible = [r for r in rows[2:] if r.get("passed", True)]
    best = max(eligible, key=lambda r: r["samples_per_s"])
    write_results(Path(args.out), "predict_speed", {"machine": machine(), "cpu": cpu_line(), "run": str(args.run),
                                                     "texts": len(texts), "auto_backend": auto, "rows": rows},
                  f"{table}\n\n{len(texts):,} AG News test texts; `--backend auto` picks {auto} on this machine.\n"
                  f"{cpu_line()}")
    print(cpu_line())
    print(f"model: {run.config.model.name}")
    print(f"best: {best['backend']}")
    print(f"best_vs_pipeline_b64: {best['vs_pipeline_b64']:.2f}x")
    print(f"best_accuracy_delta_points: {best['accuracy_delta_points']:+.2f}")


if __name__ == "__main__":
    main()
