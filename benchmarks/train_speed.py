"""newstune vs Hugging Face Trainer + PEFT on identical LoRA work, alternating contenders in one run.

    python benchmarks/train_speed.py --mode quick     # MiniLM, 2,000 AG News rows, 5 seeds, ~25 minutes on 2 cores
    python benchmarks/train_speed.py --mode full      # MPNet-base, 1,000 rows (newstune models install mpnet)
    python benchmarks/train_speed.py --ablation       # hf-expert, newstune, and newstune with one change off per row

Contenders: hf-seed (the Trainer as a notebook uses it: pad to max_length, random batches), hf-expert (the flags an
expert sets on a CPU: bf16 where native, SDPA attention, dynamic padding, group_by_length, fused AdamW), newstune
(the same model and result; its last layer computes token 0 only, so fewer FLOPs), and newstune-cached (LoRA only in
the top layers with the frozen lower layers cached: different work, reported beside the others). Each trains in its
own subprocess (so peak RSS is its own, and newstune's tokenization cache starts empty), in rounds A B C D / D C B
A; round i seeds every contender with 42 + i *before* its model is created (HF's LoRA and head initialisation
included).

The same timing boundary for every contender: wall time from raw texts to a trained model in memory -- tokenizer and
model loading, tokenization, LoRA wrapping, trainer/optimizer setup, the training loop and one checkpoint per epoch
included; evaluation excluded (timed apart). The same precision for every contender: the machine's native one
(`precision: auto` -- bf16 on CPUs with avx512_bf16/AMX, fp32 otherwise), printed with the CPU.
With --ablation the contenders are hf-expert, newstune, and one newstune row per optimisation with only that
optimisation switched off (length-grouped batches, fast dropout masks, bf16-held frozen weights, the last layer run
for token 0 only, fused AdamW): what each change contributes is newstune's tokens/s over that row's; and one row with
torch.compile switched on, one with attention dropout on the context (`train.attention_dropout: context`: CPU SDPA's
fused kernel, trained in fp32; another regulariser, set by the AG News main recipe), one with LayerNorm returning bf16
(`train.bf16_norm_output`), one with both; a speed-up > 1 there would make the change worth its accuracy check.
Every contender runs with the same torch thread count (newstune's default: one per physical core), recorded per row;
padding is measured the same way for all: the tensor widths of the batches each one actually trains on. The table
labels each row "same FLOPs", "same result, fewer FLOPs" (the first-token last layer) or different work; the
CPU flags (AMX included) and the ISA and kernel oneDNN dispatched for the run's precision are printed.
Reports median wall time, non-padding tokens/s, samples/s, peak RSS, accuracy/macro-F1 as mean and standard deviation
over the seeds, eval samples/s, and MFU = analytic FLOPs / the matmul peak measured in the same run and precision.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import (  # noqa: E402
    SHARED_DATA,
    cpu_line,
    empty_token_cache,
    machine,
    markdown_table,
    onednn_isa,
    write_results,
)

from newstune.training.profile import analytic_train_flops, matmul_peak_tflops  # noqa: E402
from newstune.training.train import peak_rss_mb, physical_cores, resolve_precision  # noqa: E402

MODES = {"quick": {"model": "minilm", "rows": 2000, "eval_rows": 1000, "top_layers": 2},
         "full": {"model": "mpnet", "rows": 1000, "eval_rows": 500, "top_layers": 4}}
LORA = {"r": 4, "alpha": 16, "dropout": 0.1, "targets": "qv"}
CONTENDERS = ["hf-seed", "hf-expert", "newstune", "newstune-cached"]
# One row per newstune optimisation: newstune's defaults with only that one switched off (train settings).
ABLATIONS = {"newstune-no-length-groups": {"group_by_length": False},
             "newstune-no-fast-dropout": {"fast_dropout": False},
             "newstune-no-bf16-weights": {"bf16_frozen_weights": False},
             "newstune-no-first-token": {"first_token_last_layer": False},
             "newstune-no-fused-adamw": {"fused_adamw": False}}
# Rows with one more change switched on: torch.compile (LayerNorm/GELU/residual fusion by Inductor), re-measured on
# whichever CPU runs the ablation.
ADDITIONS = {"newstune-compiled": {"compile": True}, "newstune-bf16-norm": {"bf16_norm_output": True},
             "newstune-context-dropout": {"attention_dropout": "context"},
             "newstune-context-dropout-bf16-norm": {"attention_dropout": "context", "bf16_norm_output": True}}
HYPER = {"lr": 2e-4, "batch_size": 16, "epochs": 1, "weight_decay": 0.01, "seed": 42, "max_length": 128}


def load_rows(rows: int, eval_rows: int):
    from newstune.config import DataConfig
    from newstune.data.registry import load_dataset

    bundle = load_dataset(DataConfig(name="ag_news", dir=SHARED_DATA / "ag_news", max_train_rows=rows,
                                     max_eval_rows=eval_rows))
    return bundle


# ---------------------------------------------------------------- contenders (each runs in a subprocess)


def run_hf(expert: bool, model_path: str, bundle, out: Path, seed: int, precision: str) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from newstune.config import LoraSettings
    from newstune.modeling.model import target_modules

    start = time.perf_counter()
    set_seed(seed)  # before the head and the LoRA matrices are created, as newstune does
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # transformers' default attention, as newstune's `model.attn_implementation: auto`: SDPA where the architecture
    # has it (BERT, RoBERTa), eager where it has nothing else (MPNet refuses attn_implementation="sdpa")
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(bundle.label_names))
    targets = target_modules(model, LoraSettings(target_modules="qv"))
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=LORA["r"], lora_alpha=LORA["alpha"],
                                             lora_dropout=LORA["dropout"], target_modules=targets))
    padding = False if expert else "max_length"

    def encode(split):
        part = bundle.splits[split]
        data = Dataset.from_dict({"text": part.texts, "label": part.labels})
        return data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=HYPER["max_length"],
                                            padding=padding), batched=True, remove_columns=["text"])

    train, test = encode("train"), encode("test")
    args = TrainingArguments(
        output_dir=str(out / "hf"), per_device_train_batch_size=HYPER["batch_size"], per_device_eval_batch_size=64,
        learning_rate=HYPER["lr"], weight_decay=HYPER["weight_decay"], lr_scheduler_type="cosine",
        num_train_epochs=HYPER["epochs"], bf16=precision == "bf16", use_cpu=True, save_strategy="epoch",
        save_only_model=True, report_to=[], optim="adamw_torch_fused" if expert else "adamw_torch",
        logging_steps=50, seed=seed, dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if expert else "random")
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                      data_collator=DataCollatorWithPadding(tokenizer) if expert else None)
    trainer.train()
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    prediction = trainer.predict(test)
    eval_seconds = time.perf_counter() - start
    preds = np.asarray(prediction.predictions).argmax(1)
    # With group_by_length the Trainer also length-groups the evaluation set: predictions come back in that
    # order, so score them against prediction.label_ids (same order), not the dataset's label column.
    gold = np.asarray(prediction.label_ids)
    predicted = np.bincount(preds, minlength=len(bundle.label_names)).tolist()
    real_tokens = sum(sum(mask) for mask in train["attention_mask"])
    # the widths of the batches the Trainer forms (its sampler and collator, outside the clock): the padding it
    # computes, measured as newstune's is
    computed = sum(batch["input_ids"].numel() for batch in trainer.get_train_dataloader())
    del torch
    return {"train_seconds": seconds, "tokens": int(real_tokens), "computed_tokens": int(computed),
            "samples": len(train), "accuracy": float(accuracy_score(gold, preds)),
            "macro_f1": float(f1_score(gold, preds, average="macro")),
            "eval_samples_per_s": len(test) / eval_seconds, "lengths": [int(sum(m)) for m in train["attention_mask"]],
            "predicted_counts": predicted, "model_config": model.config.to_dict()}


def run_newstune(model_name: str, bundle, out: Path, seed: int, precision: str, top_layers: int | None = None,
                 switched_off: dict | None = None) -> dict:
    """newstune's defaults; with top_layers, LoRA only there and the frozen lower layers cached (other work);
    switched_off: train settings that undo one optimisation (an ablation row)."""
    from transformers import AutoConfig

    from newstune.config import validate
    from newstune.modeling.model import load_tokenizer
    from newstune.modeling.weights import resolve_model_path
    from newstune.training.train import train

    config = validate({
        "name": "bench", "data": {"name": "ag_news", "max_length": HYPER["max_length"]},
        "model": {"name": model_name},
        "lora": {"method": "lora", "r": LORA["r"], "alpha": LORA["alpha"], "dropout": LORA["dropout"],
                 "target_modules": LORA["targets"], "top_layers": top_layers},
        "train": {"epochs": HYPER["epochs"], "batch_size": HYPER["batch_size"], "lr": HYPER["lr"],
                  "weight_decay": HYPER["weight_decay"], "scheduler": "cosine", "precision": precision,
                  "seed": seed, "eval_every_epoch": False, "warmup_ratio": 0.0,
                  "cache_frozen_layers": top_layers is not None, **(switched_off or {})},
        "eval": {"latency_samples": 0}})
    # the same boundary as run_hf: texts in, trained model out, evaluation apart (train() records it)
    _, metrics = train(config, out / "newstune", bundle=bundle)
    seconds = metrics["efficiency"]["wall_seconds_to_trained"]
    eff = metrics["efficiency"]
    tokenizer = load_tokenizer(resolve_model_path(model_name))
    lengths = [len(ids) for ids in tokenizer(bundle.splits["train"].texts, truncation=True,
                                              max_length=HYPER["max_length"])["input_ids"]]
    return {"train_seconds": seconds, "loop_seconds": eff["train_seconds"], "tokens": sum(lengths),
            "computed_tokens": int(sum(lengths) / max(1 - eff["padding_fraction"], 1e-9)),
            "samples": len(lengths), "accuracy": metrics["test"]["accuracy"], "macro_f1": metrics["test"]["macro_f1"],
            "eval_samples_per_s": eff["eval_samples_per_s"], "lengths": lengths,
            "predicted_counts": [sum(col) for col in zip(*metrics["test"]["confusion_matrix"])],
            "cached_layers": eff.get("cached_layers", 0), "cache_seconds": eff.get("cache_seconds", 0.0),
            "first_token_last_layer": eff.get("first_token_last_layer", False),
            "model_config": AutoConfig.from_pretrained(resolve_model_path(model_name)).to_dict()}


def contender_main(args: argparse.Namespace) -> None:
    from newstune.modeling.weights import resolve_model_path

    mode = MODES[args.mode]
    bundle = load_rows(args.rows or mode["rows"], mode["eval_rows"])
    precision = resolve_precision("auto", "cpu")
    torch.set_num_threads(physical_cores())  # newstune's default, set for every contender (train() sets it again)
    with tempfile.TemporaryDirectory() as tmp:
        empty_token_cache(Path(tmp) / "cache")
        if args.contender.startswith("newstune"):
            top = mode["top_layers"] if args.contender == "newstune-cached" else None
            result = run_newstune(mode["model"], bundle, Path(tmp), args.seed, precision, top,
                                  ABLATIONS.get(args.contender) or ADDITIONS.get(args.contender))
        else:
            result = run_hf(args.contender == "hf-expert", resolve_model_path(mode["model"]), bundle, Path(tmp),
                            args.seed, precision)
    result["peak_rss_mb"] = peak_rss_mb()
    result["threads"] = torch.get_num_threads()
    result["seed"] = args.seed
    result["precision"] = precision
    Path(args.result).write_text(json.dumps(result))


# ---------------------------------------------------------------- the driver


def summarise(name: str, runs: list[dict], peak_tflops: float) -> dict:
    from transformers import AutoConfig

    first = runs[0]
    config = AutoConfig.for_model(**{k: v for k, v in first["model_config"].items()
                                     if k in ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size")})
    seconds = statistics.median(r["train_seconds"] for r in runs)
    flops = analytic_train_flops(config, first["lengths"], cached_layers=first.get("cached_layers", 0),
                                 first_token_last_layer=first.get("first_token_last_layer", False))
    return {"contender": name, "train_seconds": seconds, "tokens_per_s": first["tokens"] / seconds,
            "samples_per_s": first["samples"] / seconds,
            "padding_fraction": 1 - first["tokens"] / max(first["computed_tokens"], 1),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "accuracy": statistics.mean(r["accuracy"] for r in runs),
            "accuracy_std": statistics.stdev(r["accuracy"] for r in runs) if len(runs) > 1 else 0.0,
            "macro_f1": statistics.mean(r["macro_f1"] for r in runs),
            "macro_f1_std": statistics.stdev(r["macro_f1"] for r in runs) if len(runs) > 1 else 0.0,
            "accuracy_by_seed": {r["seed"]: r["accuracy"] for r in runs},
            "predicted_counts": [r["predicted_counts"] for r in runs],
            "eval_samples_per_s": statistics.median(r["eval_samples_per_s"] for r in runs),
            "mfu": flops / seconds / (peak_tflops * 1e12), "repeats": len(runs),
            "threads": "/".join(str(t) for t in sorted({r["threads"] for r in runs})),
            "all_train_seconds": [r["train_seconds"] for r in runs]}


def ablation_contenders(precision: str) -> list[str]:
    """bf16-held weights only exist in bf16: in fp32 that row would repeat newstune's."""
    return ["hf-expert", "newstune", *(name for name in ABLATIONS
                                       if precision == "bf16" or name != "newstune-no-bf16-weights"), *ADDITIONS]


