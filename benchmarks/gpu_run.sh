#!/usr/bin/env bash
# The issue-4 measurements on one GPU, logs under $OUT (the device tool's output folder).
# Run from the repository root after installing the package (see BENCHMARKS.md for the preamble).
# BENCH_OVERRIDES: extra recipe overrides for stage 1 (e.g. to switch a transform off).
# Stages: 1 = 8B bench (HF eager peer, CUDA graphs on/off, profile), 2 = LLM(...) startup,
#         3 = GPU tests, 4 = HF static cache + compile peer at batch 1. Default: 1 2 3.
set -o pipefail
OUT=${OUT:-/tmp/bench_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CFG=benchmarks/llama-3.1-8b
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
for stage in ${STAGES:-1 2 3}; do case $stage in
1) timeout 200 autodeploy bench $CFG --config-only --batch 1,64 --input-len 128 --output-len 128 \
     --baseline hf --cuda-graphs both --profile 5 --repeats 2 --json "$OUT/bench_8b.json" $BENCH_OVERRIDES 2>&1 \
     | grep -v USDT | tee "$OUT/bench_8b.log" ;;
2) TRITON_CACHE_DIR=$(mktemp -d) timeout 110 python3 benchmarks/llm_startup.py $CFG 2>&1 | tee "$OUT/startup_8b.log" ;;
3) timeout 70 python3 -m pytest -q -m gpu tests/test_bench.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.log" ;;
4) timeout 250 autodeploy bench $CFG --config-only --batch 1 --input-len 128 --output-len 128 \
     --baseline hf --baseline hf-compile --repeats 3 --json "$OUT/bench_8b_compile.json" 2>&1 \
     | grep -v USDT | tee "$OUT/bench_8b_compile.log" ;;
esac; done
