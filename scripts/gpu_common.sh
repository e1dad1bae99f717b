# Sourced by scripts/gpu_figures.sh and scripts/gpu_check.sh: `gpu_setup DEFAULT_OUTDIR "$@"` reads
# [--device cuda|cpu] [OUTDIR] (-h prints the calling script's header), makes OUTDIR, goes to the
# repository root and sets device, out, root, py (PYTHON or python3) and PYTHONPATH (the carried
# wheels in .whl/site first: see scripts/gpu_carry.sh).
gpu_setup() {
    local default=$1
    shift
    device=cuda
    out=
    while [[ $# -gt 0 ]]; do
        case $1 in
            --device) device=$2; shift 2 ;;
            --device=*) device=${1#*=}; shift ;;
            -h|--help) sed -n '2,/^set /p' "$0" | sed '$d'; exit 0 ;;
            *) out=$1; shift ;;
        esac
    done
    mkdir -p "${out:=$default}"
    out=$(cd "$out" && pwd)
    root=$(cd "$(dirname "$0")/.." && pwd)
    cd "$root" || exit 1
    py=${PYTHON:-python3}
    export PYTHONPATH="$root/.whl/site:$root${PYTHONPATH:+:$PYTHONPATH}"
}