def headline_ratios(by_name: dict[str, dict]) -> dict[str, float]:
    ours, expert = by_name["newstune"], by_name["hf-expert"]
    ratios = {"newstune_vs_hf_expert_tokens": ours["tokens_per_s"] / expert["tokens_per_s"]}
    if "hf-seed" in by_name:
        seed, cached = by_name["hf-seed"], by_name["newstune-cached"]
        ratios |= {"newstune_vs_hf_seed_tokens": ours["tokens_per_s"] / seed["tokens_per_s"],
                   "newstune_vs_hf_expert_rss": ours["peak_rss_mb"] / expert["peak_rss_mb"],
                   "newstune_vs_hf_eval_throughput": ours["eval_samples_per_s"] / expert["eval_samples_per_s"],
                   "newstune_cached_vs_hf_expert_tokens": cached["tokens_per_s"] / expert["tokens_per_s"],
                   "newstune_cached_vs_hf_seed_tokens": cached["tokens_per_s"] / seed["tokens_per_s"]}
    for name in ABLATIONS:
        if name in by_name:  # > 1: the change speeds newstune up by this factor
            ratios[name.removeprefix("newstune-no-").replace("-", "_") + "_speedup"] = (ours["tokens_per_s"]
                                                                      / by_name[name]["tokens_per_s"])
    for name in ADDITIONS:
        if name in by_name:  # > 1: switching it on would speed newstune up by this factor
            ratios[name.removeprefix("newstune-").replace("-", "_") + "_speedup"] = (by_name[name]["tokens_per_s"]
                                                                                     / ours["tokens_per_s"])
    return ratios


