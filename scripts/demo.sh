#!/usr/bin/env bash
# The main job on embedded defaults, on a corpus present on every machine (Python's stdlib sources):
# sentencepiece tokenizer → WebDataset shards → 2-rank training on CPU → validation → a sample,
# recorded in MLflow (the embedded sqlite store next to the run) with a loss/lr/throughput PNG.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${DEMO_DIR:-runs/demo}
rm -rf "$DEMO"
mkdir -p "$DEMO"
gptforge data sample-corpus "$DEMO/corpus" --size medium
gptforge tokenizer train --input "$DEMO/corpus" --vocab-size 2000 --model-prefix "$DEMO/tokenizer" \
    --input-sentence-size 50000
gptforge data prepare --input "$DEMO/corpus" --tokenizer "$DEMO/tokenizer.model" --out "$DEMO/shards" \
    --valid-fraction 0.02 --shard-size-mb 1
gptforge train --config configs/tiny.yaml --nproc-per-node 2 --run.dir "$DEMO/run" \
    --data.source=webdataset "--data.sources=[{path: $DEMO/shards}]" \
    --data.tokenizer_model="$DEMO/tokenizer.model" --model.vocab_size=2000 \
    --model.num_layers=4 --model.hidden_size=128 --model.seq_length=128 \
    --train.train_iters=150 --train.eval_interval=50 --train.log_interval=10 \
    --optim.lr=2e-3 --optim.min_lr=2e-4 --optim.lr_warmup_iters=10 \
    --sample.prompt="import" --sample.max_new_tokens=48 --logging.mlflow=true
echo
echo "demo finished. results under $DEMO:"
echo "  tokenizer  $DEMO/tokenizer.model   shards  $DEMO/shards (index.json)"
echo "  config     $DEMO/run/config.yaml   metrics $DEMO/run/metrics.jsonl   sample $DEMO/run/sample.txt"
echo "  checkpoint $DEMO/run/checkpoints   (gptforge checkpoint inspect $DEMO/run/checkpoints)"
echo "  report     $DEMO/run/report.png    (gptforge report $DEMO/run)"
echo
echo "the MLflow run (params, curves, artifacts; mlflow and gptforge live in .venv/bin):"
echo "  mlflow ui --backend-store-uri sqlite:///$(cd "$DEMO" && pwd)/mlflow.db"
