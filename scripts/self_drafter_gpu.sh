#!/usr/bin/env bash
# The self-drafter at a realistic shape on one CUDA GPU (issue 19, acceptance 4): the embedded SmolLM2
# zero-padded into the Llama-3.1-8B shape (14 GB of bf16 layers; it predicts exactly as SmolLM2), drafting
# for itself under a 12 GiB card (the rest of the GPU is held by this process), against plain offloaded
# decoding and HF assisted generation with the same self-drafter as assistant, in one `edgespec bench`
# run; then the same with the target's separate nf4 copy drafting. ~8 min on an H200.
#
#   bash scripts/self_drafter_gpu.sh OUTDIR        # writes OUTDIR/self_drafter_gpu.md, OUTDIR/copy_drafter_gpu.md
set -euo pipefail
out=${1:-gpu-self-drafter}
py=${PYTHON:-python3}
vram=${VRAM_GB:-12}
mkdir -p "$out"
common=(--device cuda --target-shape llama-8b --questions tests/data/mt_bench_first5.jsonl --n-prompts 3
        --max-new-tokens 48)

capped() {  # edgespec's CLI in a process that sees a $vram GiB card
    $py - "$vram" "$@" <<'EOF'
import sys

import torch

sys.path.insert(0, ".")
vram, argv = float(sys.argv[1]), sys.argv[2:]
free, _ = torch.cuda.mem_get_info()
used = torch.cuda.mem_get_info()[1] - free
held = torch.empty(max(0, free - max(0, int(vram * 2**30) - used)), dtype=torch.uint8, device="cuda")
print(f"holding {held.numel() / 2**30:.1f} GiB: the run sees {torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB free",
      file=sys.stderr)
from edgespec.cli import main

sys.exit(main(argv))
EOF
}

nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv | tee "$out/gpu.txt"
capped bench "${common[@]}" --draft self --out "$out/self_drafter_gpu.md" 2>&1 | tail -n 30
capped bench "${common[@]}" --out "$out/copy_drafter_gpu.md" --draft embedded 2>&1 | tail -n 12
