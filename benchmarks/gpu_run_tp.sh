#!/usr/bin/env bash
# Issue 15: tensor / expert parallel scaling on 2-4 H200s, logs under $OUT (the device tool's output folder).
# Run from the repository root after installing the package. NVLink multicast stays off in every process.
# Stages: 1 = 8B shape TP 1/2/4 at batch 1 and 64 (TP 4 when 4 GPUs), 2 = 70B shape on 4 GPUs,
#         3 = MoE (Qwen3-30B-A3B shape) expert parallel vs TP inside experts, 4 = correctness: SmolLM2 real
#         weights TP 3 vs TP 1, and the 8B shape (saved random weights) TP 2 vs TP 1, 5 = 8B shape with the
#         embedding / LM head replicated vs vocab-parallel (decides parallel.vocab_parallel: auto). Default: 1 4.
set -o pipefail
OUT=${OUT:-/tmp/bench_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
TPS=${TPS:-$([ "$GPUS" -ge 4 ] && echo 1,2,4 || echo 1,2)}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
nvidia-smi topo -m >> "$OUT/gpu.txt" 2>&1
for stage in ${STAGES:-1 4}; do case $stage in
1) timeout 560 python3 benchmarks/tp_bench.py benchmarks/llama-3.1-8b --config-only --tp "$TPS" --batch 1,64 \
     --input-len 128 --output-len 128 --vocab-parallel false --json "$OUT/tp_8b.json" 2>&1 | tee "$OUT/tp_8b.log" ;;
2) timeout 580 python3 benchmarks/tp_bench.py benchmarks/llama-3.1-70b --config-only --tp 4 --batch 1,64 \
     --input-len 128 --output-len 128 --repeats 1 --vocab-parallel false --json "$OUT/tp_70b.json" 2>&1 | tee "$OUT/tp_70b.log" ;;
3) for ep in false true; do timeout 280 python3 benchmarks/tp_bench.py benchmarks/qwen3-30b-a3b --config-only \
     --tp "${TPS#1,}" --batch 1,64 --repeats 1 --vocab-parallel false parallel.enable_expert_parallel=$ep --json "$OUT/tp_moe_ep_$ep.json" 2>&1 \
     | tee "$OUT/tp_moe_ep_$ep.log"; done ;;
4) timeout 250 python3 benchmarks/tp_correctness.py ~/.cache/autodeploy/models/SmolLM2-135M-Instruct --tp 3 2>&1 \
     | tee "$OUT/tp_correctness_smollm2.log"
   W=$(mktemp -d); python3 -c "import sys, torch; from transformers import AutoConfig, AutoModelForCausalLM; \
     torch.manual_seed(0); AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1]), \
     dtype=torch.bfloat16).save_pretrained(sys.argv[2])" benchmarks/llama-3.1-8b "$W"
   timeout 300 python3 benchmarks/tp_correctness.py "$W" --tp 2 2>&1 | tee "$OUT/tp_correctness_8b.log"; rm -rf "$W" ;;
5) timeout 560 python3 benchmarks/tp_bench.py benchmarks/llama-3.1-8b --config-only --tp "${TPS#1,}" --batch 1,64 \
     --input-len 128 --output-len 128 --vocab-parallel false,true --json "$OUT/tp_8b_vocab.json" 2>&1 \
     | tee "$OUT/tp_8b_vocab.log" ;;
esac; done
