#!/usr/bin/env python3
"""Conv test cases with onnxruntime goldens: models/conv/<case>.onnx and <case>.safetensors
(the graph inputs X, and W where the filter bank is an input, plus onnxruntime's output Y).

Run from the repository root:

    /work/pyenv/bin/python models/make_conv.py

Cases cover 1-D, 2-D and 3-D Conv with strides, explicit (asymmetric) pads, every auto_pad mode,
dilations, groups (depthwise too), with and without bias, a ViT-style patch embedding, and a
filter bank that is a graph input rather than an initializer. Fixed seed: two runs give the
same files.
"""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

OUT = Path(__file__).resolve().parent / "conv"

# name: (X shape, W shape, bias, attributes, W is a graph input)
CASES = {
    "conv2d_pads": ([2, 3, 7, 7], [4, 3, 3, 3], True, dict(pads=[1, 1, 1, 1]), False),
    "conv2d_strides_dilations": ([1, 2, 9, 8], [3, 2, 3, 2], False,
                                 dict(strides=[2, 1], dilations=[2, 1], pads=[1, 0, 2, 1]), False),
    "conv2d_groups": ([2, 4, 6, 6], [6, 2, 3, 3], True, dict(group=2), False),
    "conv2d_depthwise": ([1, 4, 5, 5], [4, 1, 3, 3], False, dict(group=4, pads=[1, 1, 1, 1]), False),
    "conv1d": ([2, 3, 10], [5, 3, 4], True, dict(strides=[2], pads=[1, 2]), False),
    "conv2d_same_upper": ([1, 2, 7, 6], [3, 2, 3, 3], True, dict(strides=[2, 2], auto_pad="SAME_UPPER"), False),
    "conv2d_same_lower": ([1, 2, 7, 6], [3, 2, 4, 3], False, dict(strides=[2, 1], auto_pad="SAME_LOWER"), False),
    "conv2d_valid": ([1, 3, 6, 5], [2, 3, 2, 2], True, dict(auto_pad="VALID", kernel_shape=[2, 2]), False),
    "conv2d_patch": ([2, 3, 16, 16], [8, 3, 4, 4], True, dict(strides=[4, 4]), False),
    "conv3d": ([1, 2, 4, 5, 4], [3, 2, 2, 3, 2], True, dict(pads=[1, 0, 1, 0, 1, 1]), False),
    "conv2d_filter_input": ([1, 2, 5, 5], [3, 2, 3, 3], False, dict(pads=[1, 1, 0, 0]), True),
}


def make(name, xs, ws, bias, attrs, w_input, rng):
    x = rng.standard_normal(xs).astype(np.float32)
    w = (rng.standard_normal(ws) / np.sqrt(np.prod(ws[1:]))).astype(np.float32)
    b = rng.standard_normal(ws[0]).astype(np.float32)
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, xs)]
    inits = []
    if w_input:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, ws))
    else:
        inits.append(numpy_helper.from_array(w, "conv.weight"))
    names = ["X", "W" if w_input else "conv.weight"]
    if bias:
        inits.append(numpy_helper.from_array(b, "conv.bias"))
        names.append("conv.bias")
    node = helper.make_node("Conv", names, ["Y"], name="/conv/Conv", **attrs)
    graph = helper.make_graph([node], name, inputs,
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [f"y{i}" for i in range(len(xs))])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = OUT / f"{name}.onnx"
    onnx.save(model, path)
    feeds = {"X": x, **({"W": w} if w_input else {})}
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    save_file({**feeds, "Y": y}, str(OUT / f"{name}.safetensors"))
    print(f"{name}: X {xs} W {ws} -> Y {list(y.shape)}")


def main():
    OUT.mkdir(exist_ok=True)
    rng = np.random.default_rng(2402)
    for name, spec in CASES.items():
        make(name, *spec, rng)


if __name__ == "__main__":
    main()