def work_label(contender: str) -> str:
    """Same FLOPs as hf-expert, the same result with fewer FLOPs (the first-token last layer), or other work."""
    if contender == "newstune-cached":
        return "different: lower layers cached"
    if contender == "hf-seed":
        return "same model, padded to max_length"
    first_token = contender.startswith("newstune") and contender != "newstune-no-first-token"
    context = ADDITIONS.get(contender, {}).get("attention_dropout") == "context"
    result = "another regulariser (attention dropout on the context)" if context else "same result"
    label = f"{result}, fewer FLOPs" if first_token else "same FLOPs"
    if contender in ABLATIONS:
        label += "; ablation: " + ", ".join(f"{k}={v}" for k, v in ABLATIONS[contender].items())
    if contender in ADDITIONS:
        label += "; added: " + ", ".join(f"{k}={v}" for k, v in ADDITIONS[contender].items())
    return label


def driver_main(args: argparse.Namespace) -> None:
    precision = resolve_precision("auto", "cpu")
    contenders = args.contenders or (ablation_contenders(precision) if args.ablation else CONTENDERS)
    if not {"hf-expert", "newstune"} <= set(contenders):
        raise SystemExit("--contenders must include hf-expert and newstune (the headline ratio)")
    # Round i trains every contender with seed 42 + i: accuracies are means over seeds (one short epoch is noisy).
    order = [(c, HYPER["seed"] + i) for i in range(args.repeats)
             for c in (contenders if i % 2 == 0 else contenders[::-1])]
    peak_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    peak_before = matmul_peak_tflops(peak_dtype)
    results: dict[str, list[dict]] = {c: [] for c in contenders}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (contender, seed) in enumerate(order):
            result_file = Path(tmp) / f"{i}.json"
            command = [sys.executable, __file__, "--mode", args.mode, "--contender", contender, "--seed", str(seed),
                       "--result", str(result_file), *(["--rows", str(args.rows)] if args.rows else [])]
            print(f"[{i + 1}/{len(order)}] {contender} seed {seed}", flush=True)
            subprocess.run(command, check=True)
            results[contender].append(json.loads(result_file.read_text()))
    peak = max(peak_before, matmul_peak_tflops(peak_dtype))
    rows = [summarise(c, results[c], peak) for c in contenders]
    by_name = {r["contender"]: r for r in rows}
    ours, expert = by_name["newstune"], by_name["hf-expert"]
    ratios = headline_ratios(by_name)
    for row in rows:
        row["work"] = work_label(row["contender"])
    table = markdown_table(rows, [("contender", "contender"), ("work", "work"), ("train_seconds", "train s"),
                                  ("tokens_per_s", "tokens/s (non-pad)"), ("samples_per_s", "samples/s"),
                                  ("padding_fraction", "padding"), ("peak_rss_mb", "peak RSS MB"),
                                  ("accuracy", "accuracy (mean)"), ("accuracy_std", "accuracy (std)"),
                                  ("macro_f1", "macro-F1 (mean)"), ("macro_f1_std", "macro-F1 (std)"),
                                  ("eval_samples_per_s", "eval samples/s"), ("mfu", f"MFU ({precision})"),
                                  ("threads", "threads")])
    table += "\n\n" + " | ".join(f"{k}: {v:.2f}x" for k, v in ratios.items())
    isa = onednn_isa(peak_dtype)
    table += f"\n\n{cpu_line()}; oneDNN ({precision}): {isa}; every contender in {precision}; {precision} matmul " \
             f"peak measured in this run: {peak:.2f} TFLOP/s; {args.repeats} seeds"
    spread = max(ours["accuracy_std"], expert["accuracy_std"])
    table += (f"\n\naccuracy newstune {ours['accuracy']:.4f} vs hf-expert {expert['accuracy']:.4f}: "
              f"{'equal' if abs(ours['accuracy'] - expert['accuracy']) <= spread else 'NOT equal'} within one "
              f"spread ({spread:.4f})")
    table += "\n\naccuracy by seed: " + "; ".join(
        f"{r['contender']} " + ", ".join(f"{s}: {a:.3f}" for s, a in r["accuracy_by_seed"].items()) for r in rows)
    name = f"train_speed_{args.mode}" + ("_ablation" if args.ablation else "") + ("_subset" if args.contenders else "")
    write_results(Path(args.out), name, {"machine": machine(), "mode": args.mode,
                  "lora": LORA, "hyper": HYPER, "peak_tflops": peak, "rows": rows, "ratios": ratios,
                  "order": order, "precision": precision, "cpu": cpu_line(), "onednn": isa}, table)
    print(cpu_line())
    print(f"onednn: {isa}")
    print(f"precision: {precision}")
    print(f"matmul_peak_tflops: {peak:.2f}")
    print(f"mfu_newstune: {ours['mfu']:.0%}")
    print(f"mfu_hf_expert: {expert['mfu']:.0%}")
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=list(MODES), default="quick")
    parser.add_argument("--rows", type=int, default=None, help="training rows (default by mode)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of A B C D / D C B A, one seed each")
    parser.add_argument("--ablation", action="store_true",
                        help="hf-expert, newstune, and newstune with one optimisation off per row")
    parser.add_argument("--contenders", nargs="+", choices=[*CONTENDERS, *ABLATIONS, *ADDITIONS],
                        help="run only these (with hf-expert and newstune), e.g. one ablation or addition row")
    parser.add_argument("--out", default="bench_results")
    parser.add_argument("--contender", choices=[*CONTENDERS, *ABLATIONS, *ADDITIONS], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=HYPER["seed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    contender_main(args) if args.contender else driver_main(args)


if __name__ == "__main__":
    main()
