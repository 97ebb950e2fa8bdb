"""Time to accuracy on AG News: training minutes until test accuracy first reaches 90%, 91% and 92%.

    python benchmarks/time_to_accuracy.py --model minilm      # ~65 minutes on 2 Zen 4 cores
    python benchmarks/time_to_accuracy.py --model mpnet       # newstune models install mpnet first

Contenders, each in its own process, one after another, on all AG News training rows:
- hf-expert: Trainer + PEFT with the newstune recipe's hyperparameters (LoRA rank, alpha, dropout and target
  modules, lr, epochs, batch size, linear schedule and warmup, weight decay, gradient clipping), dynamic padding and
  group_by_length, seeded before the head and the LoRA matrices are created;
- newstune: `recipes/ag_news/<model>_lora.yaml` as it stands (identical work);
- newstune-fastest: `recipes/ag_news/<model>_lora_cached.yaml` (LoRA in the top layers, the frozen lower layers
  cached: different work, labelled so).
Early stopping is off for all, so each trains its epochs. Every contender scores the same stratified subset of the
test split (--curve-rows) after every 1/--evals-per-epoch of an epoch, and its clock stops while it evaluates:
minutes are wall time from raw texts to that point, model loading, tokenization and setup included, evaluation
excluded. Precision: the machine's native one (`precision: auto`) for every contender, printed with the CPU. One
seed: the test rows of the curve decide nothing (no contender selects on them); --seed changes it.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED_DATA, cpu_line, empty_token_cache, machine, markdown_table, write_results  # noqa: E402

from newstune.training.train import peak_rss_mb, resolve_precision  # noqa: E402

CONTENDERS = ["hf-expert", "newstune", "newstune-fastest"]
THRESHOLDS = (0.90, 0.91, 0.92)


def recipe(model: str, contender: str, curve_rows: int, seed: int, train_rows: int | None = None) -> dict:
    """The recipe a contender trains (hf-expert copies newstune's), with the curve's evaluation settings."""
    name = f"{model}_lora_cached" if contender == "newstune-fastest" else f"{model}_lora"
    config = yaml.safe_load((ROOT / "recipes" / "ag_news" / f"{name}.yaml").read_text())
    config["data"].update({"dir": str(SHARED_DATA / "ag_news"), "max_eval_rows": curve_rows,
                           "max_train_rows": train_rows})
    config["train"].update({"early_stopping_patience": None, "seed": seed, "eval_every_steps": None})
    config["eval"] = {**config.get("eval", {}), "test_curve": True, "latency_samples": 0, "calibration": "none",
                      "tune_threshold": False}
    config["name"] = f"time_to_accuracy_{name}"
    return config


def steps_between_evaluations(steps_per_epoch: int, evals_per_epoch: int) -> int:
    return max(1, steps_per_epoch // evals_per_epoch)


# ---------------------------------------------------------------- contenders (each runs in a subprocess)


def run_newstune(config: dict, evals_per_epoch: int, out: Path) -> list[dict]:
    from newstune.config import validate
    from newstune.rundir.run import create_run_dir, write_run_header
    from newstune.training.train import Trainer, logging_to

    trainer = Trainer(validate(config), None)
    trainer.setup()
    trainer.config.train.eval_every_steps = steps_between_evaluations(trainer.steps_per_epoch, evals_per_epoch)
    trainer.run_dir = create_run_dir(out / "newstune")
    write_run_header(trainer.run_dir, trainer.config, trainer.label_names)
    # the loop's clock already holds the frozen-layer cache build; setup() records the rest of its time
    setup_seconds = trainer.setup_seconds
    with logging_to(trainer.run_dir):
        trainer.fit()
    return [{"step": r["step"], "minutes": (setup_seconds + r["train_seconds"]) / 60, "accuracy": r["accuracy"]}
            for r in trainer.state.history if r["kind"] == "test"]


def run_hf(config: dict, evals_per_epoch: int, out: Path, precision: str) -> list[dict]:
    import numpy as np
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from newstune.config import validate
    from newstune.data.registry import load_dataset
    from newstune.modeling.model import target_modules
    from newstune.modeling.weights import resolve_model_path

    settings = validate(config)
    train_cfg, lora = settings.train, settings.lora
    start = time.perf_counter()
    bundle = load_dataset(settings.data, train_cfg.seed)  # the same rows, curve subset included, as newstune's
    model_path = resolve_model_path(settings.model.name)
    set_seed(train_cfg.seed)  # before the head and the LoRA matrices are created, as newstune does
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(bundle.label_names))
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=lora.r, lora_alpha=lora.alpha,
                                             lora_dropout=lora.dropout, target_modules=target_modules(model, lora)))

    def encode(split: str) -> Dataset:
        part = bundle.splits[split]
        data = Dataset.from_dict({"text": part.texts, "label": part.labels})
        return data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=settings.data.max_length),
                        batched=True, remove_columns=["text"])

    train, test = encode("train"), encode("test")
    steps_per_epoch = -(-len(train) // train_cfg.batch_size)
    total_steps = max(1, math.ceil(train_cfg.epochs * steps_per_epoch))  # newstune's count, for the same warmup
    curve: list[dict] = []

    class TimedTrainer(Trainer):
        """Stops the training clock while it evaluates, and logs each point of the curve."""

        evaluation_seconds = 0.0

        def evaluate(self, *args, **kwargs):
            begun = time.perf_counter()
            scores = super().evaluate(*args, **kwargs)
            curve.append({"step": self.state.global_step, "accuracy": scores["eval_accuracy"],
                          "minutes": (begun - start - self.evaluation_seconds) / 60})
            self.evaluation_seconds += time.perf_counter() - begun
            return scores

    args = TrainingArguments(
        output_dir=str(out / "hf"), per_device_train_batch_size=train_cfg.batch_size, per_device_eval_batch_size=64,
        learning_rate=train_cfg.lr, weight_decay=train_cfg.weight_decay, lr_scheduler_type=train_cfg.scheduler,
        warmup_steps=int(train_cfg.warmup_ratio * total_steps), max_grad_norm=train_cfg.max_grad_norm,
        num_train_epochs=train_cfg.epochs,
        bf16=precision == "bf16", use_cpu=True, save_strategy="no", report_to=[], logging_steps=50,
        seed=train_cfg.seed, dataloader_num_workers=0, train_sampling_strategy="group_by_length",
        eval_strategy="steps", eval_steps=steps_between_evaluations(steps_per_epoch, evals_per_epoch))
    trainer = TimedTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=test,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=lambda p: {"accuracy": float((np.asarray(p.predictions).argmax(1) == p.label_ids).mean())})
    trainer.train()
    if not curve or curve[-1]["step"] != trainer.state.global_step:
        trainer.evaluate()
    return curve


def contender_main(args: argparse.Namespace) -> None:
    precision = resolve_precision("auto", "cpu")
    config = recipe(args.model, args.contender, args.curve_rows, args.seed, args.train_rows)
    with tempfile.TemporaryDirectory() as tmp:
        empty_token_cache(Path(tmp) / "cache")
        if args.contender == "hf-expert":
            curve = run_hf(config, args.evals_per_epoch, Path(tmp), precision)
        else:
            config["train"]["precision"] = precision
            curve = run_newstune(config, args.evals_per_epoch, Path(tmp))
    Path(args.result).write_text(json.dumps({"curve": curve, "peak_rss_mb": peak_rss_mb(), "precision": precision}))


# ---------------------------------------------------------------- the driver


def minutes_to(curve: list[dict], threshold: float) -> float | None:
    return next((point["minutes"] for point in curve if point["accuracy"] >= threshold), None)


def summary_row(contender: str, curve: list[dict]) -> dict:
    best = max(curve, key=lambda point: point["accuracy"])
    row = {"contender": contender,
           "work": "different: lower layers cached" if contender == "newstune-fastest" else "identical"}
    for threshold in THRESHOLDS:
        reached = minutes_to(curve, threshold)
        row[f"to_{threshold:.0%}"] = f"{reached:.1f}" if reached is not None else "not reached"
    row.update({"best": f"{best['accuracy']:.4f} at {best['minutes']:.1f} min",
                "final": f"{curve[-1]['accuracy']:.4f}", "train_minutes": curve[-1]["minutes"]})
    return row


def plot(curves: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for contender, curve in curves.items():
        ax.plot([p["minutes"] for p in curve], [p["accuracy"] for p in curve], marker="o", label=contender)
    for threshold in THRESHOLDS:
        ax.axhline(threshold, color="grey", linewidth=0.5, linestyle=":")
    ax.set(xlabel="training minutes (evaluation excluded)", ylabel="test accuracy (curve subset)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def driver_main(args: argparse.Namespace) -> None:
    curves, extra = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, contender in enumerate(args.contenders):
            result_file = Path(tmp) / f"{contender}.json"
            print(f"[{i + 1}/{len(args.contenders)}] {contender}", flush=True)
            subprocess.run([sys.executable, __file__, "--model", args.model, "--contender", contender,
                            "--curve-rows", str(args.curve_rows), "--evals-per-epoch", str(args.evals_per_epoch),
                            "--seed", str(args.seed), "--result", str(result_file),
                            *(["--train-rows", str(args.train_rows)] if args.train_rows else [])], check=True)
            result = json.loads(result_file.read_text())
            curves[contender], extra[contender] = result["curve"], result
    precision = extra[args.contenders[0]]["precision"]
    rows = [summary_row(contender, curve) for contender, curve in curves.items()]
    columns = [("contender", "contender"), ("work", "work"),
               *[(f"to_{t:.0%}", f"minutes to {t:.0%}") for t in THRESHOLDS],
               ("best", "best"), ("final", "final accuracy"), ("train_minutes", "training minutes")]
    table = markdown_table(rows, columns)
    table += (f"\n\n{cpu_line()}; every contender in {precision}; AG News {args.model}, test accuracy on "
              f"{args.curve_rows} stratified test rows every 1/{args.evals_per_epoch} epoch; seed {args.seed}")
    out = Path(args.out)
    write_results(out, f"time_to_accuracy_{args.model}", {"machine": machine(), "cpu": cpu_line(),
                  "precision": precision, "curves": curves, "rows": rows, "args": vars(args)}, table)
    plot(curves, out / f"time_to_accuracy_{args.model}.png", f"AG News, {args.model}: time to accuracy")
    print(cpu_line())
    print(f"precision: {precision}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["minilm", "mpnet"], default="minilm")
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=CONTENDERS)
    parser.add_argument("--curve-rows", type=int, default=2000, help="stratified test rows scored at each point")
    parser.add_argument("--evals-per-epoch", type=int, default=7)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--train-rows", type=int, default=None, help="stratified training subset (default: all)")
    parser.add_argument("--out", default="bench_results")
    parser.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        contender_main(args)
    else:
        driver_main(args)


if __name__ == "__main__":
    main()
