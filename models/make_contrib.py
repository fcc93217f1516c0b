#!/usr/bin/env python3
"""Writes models/contrib/: ONNX Runtime's fused transformer ops (com.microsoft), one small model
per case, with random inputs and onnxruntime's outputs, for tests/contrib_ops.rs; and BERT as
ONNX Runtime's transformer optimizer fuses it (the `model_optimized.onnx` of Optimum's `--optimize`
and of Hub repositories). No conformance cases exist for that domain, so onnxruntime is the
reference.

    /work/pyenv/bin/python models/make_contrib.py     (torch, transformers, onnx, onnxruntime,
                                                      optimum-onnx)

Each case is `<case>.onnx` with `<case>.inputs.safetensors` and `<case>.ort.safetensors` (every
output). Attention's cases cover its mask index forms (lengths [B], end and start positions [2B],
0/1 masks [B, T] and [B, S, T]), unidirectional attention after a past (present output), an
attention bias, a V of another width (qkv_hidden_sizes), a custom scale and filter value, and
rows whose every key is padding (the filter value is added, the causal mask leaves keys out).
bert_optimized is a 2-layer BERT of width 32 exported by Optimum and fused by
`onnxruntime.transformers.optimizer` (EmbedLayerNormalization, Attention, SkipLayerNormalization,
BiasGelu), run on a batch whose second sequence is padded.
"""
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

OUT = pathlib.Path(__file__).resolve().parent / "contrib"
MS = "com.microsoft"
rng = np.random.default_rng(0)
F, I32, I64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64


