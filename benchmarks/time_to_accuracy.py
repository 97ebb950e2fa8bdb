"""Time to accuracy on AG News: training minutes until the validation-selected model's test accuracy first reaches
the target (MiniLM 92%, MPNet 93%; also 90% and 91%), over several seeds, newstune against an expert HF Trainer.

    python benchmarks/time_to_accuracy.py --model minilm      # 3 seeds x 3 contenders, ~1.5 hours on 2 Zen 4 cores
    python benchmarks/time_to_accuracy.py --model mpnet       # newstune models install mpnet first
    python benchmarks/time_to_accuracy.py --model minilm --contenders hf-expert newstune --target 0.91

Prints `time_to_target_vs_hf_expert: N.NNx` (HF-expert's mean minutes over the fastest newstune contender's, both
over the seeds; "not reached" when a contender misses the target in any seed) and one such line per contender.

Contenders, each in its own process, one after another, on all AG News training rows:
- hf-expert: the Trainer (+ PEFT when the recipe uses LoRA) with the newstune recipe's hyperparameters (method,
  LoRA rank, alpha, dropout and target modules, lr, epochs, batch size, schedule and warmup, weight decay, gradient
  clipping), bf16 where native, SDPA attention, fused AdamW, dynamic padding and group_by_length, seeded before the
  head and the LoRA matrices are created (layer-wise lr decay is newstune's: the Trainer has no such flag);
- newstune: `recipes/ag_news/<model>_lora.yaml` as it stands (identical work, except where the recipe sets
  `train.attention_dropout: context`, as the MiniLM one does since 2026-12-07: another regulariser, printed);
- newstune-fastest: `recipes/ag_news/<model>_lora_cached.yaml` (LoRA in the top layers, the frozen lower layers
  cached: different work, labelled so).
Early stopping is off for all, so each trains its epochs. Every contender scores the same stratified subsets of the
validation and test splits (--curve-rows each) after every 1/--evals-per-epoch of an epoch, and its clock stops
while it evaluates: minutes are wall time from raw texts to that point, model loading, tokenization and setup
included, evaluation excluded. At each point the curve's accuracy is the test accuracy of the point with the best
validation score so far (the recipe's metric): what a user who keeps the best checkpoint would ship; test decides
nothing. Precision: the machine's native one (`precision: auto`) for every contender, printed with the CPU. Seeds
run in rounds A B C / C B A so that drift on the machine hits every contender alike.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
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
TARGETS = {"minilm": 0.92, "mpnet": 0.93}


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
    metric = trainer.config.train.metric
    validation = {r["step"]: r[metric] for r in trainer.state.history if r["kind"] == "eval"}
    return [{"step": r["step"], "minutes": (setup_seconds + r["train_seconds"]) / 60, "accuracy": r["accuracy"],
             "validation": validation[r["step"]] * (-1 if metric == "loss" else 1)}
            for r in trainer.state.history if r["kind"] == "test"]


def run_hf(config: dict, evals_per_epoch: int, out: Path, precision: str) -> list[dict]:
    import numpy as np
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from sklearn.metrics import f1_score
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
    # transformers' default attention, as newstune's `model.attn_implementation: auto`: SDPA where the architecture
    # has it (BERT, RoBERTa), eager where it has nothing else (MPNet refuses attn_implementation="sdpa")
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(bundle.label_names))
    if lora.method != "full":
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=lora.r, lora_alpha=lora.alpha,
                                                 lora_dropout=lora.dropout,
                                                 target_modules=target_modules(model, lora)))

    def encode(split: str) -> Dataset:
        part = bundle.splits[split]
        data = Dataset.from_dict({"text": part.texts, "label": part.labels})
        return data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=settings.data.max_length),
                        batched=True, remove_columns=["text"])

    train, validation, test = encode("train"), encode("validation"), encode("test")
    metric = train_cfg.metric
    steps_per_epoch = -(-len(train) // train_cfg.batch_size)
    total_steps = max(1, math.ceil(train_cfg.epochs * steps_per_epoch))  # newstune's count, for the same warmup
    curve: list[dict] = []

    class TimedTrainer(Trainer):
        """Stops the training clock while it evaluates, and logs each point of the curve (validation, then test)."""

        evaluation_seconds = 0.0

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            begun = time.perf_counter()
            scores = {}
            for name, data in (("validation", validation), ("test", test)):
                scores |= super().evaluate(data, ignore_keys, f"{metric_key_prefix}_{name}")
            chosen = -scores["eval_validation_loss"] if metric == "loss" else scores[f"eval_validation_{metric}"]
            curve.append({"step": self.state.global_step, "accuracy": scores["eval_test_accuracy"],
                          "validation": chosen, "minutes": (begun - start - self.evaluation_seconds) / 60})
            self.evaluation_seconds += time.perf_counter() - begun
            return scores

    args = TrainingArguments(
        output_dir=str(out / "hf"), per_device_train_batch_size=train_cfg.batch_size, per_device_eval_batch_size=64,
        learning_rate=train_cfg.lr, weight_decay=train_cfg.weight_decay, lr_scheduler_type=train_cfg.scheduler,
        warmup_steps=int(train_cfg.warmup_ratio * total_steps), max_grad_norm=train_cfg.max_grad_norm,
        num_train_epochs=train_cfg.epochs,
        bf16=precision == "bf16", use_cpu=True, save_strategy="no", report_to=[], logging_steps=50,
        optim="adamw_torch_fused",
        seed=train_cfg.seed, dataloader_num_workers=0, train_sampling_strategy="group_by_length",
        eval_strategy="steps", eval_steps=steps_between_evaluations(steps_per_epoch, evals_per_epoch))
    def scores(p) -> dict:
        predicted = np.asarray(p.predictions).argmax(1)
        return {"accuracy": float((predicted == p.label_ids).mean()),
                "macro_f1": float(f1_score(p.label_ids, predicted, average="macro"))}

    trainer = TimedTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=validation,
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=scores)
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


def selected(curve: list[dict]) -> list[dict]:
    """Each point's accuracy replaced by the test accuracy of the best validation point so far (ties: the earlier)."""
    best, out = None, []
    for point in curve:
        if best is None or point["validation"] > best["validation"]:
            best = point
        out.append({**point, "accuracy": best["accuracy"]})
    return out


