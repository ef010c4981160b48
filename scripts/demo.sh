#!/usr/bin/env bash
# The main job on embedded defaults: a tiny GPT trained by 2 local ranks (tensor parallel) on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-runs/demo}
rm -rf "$RUN_DIR"
gptforge train --config configs/tiny.yaml --nproc-per-node 2 \
    --parallel.tensor_model_parallel_size=2 --train.train_iters=40 --run.dir="$RUN_DIR"
echo
echo "demo finished: resolved config $RUN_DIR/config.yaml, metrics $RUN_DIR/metrics.jsonl"
