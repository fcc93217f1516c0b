#!/usr/bin/env python3
"""A small CNN with PEFT DoRA on its Conv layers (PEFT's DoraConv2dLayer) and its Linear head:
onnxruntime, PEFT inference and PEFT training goldens for dorac's Conv adapters.

Run from the repository root:

    /work/pyenv/bin/python models/make_convnet.py

It writes models/convnet/:

    model.onnx                   ConvNet (below), legacy exporter, opset 17, input x [4, 3, 8, 8]
    inputs.safetensors           "x"
    ort_outputs.safetensors      onnxruntime's "y" [4, 5]
    peft_dora/                   PEFT DoRA (r 2, alpha 4) on conv1, conv2 and fc; B and the
                                 magnitude perturbed so that the adapter changes the output.
                                 Conv tensors keep PEFT's Conv shapes: lora_A [r, C, kh, kw],
                                 lora_B [out, r, 1, 1], lora_magnitude_vector [1, out, 1, 1]
    peft_dora_outputs.safetensors PEFT's output "y" (float64) with that adapter
    train/data.safetensors       "x" and the MSE "target" [4, 5]
    train/dora_mse.safetensors   one AdamW step (lr 1e-2, PyTorch defaults otherwise) of PEFT DoRA
                                 on the MSE, float64: "loss", and per trainable tensor
                                 "grad.<module>.<lora_A|lora_B|magnitude>", "after.", "exp_avg.",
                                 "exp_avg_sq." in PEFT's shapes

ConvNet: Conv2d(3, 6, 3, stride 2, padding 1) -> ReLU -> Conv2d(6, 8, 2, stride 2, dilation 1)
-> ReLU -> flatten -> Linear(32, 5). Fixed seeds: two runs give the same files.
"""

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent / "convnet"
DTYPE = torch.float64


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(6, 8, 2, stride=2)
        self.fc = torch.nn.Linear(32, 5)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        return self.fc(h.flatten(1))


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if hasattr(mod, "lora_B") and "default" in mod.lora_B:
                b = mod.lora_B["default"].weight
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.3)
                m = mod.lora_magnitude_vector["default"].weight
                m.mul_(1 + 0.2 * torch.randn(m.shape, generator=g, dtype=m.dtype))


def export_with_golden(base, x, out_dir):
    """model.onnx (legacy exporter, opset 17, input "x", output "y"), inputs.safetensors and
    onnxruntime's ort_outputs.safetensors, checked against torch; returns torch's output."""
    path = out_dir / "model.onnx"
    torch.onnx.export(base, (x,), str(path), input_names=["x"], output_names=["y"], opset_version=17,
                      dynamo=False, do_constant_folding=True)
    y_ort = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        y_torch = base(x)
    assert np.abs(y_ort - y_torch.numpy()).max() < 1e-5
    save_file({"x": x}, str(out_dir / "inputs.safetensors"))
    save_file({"y": torch.from_numpy(y_ort)}, str(out_dir / "ort_outputs.safetensors"))
    return y_torch


def train_golden(peft_model, x, target, out_dir):
    """train/data.safetensors and train/dora_mse.safetensors: one AdamW step (lr 1e-2) on the MSE."""
    peft_model.train()
    params = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for _, p in params], lr=1e-2)
    opt.zero_grad()
    x_in = x.to(DTYPE) if x.is_floating_point() else x
    loss = torch.nn.functional.mse_loss(peft_model(x_in), target.to(DTYPE))
    loss.backward()
    out = {"loss": loss.detach().reshape([])}
    grads = {n: p.grad.detach().clone() for n, p in params}
    opt.step()
    for n, p in params:
        module = n.removeprefix("base_model.model.").split(".lora_")[0]
        role = ("lora_A" if ".lora_A." in n or ".lora_embedding_A." in n
                else "lora_B" if ".lora_B." in n or ".lora_embedding_B." in n else "magnitude")
        key = f"{module}.{role}"
        st = opt.state[p]
        out[f"grad.{key}"] = grads[n]
        out[f"after.{key}"] = p.detach().clone()
        out[f"exp_avg.{key}"] = st["exp_avg"].detach().clone()
        out[f"exp_avg_sq.{key}"] = st["exp_avg_sq"].detach().clone()
    (out_dir / "train").mkdir(exist_ok=True)
    save_file({"x": x, "target": target}, str(out_dir / "train" / "data.safetensors"))
    save_file({k: v.to(DTYPE).contiguous() for k, v in sorted(out.items())},
              str(out_dir / "train" / "dora_mse.safetensors"))
    print(f"loss {loss.item():.6f}, {len(params)} trainable tensors")


def main():
    torch.manual_seed(2402)
    torch.set_num_threads(1)
    OUT.mkdir(exist_ok=True)
    (OUT / "train").mkdir(exist_ok=True)
    base = ConvNet().eval()
    x = torch.randn(4, 3, 8, 8)
    target = torch.randn(4, 5)

    y_torch = export_with_golden(base, x, OUT)

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "fc"], use_dora=True,
                        lora_dropout=0.0)
    peft_model = get_peft_model(copy.deepcopy(base).to(DTYPE), config)
    perturb(peft_model, 7)
    peft_model.save_pretrained(str(OUT / "peft_dora"))
    (OUT / "peft_dora" / "README.md").unlink()  # PEFT's model card template
    with torch.no_grad():
        y_peft = peft_model(x.to(DTYPE))
    effect = (y_peft - y_torch.to(DTYPE)).abs().max().item()
    assert effect > 1e-2, effect
    save_file({"y": y_peft.contiguous()}, str(OUT / "peft_dora_outputs.safetensors"))
    shapes = {k: list(v.shape) for k, v in peft_model.state_dict().items() if "lora" in k}
    print("adapter tensors:", shapes)

    train_golden(peft_model, x, target, OUT)
    print(f"PEFT effect {effect:.3e}")


if __name__ == "__main__":
    main()
