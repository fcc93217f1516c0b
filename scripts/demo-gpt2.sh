#!/usr/bin/env bash
# DoRA-fine-tunes the bundled tiny GPT-2 (byte-level vocabulary) on models/text/tiny_corpus.txt
# with the next-token loss, and shows a greedy sample before and after. About a minute on the
# software Vulkan driver.
set -euo pipefail
cd "$(dirname "$0")/.."
model=models/gpt2_tiny/legacy_op17_dynamic.onnx
out=${1:-gpt2-dora}
dorac() { cargo run --release -q -- "$@"; }
echo "== before fine-tuning"
dorac generate "$model" --prompt "The garden " --tokens 32 --shape seq=16
echo "== DoRA on the attention and MLP projections (c_attn, c_proj, c_fc), next-token loss"
dorac train "$model" --data models/text/corpus.safetensors --loss lm --shape seq=16 \
    --batch-size 16 --epochs 8 --lr 3e-2 --rank 16 --alpha 32 --target c_attn,c_proj,c_fc \
    -o "$out" --overwrite --quiet
echo "== after"
dorac generate "$model" --adapter "$out" --prompt "The garden " --tokens 32 --shape seq=16
