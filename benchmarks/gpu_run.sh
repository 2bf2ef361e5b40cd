#!/usr/bin/env bash
# The issue-4 measurements on one GPU, logs under $OUT (the device tool's output folder).
# Run from the repository root after installing the package (see BENCHMARKS.md for the preamble).
# BENCH_OVERRIDES: extra recipe overrides for stage 1 (e.g. to switch a transform off).
# Stages: 1 = 8B bench (HF eager peer, profile), 2 = LLM(...) startup, 3 = GPU tests,
#         4 = HF static cache + compile peer at batch 1, 5 = decode after a 4096-token prompt,
#         6 = offline throughput (512 requests), 10 = its HF eager peer (static batches of 64) alone:
#             the peer takes ~7 min, too long to share one 10-minute device call with the rest,
#         7 = decode attention kernel timings and knob sweep, 8 = skinny linear kernel vs cuBLAS sweep,
#         9 = batch 1 with cuBLAS for every linear (the skinny kernel off),
#         11 = batch 1 with programmatic dependent launch off, then on (AUTODEPLOY_PDL A/B). Default: 1 2 3.
set -o pipefail
OUT=${OUT:-/tmp/bench_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CFG=benchmarks/llama-3.1-8b
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
for stage in ${STAGES:-1 2 3}; do case $stage in
1) timeout 200 autodeploy bench $CFG --config-only --batch 1,64 --input-len 128 --output-len 128 \
     --baseline hf --cuda-graphs ${GRAPHS:-on} --profile 5 --repeats 2 --json "$OUT/bench_8b.json" $BENCH_OVERRIDES 2>&1 \
     | grep -v USDT | tee "$OUT/bench_8b.log" ;;
2) TRITON_CACHE_DIR=$(mktemp -d) timeout 110 python3 benchmarks/llm_startup.py $CFG 2>&1 | tee "$OUT/startup_8b.log" ;;
3) timeout 150 python3 -m pytest -q -m gpu tests/ 2>&1 | tail -15 | tee "$OUT/gpu_tests.log" ;;
4) timeout 250 autodeploy bench $CFG --config-only --batch 1 --input-len 128 --output-len 128 \
     --baseline hf --baseline hf-compile --repeats 3 --json "$OUT/bench_8b_compile.json" 2>&1 \
     | grep -v USDT | tee "$OUT/bench_8b_compile.log" ;;
5) timeout 150 autodeploy bench $CFG --config-only --batch 1 --input-len 4096 --output-len 128 --repeats 2 \
     --json "$OUT/bench_8b_4096.json" 2>&1 | grep -v USDT | tee "$OUT/bench_8b_4096.log" ;;
6) timeout 200 autodeploy bench $CFG --config-only --num-requests 512 --input-len-range 64,1024 \
     --output-len-range 64,512 --warmup 0 --repeats 1 --json "$OUT/bench_8b_throughput.json" 2>&1 \
     | grep -v USDT | tee "$OUT/bench_8b_throughput.log" ;;
7) timeout 240 python3 benchmarks/decode_attention_bench.py 2>&1 | tee "$OUT/decode_attention.log" ;;
8) timeout 240 python3 benchmarks/linear_bench.py 2>&1 | tee "$OUT/linear.log" ;;
9) timeout 150 autodeploy bench $CFG --config-only --batch 1 --input-len 128 --output-len 128 --repeats 2 \
     transforms.select_backends.backends.linear=torch 2>&1 | grep -v USDT | tee "$OUT/bench_8b_cublas.log" ;;
10) timeout 570 autodeploy bench $CFG --config-only --num-requests 512 --input-len-range 64,1024 \
     --output-len-range 64,512 --baseline hf --peers-only --warmup 0 --repeats 1 \
     --json "$OUT/bench_8b_throughput_hf.json" 2>&1 | grep -v USDT | tee "$OUT/bench_8b_throughput_hf.log" ;;
11) for pdl in 0 1; do AUTODEPLOY_PDL=$pdl timeout 150 autodeploy bench $CFG --config-only --batch 1 --input-len 128 \
     --output-len 128 --repeats 2 --json "$OUT/bench_8b_pdl$pdl.json" 2>&1 | grep -v USDT | tee "$OUT/bench_8b_pdl$pdl.log"; done ;;
esac; done
