#!/usr/bin/env bash
# Every path only a GPU runs, checked at tiny shapes, then pass / bound at the 8B shape per codec: one
# command, the first thing to run on a lent GPU (issue 25). Under 3 minutes on an H200 (estimated: no GPU
# has run it yet; each step has a hard limit, LIMITS, so the whole is capped at ~3.5 min).
#
#   bash scripts/gpu_check.sh [OUTDIR]                 # one CUDA GPU
#   bash scripts/gpu_check.sh --device cpu [OUTDIR]    # the same steps at tiny shapes on a CPU (CI,
#                                                      # tests/test_scripts.py; the kernels interpreted)
#   FIGURES=1 bash scripts/gpu_check.sh OUTDIR         # the figures step at trees of 1, 64, 256 and 1024
#                                                      # tokens, 3 repeats, into OUTDIR/offload_codecs.md
#
# OUTDIR (default gpu-check/) gets log.txt (everything as it prints), summary.txt (environment, each
# step's exit code and seconds, the checks that failed, the figures) and, with FIGURES=1,
# offload_codecs.md (benchmarks/offload_gpu.md rows: command, date, machine). Steps:
#  env      machine, GPU, versions (torch, triton, bitsandbytes, gguf), git commit; stops at once when a
#           GPU run lacks CUDA, bitsandbytes or gguf (the checks need their kernels and reference decode)
#  check    scripts/gpu_check.py: every codec's encode / decode on the device (fused Triton kernels,
#           torch code, bitsandbytes' nf4 kernel) against the host's bits; every GGUF block type against
#           gguf.quants.dequantize; a padded 70B-shape layer built on the device with each --stream-quant;
#           the self-drafter's bitsandbytes copies made on the device; CUDA-graph drafting
#  figures  scripts/profile_offload.py at the 8B shape (a CPU: tiny), all layers streamed, as on a 24 GB
#           card: Q4_K, Q6_K, Q8_0 GGUF blocks, nf4 and int8: pass ms, bound ms, pass / bound, decode ms
#           per pass (goal: pass <= 1.10x its own bound for every codec)
#
# On the device (no network; torch 2.11 cu130 with its triton, transformers 5.17; no bitsandbytes, no
# gguf): as for scripts/gpu_figures.sh (read its header), carry the wheels packed by
# `bash scripts/gpu_carry.sh pack` (.whl/site: bitsandbytes + gguf; this script puts it first on PYTHONPATH).
# No model file is needed. With the device tool, from a checkout of this repository:
#   run(command="bash scripts/gpu_check.sh $OUT/check", carry=[".whl"], timeout_s=300)
#   run(command="FIGURES=1 bash scripts/gpu_check.sh $OUT/figs", carry=[".whl"], timeout_s=400)
# then commit OUTDIR/offload_codecs.md's table to benchmarks/offload_gpu.md (issue 25, acceptance 3).
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
gpu_setup gpu-check "$@"
export PYTHONUNBUFFERED=1
: > "$out/log.txt"
: > "$out/summary.txt"

if [[ $device == cpu ]]; then
    : "${SHAPE:=tiny}" "${LIMITS:=0,0}" "${CODECS:=Q4_K,Q6_K,Q8_0,nf4,int8}"
    figure_args=(--tree-sizes 1 --repeats 1 --prefix 16)
    [[ ${FIGURES:-0} == 1 ]] && figure_args=(--tree-sizes 1,16 --repeats 1 --prefix 16 --markdown "$out/offload_codecs.md")
else
    : "${SHAPE:=llama-8b}" "${LIMITS:=100,110}" "${CODECS:=Q4_K,Q6_K,Q8_0,nf4,int8}"
    figure_args=(--vram-gb "${VRAM_GB:-24}" --tree-sizes 1 --repeats 2)
    [[ ${FIGURES:-0} == 1 ]] && figure_args=(--vram-gb "${VRAM_GB:-24}" --tree-sizes 1,64,256,1024 --repeats 3
                                             --markdown "$out/offload_codecs.md")
    [[ ${FIGURES:-0} == 1 && ${LIMITS} == 100,110 ]] && LIMITS=100,280
fi
IFS=, read -r lim_check lim_figures <<< "$LIMITS"
failed=()

step() {  # step NAME LIMIT_S COMMAND...: output to log.txt and the console; exit code and seconds to summary.txt
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$out/log.txt"
    if [[ $limit == 0 ]]; then "$@"; else timeout -k 10 "$limit" "$@"; fi 2>&1 | tee -a "$out/log.txt" > "$out/.$name.txt"
    rc=${PIPESTATUS[0]}
    cat "$out/.$name.txt"
    printf '%-8s rc=%-3s %4ss  %s\n' "$name" "$rc" $((SECONDS - t0)) "$*" | tee -a "$out/summary.txt"
    [[ $rc == 0 ]] || failed+=("$name")
}

environment() {
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown) device: $device"
    echo "host: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GB RAM, $(uname -sr)"
    if [[ $device != cpu ]]; then
        nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv \
            || { echo "gpu_check.sh: nvidia-smi failed: no GPU here (use --device cpu)"; return 1; }
    fi
    $py scripts/gpu_env.py "$device" triton,bitsandbytes,gguf --script scripts/gpu_check.sh
}

environment 2>&1 | tee -a "$out/summary.txt" "$out/log.txt"
[[ ${PIPESTATUS[0]} == 0 ]] || { echo "gpu_check.sh: the environment is incomplete (above); nothing checked"; exit 1; }

step check "$lim_check" $py scripts/gpu_check.py --device "$device"
step figures "$lim_figures" $py scripts/profile_offload.py --device "$device" --shape "$SHAPE" --codecs "$CODECS" \
    "${figure_args[@]}"

{
    echo
    grep -h "FAIL\|^gpu_check:" "$out/.check.txt" 2>/dev/null
    sed -n '/^  codec /,/^CPU run\|^$/p' "$out/.figures.txt" 2>/dev/null
} | tee -a "$out/summary.txt"
rm -f "$out/.check.txt" "$out/.figures.txt"
echo "=== done: $out (summary.txt)${failed[*]:+; FAILED: ${failed[*]}}"
[[ ${#failed[@]} == 0 ]]
