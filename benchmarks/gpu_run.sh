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
# Issue 14 (quantization; BENCHMARKS.md "Quantized stages" says how to group them into two device calls):
#         12 = bf16 batch 1 and 64 with the HF eager peer, then the HF static cache + compile peer alone,
#         13 = the same workloads quantized online: fp8 (W8A8; groups of 128, then per token), int8 and int4
#              (group 128) weight-only,
#         14 = SmolLM2 (real weights, $SMOL) perplexity of the fixed text: bf16, fp8, int4 g32, bf16 + fp8 KV cache,
#         15 = SmolLM2 greedy agreement with HF eager, bf16 (benchmarks/gpu_correctness.py),
#         16 = fp8 KV cache: batch 64, then batch 1 after a 4096-token prompt (bf16-cache batch 64: stage 12),
#         17 = 512-request offline throughput, fp8 KV cache, then bf16 cache,
#         18 = LLM(...) startup, bf16 then fp8,  19 = summary tables of 12-18 (benchmarks/quant_summary.py),
#         20 = quantized linear kernels vs bf16 cuBLAS per 8B shape (benchmarks/quant_linear_bench.py; GPU only),
#         21 = `autodeploy serve` under 64 streaming clients against LLM.generate (benchmarks/serve_load.py, the 8B
#              shape with SmolLM2's tokenizer: needs the default model installed, or SERVE_TOKENIZER=DIR holding its
#              config.json and tokenizer files, and the serve wheels in .whl).
#         22 = read-only vs copy bandwidth (is a GEMM past 100 % of the copy possible?), then INT8 GEMV vs tensor-core
#              dot at 1-8 rows (settles use_int_gemv.rows; GPU only),
#         23 = FP8 and INT4 batch 1 with the LM head quantized too (`quantization.exclude` without lm_head),
#         24 = the kernels of batch 64's prompts alone (`--profile-prefill 3`), bf16 then FP8,
#         25 = what sessions 22-23 landed without a GPU: the GPU tests of the kernels they changed (per-head norms
#              read in place, RoPE with float32 cos on bf16 x, INT4 GEMV knobs at 2-4 rows, the GEMV copy), the zoo
#              entries they touch in bf16 on the GPU (gpt-oss in float32: attention sinks, swigluoai experts; its
#              bf16 logits move as much as HF's own bf16 model's), INT4 linears at 1-64 rows, Qwen3-30B-A3B
#              batch 1 and 64,
#         26 = the GPT-OSS-20B shape (benchmarks/gpt-oss-20b: 21B parameters, 3.6B active; attention sinks, swigluoai
#              experts) at batch 1 and 64, bf16 then FP8 online (experts included).
# BUDGET=S: stages 12-20 end by S seconds after the script started (each one's timeout is cut to what is left),
# so a device call never overruns; order STAGES by priority.
# TINY=1 tries any stage on the CPU: tiny config, few tokens, a short text (no figures: only that it runs).
set -o pipefail
OUT=${OUT:-/tmp/bench_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CFG=benchmarks/llama-3.1-8b
# Shapes of stages 12-18 (issue 14: prompt 128, 128 new tokens, batches 1 and 64, a 4096-token prompt, 512 requests).
IN=128 NEW=128 BATCHES=1,64 B64=64 LONG=4096 NREQ=512 REQ_IN=64,1024 REQ_OUT=64,512 REPEATS=2 PPL_WINDOW=2048 PPL_DTYPE=bfloat16 SMOL_LIMIT=90
SERVE_CLIENTS=64 SERVE_S=40 SERVE_REQ=256 SERVE_DEVICE=cuda MOE_CFG=benchmarks/qwen3-30b-a3b OSS_CFG=benchmarks/gpt-oss-20b
TEXT=tests/data/shakespeare_coriolanus.txt SMOL=${SMOL:-}  # SMOL empty: the embedded default model (SmolLM2)
if [ "${TINY:-0}" = 1 ]; then
  CFG=benchmarks/tiny-llama IN=16 NEW=8 BATCHES=1,4 B64=4 LONG=256 NREQ=6 REQ_IN=8,64 REQ_OUT=4,16 REPEATS=1 PPL_WINDOW=128 PPL_DTYPE=float32 SMOL_LIMIT=600
  SERVE_CLIENTS=2 SERVE_S=6 SERVE_REQ=4 SERVE_DEVICE=cpu MOE_CFG=benchmarks/tiny-llama OSS_CFG=benchmarks/tiny-llama
  TEXT=$OUT/short_text.txt; head -c 1500 tests/data/shakespeare_coriolanus.txt > "$TEXT"
fi
Q_FP8="quantization.algo=fp8" Q_INT8="quantization.algo=int8 quantization.group_size=-1"
Q_INT4="quantization.algo=int4 quantization.group_size=128" KV_FP8="quantization.kv_cache_dtype=fp8"
limit() {  # limit SECONDS: that many, or what is left of $BUDGET if less
  local left=$(( ${BUDGET:-0} > 0 ? BUDGET - SECONDS : $1 ))
  echo $(( left < $1 ? (left > 1 ? left : 1) : $1 ))
}
bench() {  # bench NAME SECONDS ARGS...: `autodeploy bench` of the 8B shape (random weights), log + JSON in $OUT
  local name=$1 seconds=$2; shift 2
  timeout "$(limit "$seconds")" autodeploy bench $CFG --config-only --json "$OUT/$name.json" "$@" 2>&1 | grep -v USDT | tee "$OUT/$name.log"
}
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
12) bench quant_bf16 140 --batch $BATCHES --input-len $IN --output-len $NEW --repeats $REPEATS --baseline hf
    bench quant_hf_compile 130 --batch $BATCHES --input-len $IN --output-len $NEW --repeats $REPEATS \
      --baseline hf-compile --peers-only ;;
