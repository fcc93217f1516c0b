#!/usr/bin/env python3
"""Half-precision exports for dorac's half-storage checks (tests/pipeline.rs):

    /work/pyenv/bin/python models/make_half.py

writes models/half/:

    mlp_f16.onnx, mlp_bf16.onnx  Linear(64, 96) -> ReLU -> Linear(96, 32), torch .half() /
                                 .bfloat16(), legacy exporter, opset 17: every initializer is
                                 FLOAT16 / BFLOAT16 and the graph computes in that type
    inputs.safetensors           "x" float32 [4, 64], values exactly representable in f16
    ort_f16.safetensors          "y": onnxruntime CPU on mlp_f16.onnx (computes in f16), as f32
    exact_f16.safetensors,       "y": the same half weights and input in float64 numpy, as f32:
    exact_bf16.safetensors       what dorac (f32 compute on half-stored weights) should give
                                 (onnxruntime has no bfloat16 Gemm on CPU)
"""

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from safetensors.numpy import save_file

OUT = Path(__file__).resolve().parent / "half"


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 96)
        self.fc2 = torch.nn.Linear(96, 32)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def weights_f64(path):
    """The initializers of an exported model, decoded exactly, as float64."""
    out = {}
    for t in onnx.load(path).graph.initializer:
        if t.data_type == onnx.TensorProto.BFLOAT16:
            bits = np.frombuffer(t.raw_data, dtype=np.uint16).astype(np.uint32) << 16
            out[t.name] = bits.view(np.float32).reshape(t.dims).astype(np.float64)
        else:
            out[t.name] = numpy_helper.to_array(t).astype(np.float64)
    return out


def exact(path, x):
    w = weights_f64(path)
    h = np.maximum(x @ w["fc1.weight"].T + w["fc1.bias"], 0.0)
    return (h @ w["fc2.weight"].T + w["fc2.bias"]).astype(np.float32)


def main():
    OUT.mkdir(exist_ok=True)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    x16 = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float16)
    x = x16.astype(np.float64)
    save_file({"x": x16.astype(np.float32)}, str(OUT / "inputs.safetensors"))
    for dtype, tag in [(torch.float16, "f16"), (torch.bfloat16, "bf16")]:
        path = str(OUT / f"mlp_{tag}.onnx")
        model = Mlp().to(dtype)
        example = torch.from_numpy(x16.astype(np.float32)).to(dtype)
        torch.onnx.export(model, (example,), path, input_names=["x"], output_names=["y"],
                          dynamo=False, opset_version=17)
        onnx.checker.check_model(path)
        save_file({"y": exact(path, x)}, str(OUT / f"exact_{tag}.safetensors"))
    y = ort.InferenceSession(str(OUT / "mlp_f16.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x16})[0]
    save_file({"y": y.astype(np.float32)}, str(OUT / "ort_f16.safetensors"))
    ex = exact(str(OUT / "mlp_f16.onnx"), x)
    print("onnxruntime (f16 compute) vs exact:", float(np.abs(y - ex).max() / np.abs(ex).max()))


if __name__ == "__main__":
    main()
