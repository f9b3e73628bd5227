#!/usr/bin/env bash
# The GPU study of SAM3's step per frame (bench/gpu_study.py) on a lent GPU, offline: transformers'
# step against ours at 10 and 20 objects (frames/s, peak memory, GPU use, CUDA's sync count), one
# frame split into backbone, detector, tracker and the rest, torch.compile tried once, and 1, 2
# and 3 processes side by side; the full-size SAM3 with random weights in bfloat16.
# Needs the wheels in .whl/ (transformers 5.24, av, pycocotools; see below); writes results.json,
# table.md and console.log under $OUT. About 7 minutes on an H200 (the study stops at 8).
# PIPELINE=1 then also runs the pipeline benchmark (bench/benchmark.py --full-size: --chunk-frames
# 100 side by side and --serial, 200 and 50) within BUDGET_S more seconds.
#
# Usage (repo root, on the GPU machine):
#   OUT=/tmp/out bash bench/gpu_check.sh
#   SMALL=1 OUT=/tmp/out bash bench/gpu_check.sh   # the rehearsal on a CPU: the tiny SAM3, no wheels
#
# The wheels, fetched beforehand on a machine with registry access:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl transformers==5.24.0 av==18.1.0 pycocotools==2.0.11
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
BUDGET_S=${BUDGET_S:-330}  # seconds for PIPELINE=1; the benchmark skips runs that would end later
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

if [ -n "${SMALL:-}" ]; then
  python3 bench/gpu_study.py --small --out "$OUT" 2>&1 | tee "$OUT/console.log"
  exit 0
fi

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

echo "== the study (at most 8 minutes)"
status=0
timeout --signal=TERM --kill-after=20 480 python3 bench/gpu_study.py --out "$OUT" 2>&1 | tee "$OUT/console.log" \
  || status=$?

if [ -n "${PIPELINE:-}" ]; then
  echo "== pipeline benchmark (budget ${BUDGET_S} s)"
  timeout --signal=TERM --kill-after=20 $((BUDGET_S + 60)) \
      python3 bench/benchmark.py --full-size --device cuda --dtype bfloat16 \
      --objects 20 10 --chunk-frames 100 200 50 --frames 201 --deadline "$BUDGET_S" \
      --cache-dir /tmp/sam3-bench --json "$OUT/pipeline.json" --log-dir "$OUT/logs" \
      2>&1 | tee "$OUT/pipeline.log" || status=$?
fi
exit "$status"