13) bench quant_fp8 90 --batch $BATCHES --input-len $IN --output-len $NEW --repeats $REPEATS $Q_FP8
    bench quant_fp8_token 90 --batch $BATCHES --input-len $IN --output-len $NEW --repeats $REPEATS $Q_FP8 \
      quantization.act_quant=token  # compressed-tensors FP8-dynamic's activations
    bench quant_int8 90 --batch $BATCHES --input-len $IN --output-len $NEW --repeats $REPEATS $Q_INT8
    bench quant_int4 90 --batch $BATCHES --input-len $IN --output-len $NEW --repeats $REPEATS $Q_INT4 ;;
14) for q in "none" "$Q_FP8" "quantization.algo=int4 quantization.group_size=32" "$KV_FP8"; do  # 128 does not divide 576
      name=$(echo "$q" | sed 's/quantization\.//g; s/ .*//; s/[.=]/_/g')
      [ "$q" = none ] && q="quantization.algo=none"
      timeout "$(limit $SMOL_LIMIT)" autodeploy eval-ppl $SMOL --text $TEXT --window $PPL_WINDOW \
        model.dtype=$PPL_DTYPE $q --json "$OUT/ppl_$name.json" 2>&1 | tee "$OUT/ppl_$name.log"
    done ;;
15) timeout "$(limit $((SMOL_LIMIT + 30)))" python3 benchmarks/gpu_correctness.py $SMOL \
      --json "$OUT/correctness_smollm2.json" \
      $([ "${TINY:-0}" = 1 ] && echo --prompts 2 --new-tokens 4 --device cpu --dtype float32) 2>&1 \
      | tee "$OUT/correctness_smollm2.log" ;;
16) bench kv_fp8_b64 80 --batch $B64 --input-len $IN --output-len $NEW --repeats $REPEATS $KV_FP8
    bench kv_fp8_long 90 --batch 1 --input-len $LONG --output-len $NEW --repeats $REPEATS $KV_FP8 ;;
17) bench kv_fp8_throughput 110 --num-requests $NREQ --input-len-range $REQ_IN --output-len-range $REQ_OUT \
      --warmup 0 --repeats 1 $KV_FP8
    bench kv_bf16_throughput 110 --num-requests $NREQ --input-len-range $REQ_IN --output-len-range $REQ_OUT \
      --warmup 0 --repeats 1 ;;
