#!/usr/bin/env bash
# The DoRA paper's comparison and analysis, reproduced small on the bundled distribution-shift task
# (models/shift: an MLP pre-trained on distribution A, adapted to a rotated distribution B; see
# models/README.md).
#
# For each seed, trains full fine-tuning, LoRA and DoRA (rank 4, alpha 8, on fc1, fc2 and head) with
# the same budget and settings (640 steps of batch 32, AdamW lr 5e-3 with linear decay), evaluating on
# B's held-out set every 160 steps and keeping a checkpoint every 80; then `dorac analyze` prints the
# table (eval accuracy and loss per method, mean ± sd over seeds, trainable parameters, step time) and
# draws the magnitude / direction scatter of the paper's Figure 2.
#
# Usage: scripts/reproduce-paper.sh [OUT_DIR]     (default: reproduce-paper/)
# Environment: SEEDS (default "0 1 2 3 4"), STEPS (640), LR (5e-3), RANK (4), DORAC (a dorac binary;
# default: build this checkout with cargo --release).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-reproduce-paper}"
seeds="${SEEDS:-0 1 2 3 4}"
steps="${STEPS:-640}"
lr="${LR:-5e-3}"
rank="${RANK:-4}"
task="$root/models/shift"

start=$(date +%s)
if [[ -z "${DORAC:-}" ]]; then
    bash "$root/scripts/install-vulkan.sh"
    cargo build --release --quiet --manifest-path "$root/Cargo.toml" --bin dorac
    DORAC="$root/target/release/dorac"
fi
built=$(date +%s)
mkdir -p "$out"

runs=()
for seed in $seeds; do
    for method in full lora dora; do
        dir="$out/$method-seed$seed"
        rm -rf "$dir"
        echo "== $method, seed $seed"
        "$DORAC" train "$task/base.onnx" \
            --data "$task/train_b.safetensors" --eval-data "$task/eval_b.safetensors" \
            --loss cross-entropy --method "$method" --target fc1 --target fc2 --target head \
            --rank "$rank" --alpha $((2 * rank)) --lr "$lr" --batch-size 32 --steps "$steps" \
            --eval-every $((steps / 4)) --save-every $((steps / 8)) --keep-checkpoints 0 \
            --seed "$seed" --quiet -o "$dir" | grep -v '^training '
        runs+=("$dir")
    done
done

echo
"$DORAC" analyze "$task/base.onnx" "${runs[@]}" -o "$out/analysis"
end=$(date +%s)
echo
echo "build $((built - start)) s, experiment $((end - built)) s"
