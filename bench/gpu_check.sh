#!/usr/bin/env bash
# The full-size SAM3 (random weights) on a lent GPU, offline: frames/s, peak GPU memory and GPU
# utilization at --chunk-frames 100 (stages side by side, then --serial), 200 and 50 (201 sampled
# 720p frames, 20 objects), then 10 objects.
# Needs the wheels in .whl/ (transformers 5.24, av, pycocotools; see below); writes results.json,
# table.md, console.log and one log per run (a line per frame) under $OUT.
#
# Usage (repo root, on the GPU machine; at most ~7 minutes: runs that would pass BUDGET_S are skipped):
#   OUT=/tmp/out bash bench/gpu_check.sh [extra bench/benchmark.py options]
#
# The wheels, fetched beforehand on a machine with registry access:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl transformers==5.24.0 av==18.1.0 pycocotools==2.0.11
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
BUDGET_S=${BUDGET_S:-330}  # seconds; the benchmark skips runs that would end later (the first always runs)
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

echo "== GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

echo "== wheels"
ls .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 - <<'EOF'
import importlib.metadata as metadata
import torch
import transformers
print(f"python {__import__('sys').version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__} from {transformers.__file__}")
for name in ("torchvision", "pillow", "av", "pycocotools", "opencv-python-headless", "numpy", "tqdm",
             "huggingface-hub", "tokenizers", "safetensors"):
    try:
        print(f"  {name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"  {name} MISSING")
assert torch.cuda.is_available(), "PyTorch sees no CUDA GPU"
assert transformers.__version__ == "5.24.0", "the carried transformers wheel did not take"
import av, cv2, pycocotools.mask, torchvision  # noqa: E401  fail here, in seconds, not after the model build
from transformers import Sam3VideoModel, Sam3VideoProcessor  # noqa: F401
EOF

echo "== benchmark (budget ${BUDGET_S} s)"
timeout --signal=TERM --kill-after=20 $((BUDGET_S + 60)) \
    python3 bench/benchmark.py --full-size --device cuda --dtype bfloat16 \
    --objects 20 10 --chunk-frames 100 200 50 --frames 201 --deadline "$BUDGET_S" \
    --cache-dir /tmp/sam3-bench --json "$OUT/results.json" --log-dir "$OUT/logs" "$@" \
    2>&1 | tee "$OUT/console.log" || status=$?
# the table, also when the run was cut short (results.json is rewritten after every run)
python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("table", "no table: see results.json"))' \
    "$OUT/results.json" >"$OUT/table.md" || true
exit "${status:-0}"
