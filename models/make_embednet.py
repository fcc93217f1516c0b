#!/usr/bin/env python3
"""A token model with PEFT DoRA on its Embedding (PEFT's DoraEmbeddingLayer) and its Linear head:
onnxruntime, PEFT inference and PEFT training goldens for dorac's embedding adapters.

Run from the repository root:

    /work/pyenv/bin/python models/make_embednet.py

It writes models/embednet/ in the layout of models/convnet/ (see make_convnet.py): model.onnx
(legacy exporter, opset 17, input "x" int64 ids [4, 6], output "y" [4, 6, 5]), inputs.safetensors,
ort_outputs.safetensors, peft_dora/ (DoRA r 2, alpha 4 on `embed` and `fc`, B and m perturbed;
the embedding's tensors under PEFT's keys lora_embedding_A [r, 40] and lora_embedding_B [8, r]),
peft_dora_outputs.safetensors (float64), train/data.safetensors ("x", "target") and
train/dora_mse.safetensors (one AdamW step on the MSE, float64).

EmbedNet: Embedding(40, 8) -> tanh -> Linear(8, 5). Fixed seeds: two runs give the same files.
"""

import copy
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from make_convnet import DTYPE, export_with_golden, perturb, train_golden

OUT = Path(__file__).resolve().parent / "embednet"


class EmbedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(40, 8)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.tanh(self.embed(x)))


def main():
    torch.manual_seed(2403)
    torch.set_num_threads(1)
    OUT.mkdir(exist_ok=True)
    base = EmbedNet().eval()
    x = torch.randint(0, 40, (4, 6))
    target = torch.randn(4, 6, 5)
    y_torch = export_with_golden(base, x, OUT)

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["embed", "fc"], use_dora=True, lora_dropout=0.0)
    peft_model = get_peft_model(copy.deepcopy(base).to(DTYPE), config)
    with torch.no_grad():  # PEFT initialises an embedding's A to zero and B randomly: draw A too
        g = torch.Generator().manual_seed(5)
        a = peft_model.base_model.model.embed.lora_embedding_A["default"]
        a.copy_(torch.randn(a.shape, generator=g, dtype=a.dtype) * 0.3)
    perturb(peft_model, 7)
    peft_model.save_pretrained(str(OUT / "peft_dora"))
    (OUT / "peft_dora" / "README.md").unlink()
    with torch.no_grad():
        y_peft = peft_model(x)
    effect = (y_peft - y_torch.to(DTYPE)).abs().max().item()
    assert effect > 1e-2, effect
    save_file({"y": y_peft.contiguous()}, str(OUT / "peft_dora_outputs.safetensors"))
    print("adapter tensors:", {k: list(v.shape) for k, v in peft_model.state_dict().items() if "lora" in k})
    train_golden(peft_model, x, target, OUT)
    print(f"PEFT effect {effect:.3e}")


if __name__ == "__main__":
    main()
