#!/usr/bin/env bash
# The CUDA paths CI cannot run (FP8 training, FP8-resident decode, the captured decode step, prefill and
# decode speed), on one H100/H200 in under 10 minutes; writes one JSON file (default gpu_check.json).
# Needs a CUDA build of torch in the environment: pip install -e . with it already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check.json}"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
timeout 600 python benchmarks/gpu_check.py --out "$out"
