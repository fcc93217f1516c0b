#!/usr/bin/env python3
"""Runs dorac on what onnxruntime-genai's model builder exports for each decoder family it
supports here, in fp32 and int4 (MatMulNBits): every case of `make_genai.py` (a prompt, padding,
decoding, a ragged batch, a chunk after a cache), `dorac run` on the GPU against onnxruntime, every
output. Not run by the tests or CI, which need no Python; no model hub: random weights.

Usage (from the repository root, after `cargo build --release`; `DORAC=path` runs another binary;
the builder needs transformers 5, see make_genai.py):
    /work/pyenv/bin/python models/verify_genai.py [ARCH...]      # default: all

The int4 models' MatMulNBits carry accuracy_level 4, with which onnxruntime's CPU kernel quantizes
the activations to int8 (outputs about 1e-2 away from the float product); dorac computes the
dequantized product in f32, so they are compared with onnxruntime on a copy set to level 0.

Checked with onnxruntime-genai 0.18, onnxruntime 1.32, transformers 5.25 (the builder) and 4.57
(the models): Llama, Qwen2, Qwen3, Mistral, Gemma, Granite, OLMo, Phi, fp32 and int4, all within
4.5e-7 (16 of 16 models, 5 cases each). The builder fails on Phi-3 and SmolLM3 configs of this size (its own errors), and writes
Gemma 2 with a window-sized cache (sliding_window_cache), which dorac refuses.
"""
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import transformers as T
from safetensors.numpy import load_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import make_genai as mg  # noqa: E402

DORAC = os.environ.get("DORAC", str(pathlib.Path(__file__).resolve().parent.parent / "target/release/dorac"))
TOLERANCE = 1e-5
mg.ARCHS.update({
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {}),
    # The builder writes no window for Mistral's sliding_window (local_window_size -1).
    "mistral": (T.MistralConfig, T.MistralForCausalLM, {"sliding_window": None}),
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, {"head_dim": 16}),
    "granite": (T.GraniteConfig, T.GraniteForCausalLM, {}),
    "olmo": (T.OlmoConfig, T.OlmoForCausalLM, {"pad_token_id": 0}),
})
CASES = ["prompt", "padded", "decode", "ragged_decode", "chunk"]


def build(arch, precision, out):
    """mg.build with another precision; returns the folder onnxruntime's goldens come from."""
    config, model, extra = mg.ARCHS[arch]
    with tempfile.TemporaryDirectory() as hf:
        import torch
        torch.manual_seed(0)
        model(config(**{**mg.SMALL, **extra})).eval().save_pretrained(hf)
        mg.tokenizer(hf)
        env = dict(os.environ, PYTHONPATH=mg.TRANSFORMERS5)
        r = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", out, "-p",
                            precision, "-e", "cpu"], env=env, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError("builder: " + r.stderr.strip().splitlines()[-1])
    if precision == "fp32":
        return out
    exact = out / "level0"
    exact.mkdir()
    m = onnx.load(out / "model.onnx")
    for n in m.graph.node:
        for a in n.attribute:
            if n.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = 0
    onnx.save(m, exact / "model.onnx", save_as_external_data=True, location="model.onnx.data")
    return exact


def check(arch, precision):
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        try:
            golden = build(arch, precision, out)
        except RuntimeError as e:
            print(f"{arch:10s} {precision}: {e}", flush=True)
            return None
        mg.cases(golden, mg.head_size(arch))
        worst = {}
        for case in CASES:
            inputs = golden / f"{case}.inputs.safetensors"
            r = subprocess.run([DORAC, "run", out / "model.onnx", "--inputs", inputs, "-o", out / "got.safetensors"],
                               capture_output=True, text=True)
            if r.returncode:
                print(f"{arch:10s} {precision} {case}: FAIL {r.stderr.strip().splitlines()[-1]}", flush=True)
                return False
            got, want = load_file(out / "got.safetensors"), load_file(golden / f"{case}.ort.safetensors")
            worst[case] = max(float(np.abs(got[k] - w).max() / max(np.abs(w).max(), 1e-30)) for k, w in want.items())
        ok = max(worst.values()) < TOLERANCE
        shown = ", ".join(f"{c} {e:.1e}" for c, e in worst.items())
        print(f"{arch:10s} {precision}: {shown}{'' if ok else '  FAIL'}", flush=True)
        return ok


def main():
    names = sys.argv[1:] or list(mg.ARCHS)
    results = {(a, p): check(a, p) for a in names for p in ("fp32", "int4")}
    failed = [f"{a} {p}" for (a, p), ok in results.items() if ok is False]
    built = [k for k, ok in results.items() if ok is not None]
    print(f"{len(built) - len(failed)} of {len(built)} exported models pass"
          f"{'; failed: ' + ', '.join(failed) if failed else ''}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
