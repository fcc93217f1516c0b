#!/usr/bin/env python3
"""GPT-2 small (124M parameters, `GPT2Config()` defaults, random weights: no download) exported
for dorac's large-tensor checks. Not committed (650 MB): run it where you want the files,

    /work/pyenv/bin/python models/make_gpt2_small.py OUT_DIR [--layers N]

--layers N keeps GPT-2 small's width (768, 12 heads, vocab 50257) but stacks only N blocks
(default 12); benches/autodiff.rs uses 1, 2, 4 and 8 layers to time building the training
step's gradients as the depth grows.

It writes OUT_DIR/legacy_op17.onnx (+ weights in legacy_op17.onnx.data, external data),
OUT_DIR/inputs.safetensors ("input_ids" int64 [2, 16], bytes of models/text/tiny_corpus.txt),
OUT_DIR/legacy_op17.ort.safetensors (onnxruntime's "logits" [2, 16, 50257]), and
OUT_DIR/train.safetensors ("input_ids" and "labels" = the same ids, for `dorac train --loss lm`).

The token embedding wte is 50257 x 768 float32 = 154 MB, over lavapipe's 128 MiB
max_storage_buffer_binding_size; the tied LM head reads the same matrix transposed.
"""

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from safetensors.numpy import save_file
from transformers import GPT2Config, GPT2LMHeadModel

MODELS_DIR = Path(__file__).resolve().parent


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        # An explicit all-ones mask: without one transformers 5 looks for packed sequences with
        # torch.diff, which the legacy exporter cannot write (see make_transformers.GPT2ForExport).
        return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                          use_cache=False).logits


def main():
    parser = argparse.ArgumentParser(description="Export GPT-2 small (random weights) to ONNX.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--layers", type=int, default=GPT2Config().n_layer, metavar="N",
                        help="number of transformer blocks (default: GPT2Config's 12)")
    args = parser.parse_args()
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(124)
    config = GPT2Config(n_layer=args.layers, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0,
                        attn_implementation="eager")
    model = GPT2LMHeadModel(config).eval()
    text = (MODELS_DIR / "text" / "tiny_corpus.txt").read_bytes()
    ids = np.frombuffer(text[: 2 * 16], dtype=np.uint8).astype(np.int64).reshape(2, 16)
    x = torch.from_numpy(ids)
    t = time.time()
    path = out / "legacy_op17.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits(model), (x,), str(path), input_names=["input_ids"], output_names=["logits"],
                          opset_version=17, dynamo=False, do_constant_folding=True)
    m = onnx.load(str(path))
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="legacy_op17.onnx.data", size_threshold=1024)
    print(f"exported in {time.time() - t:.1f} s")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input_ids": ids})[0]
    with torch.no_grad():
        ref = Logits(model)(x).numpy()
    print("ORT vs torch:", np.abs(logits - ref).max(), "max |logit|", np.abs(ref).max())
    save_file({"input_ids": ids}, str(out / "inputs.safetensors"))
    save_file({"logits": logits}, str(out / "legacy_op17.ort.safetensors"))
    save_file({"input_ids": ids, "labels": ids}, str(out / "train.safetensors"))


if __name__ == "__main__":
    main()
