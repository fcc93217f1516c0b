#!/usr/bin/env python3
"""Tiny Llama-class decoders (Llama, Qwen2, Mistral) as PyTorch's exporters write them, with
onnxruntime and PEFT goldens, in the layout of models/make_transformers.py (whose export,
inspection, adapter and check code this script reuses).

Run from the repository root:

    /work/pyenv/bin/python models/make_decoders.py

It regenerates models/<name>_tiny/ for <name> in llama, qwen2, mistral: <variant>.onnx with
<variant> in legacy_op14, legacy_op17, legacy_op17_dynamic (dynamic batch and sequence) and
dynamo_op20 (the torch.export-based exporter at the installed torch's default opset), each with
its <variant>.ort.safetensors; inputs.safetensors ("input_ids" int64 [2, 16], windows of
models/text/tiny_corpus.txt); peft_dora/ (DoRA, r=4, alpha=8 on every attention and MLP
projection, B and m perturbed) and peft_dora_outputs.safetensors (PEFT's logits in float64).

models/llama_tiny/wrapped/<variant>.onnx (legacy_op17, dynamo_op20) export the same model held
by a wrapper module (`self.m`), so every module path carries the prefix `m.`, as exports of
hand-written wrappers do; <variant>.ort.safetensors are their onnxruntime outputs. PEFT's adapter
(made on the plain model) must apply to them.

Configurations, random weights from config classes (no downloads): hidden 32, 2 layers, 4 query
heads over 2 key/value heads (grouped-query attention), SiLU-gated MLP of 64, RMSNorm, rotary
embeddings (theta 10000), vocabulary 256 (bytes), untied LM head. Qwen2 adds q/k/v biases;
Mistral its sliding-window attention (window 8, shorter than the 16-token inputs, so the mask
matters).
"""

import sys
from pathlib import Path

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

MODELS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(MODELS_DIR))
import make_transformers as mt  # noqa: E402

VARIANTS = ["legacy_op14", "legacy_op17", "legacy_op17_dynamic", "dynamo_op20"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def common_config():
    return dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0, initializer_range=0.2,
                use_cache=False, tie_word_embeddings=False, attn_implementation="eager", bos_token_id=None,
                eos_token_id=None, pad_token_id=None)


def for_export(cls):
    """input_ids only, logits only, with the all-ones mask built in the graph (as GPT2ForExport)."""

    class ForExport(cls):
        def forward(self, input_ids):
            return super().forward(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                   use_cache=False).logits

    return ForExport


def builder(cls, config, seed):
    def build():
        torch.manual_seed(seed)
        m = cls(config)
        mt.randomize_small_params(m, seed + 1)
        return m.eval()

    return build


def spec(cls, config, seed):
    return dict(
        build=builder(cls, config, seed), export_cls=for_export(cls), inputs=mt.gpt2_inputs,
        input_names=["input_ids"], dynamic_out={0: "batch", 1: "seq"}, variants=VARIANTS,
        alt_same=lambda: {"input_ids": mt.corpus_windows()[1][2:4].clone()},
        alt_shape=lambda: {"input_ids": mt.corpus_windows()[1][4:7, :7].clone()},
        peft_targets=TARGETS, fan_in_fan_out=False, task_type="CAUSAL_LM", peft_seed=seed + 10,
    )


MODELS = {
    "llama_tiny": spec(LlamaForCausalLM, LlamaConfig(**common_config()), 3001),
    "qwen2_tiny": spec(Qwen2ForCausalLM, Qwen2Config(**common_config(), use_sliding_window=False), 4001),
    "mistral_tiny": spec(MistralForCausalLM, MistralConfig(**common_config(), sliding_window=8), 5001),
}


class Wrapper(torch.nn.Module):
    """Holds the model as `m`: the module paths of the export start with `m.`."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, input_ids):
        return self.m(input_ids)


def make_wrapped(name, s):
    base = s["build"]()
    model = Wrapper(mt.export_copy(base, s["export_cls"])).eval()
    feeds = s["inputs"]()
    folder = MODELS_DIR / name / "wrapped"
    folder.mkdir()
    y_torch = mt.torch_logits(base, feeds)
    print(f"\n  --- {name}/wrapped ---")
    for variant in ["legacy_op17", "dynamo_op20"]:
        path = folder / f"{variant}.onnx"
        mt.export(model, feeds, s["input_names"], s["dynamic_out"], path, variant)
        info = mt.describe(path, base)
        modules = {r["from_name"] or r["from_meta"] for r in info["linears"]}
        assert "m.model.layers.0.self_attn.q_proj" in modules, modules
        out = mt.run_ort(path, feeds)["logits"]
        err = (out - y_torch).abs().max().item()
        print(f"    ORT vs torch: {err:.2e}")
        assert err < mt.ORT_TOL
        mt.save_file({"logits": out.float().contiguous()}, str(folder / f"{variant}.ort.safetensors"))
    for p in folder.rglob("*"):
        p.chmod(0o644)
    folder.chmod(0o755)


def main():
    import onnx
    import onnxruntime as ort
    import peft
    import transformers

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}")
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    for name, s in MODELS.items():
        mt.make_one(name, s)
    make_wrapped("llama_tiny", MODELS["llama_tiny"])
    print("\nall checks passed")


if __name__ == "__main__":
    main()
