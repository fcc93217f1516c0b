#!/usr/bin/env bash
# GPT-2 small (124M, random weights from GPT2Config(); 650 MB, not committed) on this machine's
# device: run against onnxruntime, rewrite, a DoRA training step, merge. Its 50257 x 768 token
# embedding (154 MB) is over lavapipe's 128 MiB storage binding, so this exercises the split of
# oversized constants. Needs the Python venv of models/README.md (torch, transformers, onnx,
# onnxruntime) at $PYTHON (default /work/pyenv/bin/python). Usage: scripts/check-gpt2-small.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-/work/pyenv/bin/python}
dir=${1:-target/gpt2-small}
cargo build --release -q
dorac=$PWD/target/release/dorac
[ -f "$dir/legacy_op17.onnx" ] || "$PYTHON" models/make_gpt2_small.py "$dir"
cd "$dir"
compare() { # compare A.safetensors B.safetensors: max-abs error over max-abs value of "logits"
    "$PYTHON" -c "
import sys, numpy as np
from safetensors.numpy import load_file
a, b = (load_file(f)['logits'] for f in sys.argv[1:3])
print(f'  {sys.argv[3]}: relative error {np.abs(a - b).max() / np.abs(b).max():.2e}')" "$1" "$2" "$3"
}
t() { /usr/bin/time -f "  %C: %e s, peak RSS %M KB" "$@"; }
t "$dorac" run legacy_op17.onnx --inputs inputs.safetensors -o run.safetensors
compare run.safetensors legacy_op17.ort.safetensors "run vs onnxruntime"
t "$dorac" rewrite legacy_op17.onnx --target c_attn -o rewritten.onnx
t "$dorac" run rewritten.onnx --inputs inputs.safetensors -o init.safetensors
compare init.safetensors legacy_op17.ort.safetensors "rewritten at init vs onnxruntime"
rm -rf dora
t "$dorac" train legacy_op17.onnx --data train.safetensors --loss lm --target c_attn --batch-size 2 \
    --steps 3 --lr 1e-3 -o dora --quiet
cat dora/metrics.jsonl
rm -rf full-wte
t "$dorac" train legacy_op17.onnx --data train.safetensors --loss lm --method full \
    --target transformer.wte --batch-size 2 --steps 2 --lr 1e-4 -o full-wte --quiet
t "$dorac" run legacy_op17.onnx --adapter dora --inputs inputs.safetensors -o adapted.safetensors
t "$dorac" merge legacy_op17.onnx --adapter dora -o merged.onnx
t "$dorac" run merged.onnx --inputs inputs.safetensors -o merged.safetensors
compare merged.safetensors adapted.safetensors "merged vs unmerged"
