"""Batch prediction: newstune vs transformers.pipeline("text-classification") on the same merged model and the
same AG News test texts, in one run. Reports samples/s, the ratio, and how often the predictions agree.

    python benchmarks/predict_speed.py runs/ag_news_minilm_lora
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, machine, markdown_table, write_results  # noqa: E402


def main() -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from newstune.config import DataConfig
    from newstune.data.registry import load_dataset
    from newstune.export import export_merged
    from newstune.infer import predict_logits
    from newstune.train import resolve_precision

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--rows", type=int, default=None, help="test rows (default all 7,600)")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    texts = load_dataset(DataConfig(name="ag_news", dir=SHARED_DATA / "ag_news")).splits["test"].texts
    texts = texts[: args.rows] if args.rows else texts
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        export_merged(args.run, Path(tmp) / "merged")
        tokenizer = AutoTokenizer.from_pretrained(Path(tmp) / "merged")
        model = AutoModelForSequenceClassification.from_pretrained(Path(tmp) / "merged").eval()
        for batch_size in (1, 64):
            classifier = pipeline("text-classification", model=model, tokenizer=tokenizer, device="cpu",
                                  truncation=True, max_length=128)
            start = time.perf_counter()
            outputs = classifier(texts, batch_size=batch_size)
            seconds = time.perf_counter() - start
            labels = [model.config.label2id[o["label"]] for o in outputs]
            rows.append({"contender": f"HF pipeline, batch_size={batch_size}, fp32", "seconds": seconds,
                         "samples_per_s": len(texts) / seconds, "labels": labels})
        precision = resolve_precision("auto", "cpu")
        start = time.perf_counter()
        ids = tokenizer(texts, truncation=True, max_length=128)["input_ids"]
        logits = predict_logits(model, ids, tokenizer.pad_token_id, 64, precision)
        seconds = time.perf_counter() - start
        rows.append({"contender": f"newstune predict ({precision}, length-sorted batches of 64)",
                     "seconds": seconds, "samples_per_s": len(texts) / seconds,
                     "labels": logits.argmax(1).tolist()})
        with torch.inference_mode():
            fp32 = predict_logits(model, ids, tokenizer.pad_token_id, 64, "fp32").argmax(1).numpy()
    reference = np.asarray(rows[1]["labels"])
    for row in rows:
        row["agreement_with_pipeline_b64"] = float((np.asarray(row.pop("labels")) == reference).mean())
        row["speedup_vs_pipeline_b1"] = row["samples_per_s"] / rows[0]["samples_per_s"]
        row["speedup_vs_pipeline_b64"] = row["samples_per_s"] / rows[1]["samples_per_s"]
    fp32_agreement = float((fp32 == reference).mean())
    table = markdown_table(rows, [("contender", "contender"), ("seconds", "seconds"),
                                  ("samples_per_s", "samples/s"), ("speedup_vs_pipeline_b1", "x pipeline b=1"),
                                  ("speedup_vs_pipeline_b64", "x pipeline b=64"),
                                  ("agreement_with_pipeline_b64", "same label as pipeline")])
    table += (f"\n\n{len(texts):,} AG News test texts. newstune in fp32 agrees with the pipeline on "
              f"{fp32_agreement:.2%}.")
    write_results(Path(args.out), "predict_speed", {"machine": machine(), "rows": rows, "texts": len(texts),
                                                     "fp32_agreement": fp32_agreement}, table)


if __name__ == "__main__":
    main()
