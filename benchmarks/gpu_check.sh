#!/usr/bin/env bash
# The CUDA paths CI cannot run (FP8 training, FP8-resident decode, the captured decode step, prefill and
# decode speed), on one H100/H200 in under 10 minutes; writes one JSON file (default gpu_check.json).
# With 2 or more GPUs, also the NCCL path of serving on torchrun (benchmarks/bench_dpep.py: one process
# against N ranks, one GPU each, tokens/s, identical greedy tokens, bytes per token of the MoE exchange),
# in the same JSON under "dpep_nccl" (under 10 more minutes); with one GPU it is skipped, and says so.
# Needs a CUDA build of torch in the environment: pip install -e . with it already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check.json}"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
timeout 600 python benchmarks/gpu_check.py --out "$out"

gpus="$(python -c "import torch; print(torch.cuda.device_count())")"
dpep="$(mktemp)"
trap 'rm -f "$dpep"' EXIT
if ((gpus >= 2)); then
    # One rank per GPU, at most 8; the ranks must divide the tiny preset's 8 routed experts (3 GPUs: 2 ranks).
    ranks=$((gpus < 8 ? gpus : 8))
    while ((8 % ranks)); do ranks=$((ranks - 1)); done
    echo "dpep_nccl: bench_dpep.py --ranks $ranks on $gpus GPUs (nanoseek.serve.launch.from_env picks NCCL)"
    if ! timeout 600 python benchmarks/bench_dpep.py --ranks "$ranks" --timeout 280 --json "$dpep"; then
        echo '{"error": "bench_dpep.py failed or timed out: its output is in the log above"}' >"$dpep"
    fi
else
    echo "dpep_nccl: skipped: the NCCL path needs 2 GPUs (NCCL cannot run two ranks on one GPU); found $gpus"
    echo "{\"skipped\": \"the NCCL path needs 2 GPUs, found $gpus\"}" >"$dpep"
fi
python - "$out" "$dpep" <<'EOF'
import json, sys
from pathlib import Path

out, dpep = Path(sys.argv[1]), Path(sys.argv[2])
result = json.loads(dpep.read_text() or "{}")
if "backend" in result and result["backend"] != "nccl":
    result["error"] = f"the ranks ran on {result['backend']}, not NCCL"
report = json.loads(out.read_text())
report["dpep_nccl"] = result
out.write_text(json.dumps(report, indent=2) + "\n")
print("dpep_nccl", json.dumps(result), flush=True)
print(f"wrote {out}")
EOF
