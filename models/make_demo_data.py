"""Makes models/demo/teacher.safetensors: a regression data set on which `dorac train` visibly
learns within a minute on a software Vulkan device.

The inputs are random; the targets are the outputs of mlp2d with PEFT's DoRA adapter
(models/mlp2d/peft_dora) applied. Training a fresh DoRA adapter on the base mlp2d has to move the
model towards that teacher, so the loss falls from the base-vs-teacher gap towards zero.

Usage: /work/pyenv/bin/python models/make_demo_data.py  (needs torch, peft, safetensors)
"""
import pathlib

import numpy as np
import torch
from peft import PeftModel
from safetensors.numpy import save_file

import make_models as mm

ROOT = pathlib.Path(__file__).resolve().parent


def main():
    torch.manual_seed(1234)
    spec = next(s for s in mm.SPECS if s["name"] == "mlp2d")
    torch.manual_seed(spec["seed"])  # the same weights as models/mlp2d/model.onnx
    base = spec["build"]().eval()
    torch.manual_seed(4321)
    teacher = PeftModel.from_pretrained(base, str(ROOT / "mlp2d" / "peft_dora")).eval()
    x = torch.randn(1024, 16)
    with torch.no_grad():
        y = teacher(x)
    out = ROOT / "demo"
    out.mkdir(exist_ok=True)
    save_file({"x": x.numpy().astype(np.float32), "target": y.numpy().astype(np.float32)},
              str(out / "teacher.safetensors"))
    print("wrote", out / "teacher.safetensors", x.shape, y.shape)


if __name__ == "__main__":
    main()