def minutes_to(curve: list[dict], threshold: float) -> float | None:
    return next((point["minutes"] for point in curve if point["accuracy"] >= threshold), None)


def mean_minutes(curves: list[list[dict]], threshold: float) -> tuple[float | None, float, int]:
    """Mean and std of the minutes to the threshold over seeds, and in how many seeds it was reached; the mean is
    None unless every seed reached it (a mean over the lucky seeds would flatter)."""
    reached = [m for m in (minutes_to(c, threshold) for c in curves) if m is not None]
    if len(reached) < len(curves):
        return None, 0.0, len(reached)
    return statistics.mean(reached), statistics.stdev(reached) if len(reached) > 1 else 0.0, len(reached)


def summary_row(contender: str, curves: list[list[dict]], thresholds: list[float], model: str) -> dict:
    finals = [c[-1]["accuracy"] for c in curves]
    where = recipe(model, contender, 0, 0)["train"].get("attention_dropout", "probabilities")
    dropout = "" if where == "probabilities" else f" (attention dropout on the {where}: another regulariser)"
    work = {"hf-expert": "same model and hyperparameters, no layer-wise lr decay (no Trainer flag for it)",
            "newstune": f"the recipe as it stands{dropout}",
            "newstune-fastest": f"different: lower layers cached{dropout}"}
    row = {"contender": contender, "work": work[contender]}
    for threshold in thresholds:
        mean, std, n = mean_minutes(curves, threshold)
        row[f"to_{threshold:.1%}"] = (f"{mean:.2f} ± {std:.2f}" if mean is not None
                                      else f"not reached ({n}/{len(curves)} seeds)")
    row.update({"final": f"{statistics.mean(finals):.4f} ± {statistics.stdev(finals) if len(finals) > 1 else 0:.4f}",
                "train_minutes": statistics.mean(c[-1]["minutes"] for c in curves)})
    return row


