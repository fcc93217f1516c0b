#!/usr/bin/env python3
"""Writes models/quantized/: a small MLP whose weights ONNX Runtime's weight quantizer stored as
MatMulNBits (com.microsoft), the form of the `model_q4.onnx` files on the Hub, or quantized
dynamically, and onnxruntime's outputs on fixed inputs, for tests/quantized.rs.

    /work/pyenv/bin/python models/make_quantized.py     (torch, onnx, onnxruntime)

The MLP is Linear(48, 40) + GELU + Linear(40, 24, no bias), batch dynamic. K = 48 is not a
multiple of 32, so a block of 32 ends past the row. Variants (one file each):
  - q4_sym16:   4 bits, blocks of 16, symmetric (no zero points: the middle code, 8);
  - q4_asym32:  4 bits, blocks of 32, packed uint8 zero points;
  - q8_asym16:  8 bits, blocks of 16, uint8 zero points;
  - q4_float_zp_bias: q4_asym32 with its zero points as floats (the scales' type) and the first
    layer's bias moved into MatMulNBits' own bias input (input 5);
  - embed_uint4, embed_int4: an Embedding(100, 48) + Linear(48, 24) on token ids, its table
    quantized by the same quantizer into GatherBlockQuantized (4-bit codes of ONNX's uint4 type
    with uint4 zero points, asymmetric; or int4, symmetric; blocks of 16 along the 48) and its
    Linear into MatMulNBits; their inputs are `ids.safetensors` (ids [3, 5]);
  - dynamic_u8: ONNX Runtime's dynamic quantization (`quantize_dynamic`, uint8 weights): each
    activation quantized by DynamicQuantizeLinear, MatMulInteger, then the scales (the form of
    the Hub's `model_quantized.onnx`).
inputs.safetensors holds x [3, 2, 48]; <variant>.ort.safetensors holds onnxruntime's y.
`make_quantized.py VARIANT...` remakes those variants only.
"""
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
from safetensors.numpy import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quantized")


def base_model(path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(48, 40), torch.nn.GELU(), torch.nn.Linear(40, 24, bias=False)).eval()
    # A 3-D input: a Linear on a sequence exports as MatMul + Add, which the quantizer takes (a
    # 2-D one exports as Gemm, which it leaves alone).
    torch.onnx.export(net, (torch.randn(3, 2, 48),), path, dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return onnx.load(path)


def quantize(model, bits, block, symmetric):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # the quantizer rewrites the model it is given
    q = MatMulNBitsQuantizer(copy, bits=bits, block_size=block, is_symmetric=symmetric)
    q.process()
    return q.model.model


def float_zero_points_and_bias(model):
    """Zero points unpacked into the scales' type; the first Add's bias into input 5."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes = [n for n in g.node if n.op_type == "MatMulNBits"]
    for n in nodes:
        bits = next(a.i for a in n.attribute if a.name == "bits")
        k = next(a.i for a in n.attribute if a.name == "K")
        rows = next(a.i for a in n.attribute if a.name == "N")
        block = next(a.i for a in n.attribute if a.name == "block_size")
        blocks = -(-k // block)
        packed = numpy_helper.to_array(inits[n.input[3]]).reshape(rows, -1)
        codes = np.stack([(packed[:, b * bits // 8] >> (b * bits % 8)) & ((1 << bits) - 1) for b in range(blocks)], 1)
        scales = numpy_helper.to_array(inits[n.input[2]])
        inits[n.input[3]].CopyFrom(numpy_helper.from_array(codes.astype(scales.dtype).reshape(-1), n.input[3]))
    first = nodes[0]
    add = next(a for a in g.node if a.op_type == "Add" and first.output[0] in a.input)
    bias = next(i for i in add.input if i != first.output[0])
    while len(first.input) < 5:
        first.input.append("")
    first.input.append(bias)
    first.output[0] = add.output[0]
    g.node.remove(add)
    return model


def embedding_model(path):
    torch.manual_seed(1)

    class Embedded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(100, 48)
            self.proj = torch.nn.Linear(48, 24)

        def forward(self, ids):
            return self.proj(self.embed(ids))

    torch.onnx.export(Embedded().eval(), (torch.zeros(3, 5, dtype=torch.long),), path, dynamo=False, opset_version=17,
                      input_names=["ids"], output_names=["y"], dynamic_axes={"ids": {0: "batch"}, "y": {0: "batch"}})
    return onnx.load(path)


def quantize_embedding(model, symmetric):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    q = MatMulNBitsQuantizer(copy, bits=4, block_size=16, is_symmetric=symmetric,
                             op_types_to_quantize=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1)))
    q.process()
    return q.model.model


def main():
    only = set(sys.argv[1:])
    os.makedirs(OUT, exist_ok=True)
    base = base_model(os.path.join(OUT, "base.onnx"))
    x = np.random.default_rng(0).standard_normal((3, 2, 48)).astype(np.float32)
    save_file({"x": x}, os.path.join(OUT, "inputs.safetensors"))
    variants = {
        "q4_sym16": quantize(base, 4, 16, True),
        "q4_asym32": quantize(base, 4, 32, False),
        "q8_asym16": quantize(base, 8, 16, False),
    }
    variants["q4_float_zp_bias"] = float_zero_points_and_bias(quantize(base, 4, 32, False))
    quantize_dynamic(os.path.join(OUT, "base.onnx"), os.path.join(OUT, "dynamic_u8.onnx"), weight_type=QuantType.QUInt8)
    variants["dynamic_u8"] = onnx.load(os.path.join(OUT, "dynamic_u8.onnx"))
    embedded = embedding_model(os.path.join(OUT, "embedded.onnx"))
    variants["embed_uint4"] = quantize_embedding(embedded, False)
    variants["embed_int4"] = quantize_embedding(embedded, True)
    ids = np.random.default_rng(1).integers(0, 100, (3, 5)).astype(np.int64)
    save_file({"ids": ids}, os.path.join(OUT, "ids.safetensors"))
    os.remove(os.path.join(OUT, "embedded.onnx"))
    for name, m in variants.items():
        if only and name not in only:
            continue
        path = os.path.join(OUT, f"{name}.onnx")
        onnx.save(m, path)
        feed = {"ids": ids} if name.startswith("embed") else {"x": x}
        (y,) = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feed)
        save_file({"y": y}, os.path.join(OUT, f"{name}.ort.safetensors"))
        ops = sorted({n.op_type for n in m.graph.node})
        print(f"{name}: {os.path.getsize(path)} bytes, ops {ops}")
    os.remove(os.path.join(OUT, "base.onnx"))


if __name__ == "__main__":
    main()
