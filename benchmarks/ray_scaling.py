"""Scaling figures for the Ray engine on this machine (a local Ray: head and workers in this box).

1. Training: the AG News MiniLM LoRA recipe on a subset, Ray Train with 1 worker and with 2 workers, same seed and
   same effective batch (1 worker: 16 x 2 accumulated micro-batches; 2 workers: 16 each). Accuracy and time.
2. Batch scoring: the AG News test set repeated into several JSONL files (>= 50,000 texts), local `predict` (one
   process, file after file, model loaded once) vs `predict --engine ray` (an actor per worker); same run, same
   backend; throughput, ratio, and whether both gave the same labels.

    flock /tmp/newstune-heavy.lock python benchmarks/ray_scaling.py [--run RUN] [--copies 7]

Without --run, the scoring uses the model of the 1-worker training run. The data files are written to a temporary
folder and removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED_DATA, machine, markdown_table, write_results  # noqa: E402


def cpu_facts() -> dict:
    text = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    return {"cpu_model": model, "avx512_bf16": "avx512_bf16" in text}


def train_rows(out: Path, train_rows: int, eval_rows: int) -> list[dict]:
    from newstune.config import load_config
    from newstune.training.ray_train import train_on_ray

    rows = []
    for workers, grad_accum in ((1, 2), (2, 1)):
        config = load_config(ROOT / "recipes/ag_news/minilm_lora.yaml", [
            f"data.dir={SHARED_DATA / 'ag_news'}", f"data.max_train_rows={train_rows}",
            f"data.max_eval_rows={eval_rows}", "train.epochs=1", "train.batch_size=16",
            f"train.grad_accum={grad_accum}", "eval.latency_samples=5"])
        start = time.perf_counter()
        run_dir, metrics = train_on_ray(config, out / f"train_{workers}w", workers=workers)
        wall = time.perf_counter() - start
        eff = metrics["efficiency"]
        rows.append({"what": f"Ray Train, {workers} worker(s), batch 16 x {grad_accum} accum x {workers}",
                     "run_dir": str(run_dir), "accuracy": metrics["test"]["accuracy"],
                     "macro_f1": metrics["test"]["macro_f1"], "n_test": metrics["test"]["n"],
                     "train_s": eff["train_seconds"], "samples_per_s": eff["train_samples_per_s"],
                     "wall_s": wall, "precision": eff["precision"], "optimizer_steps": eff["optimizer_steps"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def write_copies(folder: Path, copies: int) -> int:
    from newstune.config import DataConfig
    from newstune.data.registry import load_dataset

    texts = load_dataset(DataConfig(name="ag_news", dir=SHARED_DATA / "ag_news")).splits["test"].texts
    folder.mkdir()
    for copy in range(copies):
        with (folder / f"ag_test_{copy:02d}.jsonl").open("w") as handle:
            handle.writelines(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts))
    return len(texts) * copies


def labels_of(paths: list[Path]) -> list[tuple[str, int, str]]:
    out = []
    for path in paths:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out.append((Path(row.get("source_file", path.name)).name.split(".")[0], int(row["line"]),
                        row["predicted_label"]))
    return sorted(out)


def scoring_rows(run_dir: Path, tmp: Path, copies: int, shard_rows: int, backend: str) -> list[dict]:
    from newstune.inference.predict import predict_file
    from newstune.inference.ray_predict import predict_files
    from newstune.rundir.run import load_run

    n = write_copies(tmp / "in", copies)
    inputs = sorted((tmp / "in").glob("*.jsonl"))
    (tmp / "local").mkdir()
    start = time.perf_counter()
    loaded = load_run(run_dir, backend=backend)
    for path in inputs:
        predict_file(loaded, path, tmp / "local" / path.name)
    local_s = time.perf_counter() - start
    start = time.perf_counter()
    counts = predict_files(run_dir, str(tmp / "in" / "*.jsonl"), tmp / "ray", workers=2, shard_rows=shard_rows,
                           backend=backend)
    ray_s = time.perf_counter() - start
    assert counts["rows"] == n, counts
    same = labels_of(sorted((tmp / "local").glob("*.jsonl"))) == labels_of(sorted((tmp / "ray").glob("*.part-*")))
    return [{"what": f"local predict, 1 process, backend {loaded.backend}", "texts": n, "seconds": local_s,
             "texts_per_s": n / local_s},
            {"what": f"predict --engine ray, 2 actors x 1 thread, shards of {shard_rows} rows", "texts": n,
             "seconds": ray_s, "texts_per_s": n / ray_s, "ratio_vs_local": local_s / ray_s,
             "same_labels": same}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="run to score with (default: the 1-worker training run)")
    parser.add_argument("--copies", type=int, default=7, help="AG News test copies (7 x 7,600 = 53,200 texts)")
    parser.add_argument("--shard-rows", type=int, default=2048)
    parser.add_argument("--train-rows", type=int, default=4000)
    parser.add_argument("--eval-rows", type=int, default=2000)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench_results"))
    args = parser.parse_args()
    facts = {**machine(), **cpu_facts()}
    print(json.dumps(facts), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trained = [] if args.skip_train else train_rows(tmp, args.train_rows, args.eval_rows)
        run_dir = args.run or Path(trained[0]["run_dir"])
        scored = scoring_rows(run_dir, tmp, args.copies, args.shard_rows, args.backend)
    table = (f"CPU: {facts['cpu_model']}, avx512_bf16: {facts['avx512_bf16']}, {facts['cores']} cores\n\n"
             + (markdown_table(trained, [("what", "training"), ("precision", "precision"),
                                         ("optimizer_steps", "steps"), ("accuracy", "test accuracy"),
                                         ("macro_f1", "macro-F1"), ("n_test", "test n"), ("train_s", "train s"),
                                         ("samples_per_s", "samples/s"), ("wall_s", "wall s")]) + "\n\n"
                if trained else "")
             + markdown_table(scored, [("what", "scoring"), ("texts", "texts"), ("seconds", "seconds"),
                                       ("texts_per_s", "texts/s"), ("ratio_vs_local", "vs local"),
                                       ("same_labels", "same labels")]))
    write_results(args.out, "ray_scaling", {"machine": facts, "train": trained, "scoring": scored}, table)


if __name__ == "__main__":
    main()