def normal(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def save(name, node, inputs, initializers=(), outputs=None):
    """One node; `inputs` maps graph input names to arrays (in node order), initializers are
    (name, array) pairs; every node output is a graph output."""
    def info(n, a):
        t = {np.float32: F, np.int32: I32, np.int64: I64}[a.dtype.type]
        return helper.make_tensor_value_info(n, t, a.shape)
    outs = [helper.make_tensor_value_info(o, F if "index" not in o else I32, None)
            for o in (outputs or node.output) if o]
    g = helper.make_graph([node], name, [info(n, a) for n, a in inputs.items()], outs,
                          [numpy_helper.from_array(a, n) for n, a in initializers])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    m.ir_version = 9
    onnx.save(m, OUT / f"{name}.onnx")
    got = ort.InferenceSession(str(OUT / f"{name}.onnx")).run(None, inputs)
    save_file(dict(inputs), OUT / f"{name}.inputs.safetensors")
    save_file({o.name: a for o, a in zip(outs, got)}, OUT / f"{name}.ort.safetensors")


def attention(name, b, s, past, mask=None, heads=2, sizes=(8, 8, 8), extra=False, **attrs):
    hidden = 12
    inputs = {"x": normal(b, s, hidden)}
    inits = [("w", normal(hidden, sum(sizes))), ("bias", normal(sum(sizes)))]
    names = ["x", "w", "bias", "", "", ""]
    if mask is not None:
        inputs["mask"] = mask
        names[3] = "mask"
    if past:
        inputs["past"] = normal(2, b, heads, past, sizes[0] // heads)
        names[4] = "past"
    if extra:
        inputs["attention_bias"] = normal(1, heads, s, past + s)
        names[5] = "attention_bias"
    if sizes[1] != sizes[2]:
        attrs["qkv_hidden_sizes"] = list(sizes)
    node = helper.make_node("Attention", names, ["y", "present" if past else ""], domain=MS, num_heads=heads,
                            **attrs)
    save(name, node, inputs, inits)


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()
    b, s = 2, 5
    attention("attention_lengths", b, s, 0, np.array([5, 3], np.int32))
    attention("attention_ends_starts", b, s, 0, np.array([5, 4, 0, 2], np.int32))
    attention("attention_mask_2d", b, s, 0, np.array([[1, 1, 1, 1, 1], [1, 1, 0, 1, 0]], np.int32))
    attention("attention_mask_3d", b, s, 0, rng.integers(0, 2, (b, s, s)).astype(np.int32).clip(
        np.eye(s, dtype=np.int32)[None], None))
    attention("attention_causal_past", b, 3, 4, np.array([[1] * 7, [0, 1, 1, 1, 1, 1, 1]], np.int32),
              unidirectional=1)
    # Rows whose keys are all padding: the filter value is added, not -inf, so onnxruntime's
    # softmax still weighs them; the keys after the query stay out.
    attention("attention_hidden_rows", b, s, 0, np.array([[1] * 5, [0, 0, 0, 1, 1]], np.int32), unidirectional=1,
              mask_filter_value=-30.0)
    attention("attention_bias_scale", b, s, 0, None, extra=True, scale=0.3, mask_filter_value=-1000.0)
    attention("attention_v_width", b, s, 0, np.array([4, 5], np.int32), sizes=(8, 8, 12))

    h = 8
    x, skip = normal(b, s, h), normal(b, s, h)
    gamma, beta, bias = normal(h), normal(h), normal(h)
    save("skip_layer_norm", helper.make_node(
        "SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"], ["y", "", "", "sum"], domain=MS,
        epsilon=1e-5), {"x": x, "skip": skip}, [("gamma", gamma), ("beta", beta), ("bias", bias)])
    save("skip_simplified_layer_norm", helper.make_node(
        "SkipSimplifiedLayerNormalization", ["x", "skip", "gamma", "bias"], ["y", "", "", "sum"], domain=MS,
        epsilon=1e-5), {"x": x, "skip": skip[0]}, [("gamma", gamma), ("bias", bias)])
    for op, extra_inputs, attrs in [("Gelu", [], {}), ("BiasGelu", ["bias"], {}), ("FastGelu", ["bias"], {}),
                                    ("FastGelu", [], {}), ("QuickGelu", [], {"alpha": 1.5})]:
        name = f"{op.lower()}{'_bias' if extra_inputs and op == 'FastGelu' else ''}"
        save(name, helper.make_node(op, ["x"] + extra_inputs, ["y"], domain=MS, **attrs), {"x": 3 * x},
             [("bias", bias)] if extra_inputs else [])
    ids = rng.integers(0, 20, (b, s)).astype(np.int32)
    segments = rng.integers(0, 2, (b, s)).astype(np.int32)
    mask = np.array([[1] * 5, [1, 1, 1, 0, 0]], np.int32)
    save("embed_layer_norm", helper.make_node(
        "EmbedLayerNormalization", ["ids", "segments", "word", "position", "segment", "gamma", "beta", "mask"],
        ["y", "mask_index", "embedding_sum"], domain=MS, epsilon=1e-5),
        {"ids": ids, "segments": segments, "mask": mask},
        [("word", normal(20, h)), ("position", normal(16, h)), ("segment", normal(2, h)), ("gamma", gamma),
         ("beta", beta)])
    bert_optimized()
    for f in sorted(OUT.iterdir()):
        print(f"{f.name}: {f.stat().st_size} bytes")


def bert_optimized():
    import torch
    import transformers as T
    from onnxruntime.transformers.optimizer import optimize_model
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        torch.manual_seed(0)
        T.BertModel(T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=64)).eval().save_pretrained(tmp / "hf")
        optimum = pathlib.Path(sys.executable).parent / "optimum-cli"
        subprocess.run([str(optimum), "export", "onnx", "--model", tmp / "hf", "--task", "feature-extraction",
                        tmp / "onnx"], check=True, capture_output=True)
        fused = optimize_model(str(tmp / "onnx/model.onnx"), model_type="bert", num_heads=4, hidden_size=32)
        fused.save_model_to_file(str(OUT / "bert_optimized.onnx"))
    ids = rng.integers(0, 100, (2, 6)).astype(np.int64)
    inputs = {"input_ids": ids, "attention_mask": np.array([[1] * 6, [1] * 4 + [0] * 2], np.int64),
              "token_type_ids": rng.integers(0, 2, (2, 6)).astype(np.int64)}
    (y,) = ort.InferenceSession(str(OUT / "bert_optimized.onnx")).run(None, inputs)
    save_file(inputs, OUT / "bert_optimized.inputs.safetensors")
    save_file({"last_hidden_state": y}, OUT / "bert_optimized.ort.safetensors")


if __name__ == "__main__":
    main()
