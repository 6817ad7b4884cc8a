#!/usr/bin/env bash
# The GPU check, for a machine with one CUDA GPU (at most ~8 minutes): the test
# suite's device cases on cuda, then bench.py on cuda (eager, --compile and
# transformers at a 128-token prompt; bf16, int8 and int4 weights; then time
# to first token at 4K tokens).
# Run from the repository root:  bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check_out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    | tee -a "$out/gpu.txt"
timeout 220 python -m pytest -q test_llama3.py -k "on_device" -rs 2>&1 | tail -15 | tee "$out/tests.txt"
ckpt="${TMPDIR:-/tmp}/llama3-gpu-check-ckpt"  # 2.5 GB: kept out of OUT_DIR
timeout 170 python benchmarks/bench.py --device cuda --dtypes bf16 --rounds 1 --ckpt-dir "$ckpt" 2>&1 \
    | tee "$out/bench.txt"
timeout 100 python benchmarks/bench.py --device cuda --dtypes bf16 --rounds 1 --quantize --ckpt-dir "$ckpt" 2>&1 \
    | tee "$out/bench_quantize.txt"
timeout 80 python benchmarks/bench.py --device cuda --dtypes bf16 --rounds 1 --long 4096 --ckpt-dir "$ckpt" 2>&1 \
    | tee "$out/bench_long.txt"
