#!/usr/bin/env bash
# On the lent GPU machine: gptforge from this checkout, megatron-core from the carried wheels,
# then the `gpu` tests and bench/bench_gpu.py (its arguments are this script's). From here:
#   make gpu-wheels            # once: .gpu_wheels/ (ignored by git)
#   device run: command="bash bench/on_gpu.sh", carry=[".gpu_wheels"]
# What it prints (and $OUT/bench_gpu.txt, $OUT/gpu_tests.txt) comes back.
set -euo pipefail
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/gptforge-site}
OUT=${OUT:-/tmp}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .gpu_wheels/*.whl
# gptforge.<part> without an install: the namespace package as links to this checkout's folders
mkdir -p "$SITE/gptforge"
for part in launcher model data parallel slurm; do
    ln -sfn "$PWD/$part" "$SITE/gptforge/$part"
done
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PY'
import torch, megatron.core, gptforge.launcher.run.entry  # noqa: F401  (fails here, not later)
print(f"torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
      f"cuda {torch.cuda.is_available()} "
      f"({torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'})")
PY
"$PY" -m pytest -q -m gpu tests/integration/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt" ||
    echo "[on_gpu] the gpu tests failed (above); the benchmark runs anyway"
"$PY" bench/bench_gpu.py "$@" 2>&1 | tee "$OUT/bench_gpu.txt"