18) for q in "" "$Q_FP8"; do name=startup_${q:+fp8}; name=${name%_}
      TRITON_CACHE_DIR=$(mktemp -d) timeout "$(limit 80)" python3 benchmarks/llm_startup.py $CFG $q 2>&1 \
        | tee "$OUT/$name.log"
    done ;;
19) python3 benchmarks/quant_summary.py "$OUT" | tee "$OUT/quant_summary.md" ;;
20) timeout "$(limit 240)" python3 benchmarks/quant_linear_bench.py 2>&1 | tee "$OUT/quant_linear.log" ;;
21) timeout "$(limit 300)" python3 benchmarks/serve_load.py --device $SERVE_DEVICE --shape $CFG ${SERVE_TOKENIZER:+--tokenizer-from $SERVE_TOKENIZER} --clients $SERVE_CLIENTS \
      --duration $SERVE_S --requests $SERVE_REQ --output-len $NEW --prompt-words 100 --max-seq-len 512 \
      --json "$OUT/serve_load.json" 2>&1 | tail -60 | tee "$OUT/serve_load.log" ;;
22) (cd benchmarks && timeout "$(limit 60)" python3 -c "import quant_knob_sweep; quant_knob_sweep.bandwidth()") 2>&1 \
      | tee "$OUT/bandwidth.log"
    (cd benchmarks && timeout "$(limit 150)" python3 int8_gemv_bench.py) 2>&1 | tee "$OUT/int8_rows.log" ;;
23) for q in "$Q_FP8" "$Q_INT4"; do name=lm_head_$(echo "$q" | sed 's/quantization\.algo=//; s/ .*//')
      bench $name 90 --batch 1 --input-len $IN --output-len $NEW --repeats $REPEATS $q \
        'quantization.exclude=["*router*","*.gate"]'
    done ;;
24) for q in "" "$Q_FP8"; do name=prefill_profile${q:+_fp8}  # where batch 64's prompts go, kernel by kernel
      bench $name 100 --batch $B64 --input-len $IN --output-len 1 --repeats 1 --profile-prefill 3 $q
    done ;;
25) [ "${TINY:-0}" = 1 ] || timeout "$(limit 150)" python3 -m pytest -q -m gpu tests/test_triton_kernels_gpu.py \
      tests/test_int4_tinygemm.py tests/test_int4_mma_gemv.py tests/test_int_gemv.py 2>&1 | tail -15 \
      | tee "$OUT/landed_unrun_tests.log"
    timeout "$(limit 120)" autodeploy zoo --only olmo-2 qwen3 gemma-3-text qwen3-moe model.device=$SERVE_DEVICE \
      model.dtype=bfloat16 2>&1 | tail -12 | tee "$OUT/landed_unrun_zoo.log"
    timeout "$(limit 60)" autodeploy zoo --only gpt-oss model.device=$SERVE_DEVICE 2>&1 | tail -6 \
      | tee -a "$OUT/landed_unrun_zoo.log"
    [ "${TINY:-0}" = 1 ] || (cd benchmarks && timeout "$(limit 150)" python3 int4_tinygemm_bench.py) 2>&1 \
      | tee "$OUT/int4_rows.log"
    timeout "$(limit 150)" autodeploy bench $MOE_CFG --config-only --batch $BATCHES --input-len $IN \
      --output-len $NEW --repeats $REPEATS --json "$OUT/qwen3_moe.json" 2>&1 | grep -v USDT | tee "$OUT/qwen3_moe.log" ;;
26) for q in "" "$Q_FP8"; do name=gpt_oss${q:+_fp8}
      timeout "$(limit 180)" autodeploy bench $OSS_CFG --config-only --batch $BATCHES --input-len $IN --output-len $NEW \
        --repeats $REPEATS --json "$OUT/$name.json" $q 2>&1 | grep -v USDT | tee "$OUT/$name.log"
    done ;;
esac; done
