#!/usr/bin/env python3
"""Writes PEFT adapters trained (here: drawn at random) on the Hugging Face models that
models/make_genai.py hands to onnxruntime-genai's builder, and PyTorch's outputs with each, for
tests/genai.rs: an adapter made in PyTorch applies to the builder's export, whose modules are
renamed (`self_attn` -> `attn`, Phi's `dense` -> `o_proj`) and packed (`q_proj`, `k_proj`,
`v_proj` -> `qkv_proj`; Phi-3's `gate_up_proj` -> `gate_proj`, `up_proj`).

    /work/pyenv/bin/python models/make_genai_peft.py      (torch, transformers, peft, onnx)

Per adapter, `models/genai/<variant>/<adapter>/` (adapter_config.json, adapter_model.safetensors)
and `<adapter>.ort.safetensors`: onnxruntime's outputs on `prompt.inputs.safetensors` of the
builder's export of the model PEFT merged the adapter into (`merge_and_unload`). That, not
PyTorch's output, is the reference: the builder's Phi computes GELU and its norms its own way
(5.7e-3 from PyTorch's logits on the base model), and the adapter must change nothing else. The
script prints how far PyTorch's PEFT model is from it.
  - llama/peft_dora:  DoRA on q_proj and v_proj (no k_proj: its block of qkv_proj keeps the
                      base weights), o_proj, gate_proj, down_proj;
  - llama/peft_lora:  LoRA with rsLoRA on q_proj, k_proj, v_proj;
  - phi/peft_dora:    DoRA on q_proj, k_proj (rank 2), v_proj (alpha 16), dense and fc1;
  - phi3/peft_dora:   DoRA on qkv_proj, o_proj, gate_up_proj and down_proj.
"""
import tempfile

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import peft
import torch
from safetensors.numpy import load_file, save_file

import make_genai as G

ADAPTERS = {
    ("llama", "peft_dora"): dict(use_dora=True, r=4, lora_alpha=8,
                                 target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]),
    ("llama", "peft_lora"): dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj"]),
    ("phi", "peft_dora"): dict(use_dora=True, r=4, lora_alpha=8, rank_pattern={"k_proj": 2},
                               alpha_pattern={"v_proj": 16}, target_modules=["q_proj", "k_proj", "v_proj", "dense", "fc1"]),
    ("phi3", "peft_dora"): dict(use_dora=True, r=4, lora_alpha=8,
                                target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
}


def hf_model(arch):
    """The model make_genai.py gave the builder: same config, same seed."""
    config, model, extra = G.ARCHS[arch]
    torch.manual_seed(0)
    return model(config(**{**G.SMALL, **extra})).eval()


def check_same_weights(model, folder):
    """The builder's lm_head is the Hugging Face one, transposed: else the seed drew other weights."""
    onnx_model = onnx.load(folder / "model.onnx", load_external_data=False)
    onnx.load_external_data_for_model(onnx_model, str(folder))
    w = next(t for t in onnx_model.graph.initializer if t.name.startswith("lm_head"))
    got = onnx.numpy_helper.to_array(w)
    want = model.lm_head.weight.detach().numpy().T
    assert np.array_equal(got, want), f"{folder}: the Hugging Face model is not the one exported"


def randomize(model, seed):
    """A trained adapter's values: B and the magnitudes moved away from PEFT's initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def main():
    for (arch, name), config in ADAPTERS.items():
        folder = G.OUT / arch
        base = hf_model(arch)
        check_same_weights(base, folder)
        model = peft.get_peft_model(base, peft.LoraConfig(**config))
        randomize(model, seed=len(name) + len(arch))
        model.save_pretrained(folder / name)
        inputs = load_file(folder / "prompt.inputs.safetensors")
        with torch.no_grad():
            torch_logits = model(input_ids=torch.from_numpy(inputs["input_ids"]),
                                 attention_mask=torch.from_numpy(inputs["attention_mask"])).logits.numpy()
        with tempfile.TemporaryDirectory() as tmp:
            G.export(model.merge_and_unload(), tmp)
            sess = ort.InferenceSession(f"{tmp}/model.onnx")
            names = [o.name for o in sess.get_outputs()]
            out = dict(zip(names, sess.run(None, inputs)))
        save_file(out, folder / f"{name}.ort.safetensors")
        gap = np.abs(torch_logits - out["logits"]).max() / np.abs(out["logits"]).max()
        # PEFT writes a README.md beside the adapter, with the hub's model card template.
        (folder / name / "README.md").unlink(missing_ok=True)
        print(f"{arch}/{name}: PyTorch's PEFT model is {gap:.2e} from onnxruntime's merged export")


if __name__ == "__main__":
    main()
