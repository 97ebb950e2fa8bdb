"""Does augmentation help? AG News (MiniLM + LoRA) on a small real subset, without / with EDA, evaluated
in-distribution (AG test) and out-of-distribution (HuffPost rows mapped onto the AG classes). Same seeds.

    python benchmarks/augment_ood.py --rows 2000 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, machine, markdown_table, write_results  # noqa: E402

RECIPE = "recipes/ag_news/minilm_lora_ood_huffpost.yaml"
VARIANTS = {
    "none": [],
    "eda_x1": ["data.augment.eda=true", "data.augment.eda_copies=1"],
    "eda_x2": ["data.augment.eda=true", "data.augment.eda_copies=2"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--runs", default="runs/augment_ood")
    parser.add_argument("--out", default="bench_results")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    args = parser.parse_args()
    wordnet = SHARED_DATA / "wordnet" / "nltk_data"
    rows = []
    for name in args.variants.split(","):
        overrides = VARIANTS[name]
        run_dir = Path(args.runs) / name
        if not (run_dir / "metrics.json").is_file():
            command = ["newstune", "train", RECIPE, "--output-dir", str(run_dir),
                       "--set", f"data.max_train_rows={args.rows}", "--set", f"train.epochs={args.epochs}",
                       "--set", f"data.augment.wordnet_dir={wordnet}",
                       *(a for o in overrides for a in ("--set", o))]
            print(" ".join(command), flush=True)
            subprocess.run(command, check=True)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        rows.append({"variant": name, "train_rows": sum(metrics["data"]["train_origins"].values()),
                     "augmented_rows": sum(v for k, v in metrics["data"]["train_origins"].items() if k != "original"),
                     "id_accuracy": metrics["test"]["accuracy"], "id_macro_f1": metrics["test"]["macro_f1"],
                     "ood_accuracy": metrics["extra:huffpost_ood"]["accuracy"],
                     "ood_macro_f1": metrics["extra:huffpost_ood"]["macro_f1"],
                     "epoch_s": metrics["efficiency"]["epoch_seconds_mean"]})
    table = markdown_table(rows, [("variant", "variant"), ("train_rows", "train rows"),
                                  ("augmented_rows", "of which augmented"), ("id_accuracy", "AG test acc"),
                                  ("id_macro_f1", "AG test macro-F1"), ("ood_accuracy", "HuffPost OOD acc"),
                                  ("ood_macro_f1", "HuffPost OOD macro-F1"), ("epoch_s", "epoch s")])
    write_results(Path(args.out), "augment_ood", {"machine": machine(), "args": vars(args), "rows": rows}, table)


if __name__ == "__main__":
    main()
