#!/usr/bin/env bash
# The benchmarks on a real GPU, as one command: the training step (DoRA / LoRA / exact-norm
# ratios, kernels per step), inference (unmerged and merged DoRA against the base model) and the
# matmul kernels (GFLOP/s next to the CPU sgemm), at sizes large enough to keep a GPU busy, then
# the best matmul rate as a fraction of the device's fp32 peak.
#
#   benches/gpu.sh                      # on the GPU wgpu picks
#   DORAC_PEAK_GFLOPS=67000 benches/gpu.sh   # peak of a device the table below does not know
#   DORAC_BENCH_BIN=dir benches/gpu.sh  # prebuilt bench executables dir/{train,inference,matmul}
#                                       # (a GPU machine without a Rust toolchain; build them
#                                       # with `cargo bench --no-run`)
#
# The fp32 (non-tensor-core) peaks below are the vendors' published figures.
set -euo pipefail
cd "$(dirname "$0")/.."

peak=${DORAC_PEAK_GFLOPS:-}
if [ -z "$peak" ] && command -v nvidia-smi >/dev/null 2>&1; then
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)
    case "$gpu" in
        *H200* | *H100*SXM* | *"H100 80GB HBM3"*) peak=66900 ;;
        *H100*) peak=51200 ;;
        *A100*) peak=19500 ;;
        *L40S*) peak=91600 ;;
        *L4*) peak=30300 ;;
        *4090*) peak=82600 ;;
        *A10*) peak=31200 ;;
        *T4*) peak=8100 ;;
    esac
    echo "gpu: $gpu (fp32 peak ${peak:-unknown} GFLOP/s)"
fi

# One bench, by cargo or from the prebuilt executables.
bench() {
    if [ -n "${DORAC_BENCH_BIN:-}" ]; then
        "$DORAC_BENCH_BIN/$1" --bench
    else
        cargo bench --bench "$1" 2>/dev/null
    fi
}

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
export DORAC_BENCH_ITERS=${DORAC_BENCH_ITERS:-20}
DORAC_BENCH_WIDTH=${DORAC_BENCH_WIDTH:-2048} DORAC_BENCH_BATCH=${DORAC_BENCH_BATCH:-1024} \
    bench train | tee "$out/train.txt"
DORAC_BENCH_WIDTH=${DORAC_BENCH_WIDTH:-2048} DORAC_BENCH_BATCH=${DORAC_BENCH_BATCH:-2048} \
    bench inference | tee "$out/inference.txt"
DORAC_BENCH_LARGE=1 bench matmul | tee "$out/matmul.txt"

# Matmul rows are "M x K x N [transB]  run  kernel  other-target  speedup  sgemm  kernel/sgemm".
best=$(awk '$1 ~ /^[0-9]+$/ && $2 == "x" && $4 == "x" { if ($(NF-4) > best) best = $(NF-4) } END { print best + 0 }' "$out/matmul.txt")
echo
echo "best dorac matmul kernel: $best GFLOP/s"
if [ -n "$peak" ]; then
    awk -v b="$best" -v p="$peak" 'BEGIN { printf "fraction of fp32 peak: %.1f%%\n", 100 * b / p }'
fi
