#!/usr/bin/env bash
# Every figure in the README, in the order it was measured on the 2-core CPU. ~60 minutes.
set -euxo pipefail
export NEWSTUNE_DATA="${NEWSTUNE_DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}"
newstune train recipes/ag_news/minilm_lora.yaml --output-dir runs/ag_news_minilm_lora
newstune train recipes/liar/minilm_lora.yaml --output-dir runs/liar_minilm_lora
python benchmarks/train_speed.py --mode quick --out bench_results
newstune compare recipes/liar/minilm_lora.yaml --set data.max_train_rows=2000 --set train.epochs=2 \
  --output-dir runs/compare_liar
newstune models install mpnet
for spec in "minilm lora auto" "minilm lora fp32" "minilm full auto" "minilm full fp32" "mpnet lora auto"; do
  set -- $spec
  newstune profile recipes/ag_news/minilm_lora.yaml --steps 8 --warmup 2 --set model.name=$1 \
    --set lora.method=$2 --set train.precision=$3 --set train.batch_size=16 --output-dir "runs/profile_$1_$2_$3"
done
python benchmarks/augment_ood.py --rows 2000 --epochs 2
# A sweep that is interrupted after a minute and resumed.
timeout 90 newstune sweep recipes/ag_news/minilm_lora_r4_a16_qv.yaml --set data.max_train_rows=1000 \
  --set data.max_eval_rows=500 --set train.epochs=1 --grid lora.r=4,8,32 --grid lora.target_modules=qv,all \
  --max-trainable 250000 --output-dir runs/sweep_ag || true
newstune sweep recipes/ag_news/minilm_lora_r4_a16_qv.yaml --set data.max_train_rows=1000 \
  --set data.max_eval_rows=500 --set train.epochs=1 --grid lora.r=4,8,32 --grid lora.target_modules=qv,all \
  --max-trainable 250000 --output-dir runs/sweep_ag --resume