def ratio_lines(curves: dict[str, list[list[dict]]], target: float) -> dict[str, str]:
    """time_to_target_vs_hf_expert (the fastest newstune contender) and one line per newstune contender."""
    expert, _, _ = mean_minutes(curves["hf-expert"], target) if "hf-expert" in curves else (None, 0, 0)
    lines, best = {}, None
    for contender, runs in curves.items():
        if contender == "hf-expert":
            continue
        mine, _, _ = mean_minutes(runs, target)
        key = f"time_to_target_{contender.replace('-', '_')}_vs_hf_expert"
        lines[key] = f"{expert / mine:.2f}x" if expert and mine else "not reached"
        if mine is not None and (best is None or mine < best):
            best = mine
    lines["time_to_target_vs_hf_expert"] = f"{expert / best:.2f}x" if expert and best else "not reached"
    return lines


def plot(curves: dict[str, list[list[dict]]], thresholds: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (contender, runs) in enumerate(curves.items()):
        for j, curve in enumerate(runs):
            ax.plot([p["minutes"] for p in curve], [p["accuracy"] for p in curve], marker="o", markersize=3,
                    color=f"C{i}", alpha=0.8, label=contender if j == 0 else None)
    for threshold in thresholds:
        ax.axhline(threshold, color="grey", linewidth=0.5, linestyle=":")
    ax.set(xlabel="training minutes (evaluation excluded)",
           ylabel="test accuracy of the best-validation point so far", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def driver_main(args: argparse.Namespace) -> None:
    target = args.target or TARGETS[args.model]
    thresholds = sorted({*THRESHOLDS, target})
    curves: dict[str, list[list[dict]]] = {c: [] for c in args.contenders}
    precision = None
    order = [(c, seed) for i, seed in enumerate(args.seeds)
             for c in (args.contenders if i % 2 == 0 else args.contenders[::-1])]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (contender, seed) in enumerate(order):
            result_file = Path(tmp) / f"{contender}_{seed}.json"
            print(f"[{i + 1}/{len(order)}] {contender} seed {seed}", flush=True)
            subprocess.run([sys.executable, __file__, "--model", args.model, "--contender", contender,
                            "--curve-rows", str(args.curve_rows), "--evals-per-epoch", str(args.evals_per_epoch),
                            "--seed", str(seed), "--result", str(result_file),
                            *(["--train-rows", str(args.train_rows)] if args.train_rows else [])], check=True)
            result = json.loads(result_file.read_text())
            curves[contender].append(selected(result["curve"]))
            precision = result["precision"]
    rows = [summary_row(contender, runs, thresholds, args.model) for contender, runs in curves.items()]
    columns = [("contender", "contender"), ("work", "work"),
               *[(f"to_{t:.1%}", f"minutes to {t:.1%}") for t in thresholds],
               ("final", "final accuracy"), ("train_minutes", "training minutes")]
    table = markdown_table(rows, columns)
    ratios = ratio_lines(curves, target)
    table += "\n\n" + " | ".join(f"{k}: {v}" for k, v in ratios.items())
    table += (f"\n\n{cpu_line()}; every contender in {precision}; AG News {args.model}"
              f"{f', {args.train_rows} training rows' if args.train_rows else ''}; minutes are mean ± std over seeds "
              f"{', '.join(map(str, args.seeds))}; accuracy is the test accuracy of the best validation point so far, "
              f"on {args.curve_rows} stratified validation and test rows, every 1/{args.evals_per_epoch} epoch")
    out = Path(args.out)
    write_results(out, f"time_to_accuracy_{args.model}", {"machine": machine(), "cpu": cpu_line(),
                  "precision": precision, "target": target, "curves": curves, "rows": rows, "ratios": ratios,
                  "args": vars(args)}, table)
    plot(curves, thresholds, out / f"time_to_accuracy_{args.model}.png", f"AG News, {args.model}: time to accuracy")
    print(cpu_line())
    print(f"precision: {precision}")
    print(f"target: {target:.1%}")
    for key, value in ratios.items():
        print(f"{key}: {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["minilm", "mpnet"], default="minilm")
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=CONTENDERS)
    parser.add_argument("--curve-rows", type=int, default=2000, help="stratified test rows scored at each point")
    parser.add_argument("--evals-per-epoch", type=int, default=7)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="one round per seed")
    parser.add_argument("--target", type=float, default=None, help="default: MiniLM 0.92, MPNet 0.93")
    parser.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
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
