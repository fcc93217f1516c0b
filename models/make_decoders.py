#!/usr/bin/env python3
"""Tiny Llama-class decoders (Llama, Qwen2, Mistral, Phi-3, Gemma, GPT-NeoX) as PyTorch's exporters write them, with
onnxruntime and PEFT goldens, in the layout of models/make_transformers.py (whose export,
inspection, adapter and check code this script reuses).

Run from the repository root:

    /work/pyenv/bin/python models/make_decoders.py [MODEL...]   # default: all of MODELS

It regenerates models/<name>_tiny/ for <name> in llama, qwen2, mistral, phi3, gemma, gpt_neox: <variant>.onnx with
<variant> in legacy_op14, legacy_op17, legacy_op17_dynamic (dynamic batch and sequence) and
dynamo_op20 (the torch.export-based exporter at the installed torch's default opset), each with
its <variant>.ort.safetensors; inputs.safetensors ("input_ids" int64 [2, 16], windows of
models/text/tiny_corpus.txt); peft_dora/ (DoRA, r=4, alpha=8 on every attention and MLP
projection (Phi-3: the fused qkv_proj and gate_up_proj; GPT-NeoX: query_key_value, dense,
dense_h_to_4h, dense_4h_to_h), B and m perturbed) and peft_dora_outputs.safetensors (PEFT's logits in float64).

models/llama_tiny/wrapped/<variant>.onnx (legacy_op17, dynamo_op20) export the same model held
by a wrapper module (`self.m`), so every module path carries the prefix `m.`, as exports of
hand-written wrappers do; <variant>.ort.safetensors are their onnxruntime outputs. PEFT's adapter
(made on the plain model) must apply to them.

Configurations, random weights from config classes (no downloads): hidden 32, 2 layers, 4 query
heads over 2 key/value heads (grouped-query attention), SiLU-gated MLP of 64, RMSNorm, rotary
embeddings (theta 10000), vocabulary 256 (bytes), untied LM head. Qwen2 adds q/k/v biases;
Mistral its sliding-window attention (window 8, shorter than the 16-token inputs, so the mask
matters). Phi-3 fuses q/k/v and gate/up into one projection each. Gemma scales the embedding by
sqrt(hidden), uses (1 + w) RMSNorm weights and a tanh-GELU-gated MLP (head_dim 8). GPT-NeoX has
LayerNorm, a fused query_key_value, parallel residuals, no grouped-query attention and rotary
embeddings on half of each head (rotary_pct 0.5: the partial-rotary Slice/Concat path).
"""

import sys
from pathlib import Path

import torch
from transformers import (GemmaConfig, GemmaForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

MODELS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(MODELS_DIR))
import make_transformers as mt  # noqa: E402

VARIANTS = ["legacy_op14", "legacy_op17", "legacy_op17_dynamic", "dynamo_op20"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]  # fused q/k/v and gate/up
NEOX_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


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


def neox_config():
    """GPT-NeoX has no grouped-query attention; rotary on half of each head (rotary_pct 0.5)."""
    c = common_config()
    del c["num_key_value_heads"], c["rope_theta"]
    return GPTNeoXConfig(**c, rotary_pct=0.5, rotary_emb_base=10000, use_parallel_residual=True,
                         hidden_dropout=0.0, attention_dropout=0.0)


def spec(cls, config, seed, targets=TARGETS):
    return dict(
        build=builder(cls, config, seed), export_cls=for_export(cls), inputs=mt.gpt2_inputs,
        input_names=["input_ids"], dynamic_out={0: "batch", 1: "seq"}, variants=VARIANTS,
        alt_same=lambda: {"input_ids": mt.corpus_windows()[1][2:4].clone()},
        alt_shape=lambda: {"input_ids": mt.corpus_windows()[1][4:7, :7].clone()},
        peft_targets=targets, fan_in_fan_out=False, task_type="CAUSAL_LM", peft_seed=seed + 10,
    )


MODELS = {
    "llama_tiny": spec(LlamaForCausalLM, LlamaConfig(**common_config()), 3001),
    "qwen2_tiny": spec(Qwen2ForCausalLM, Qwen2Config(**common_config(), use_sliding_window=False), 4001),
    "mistral_tiny": spec(MistralForCausalLM, MistralConfig(**common_config(), sliding_window=8), 5001),
    "phi3_tiny": spec(Phi3ForCausalLM, Phi3Config(**common_config(), partial_rotary_factor=1.0), 6001, PHI3_TARGETS),
    "gemma_tiny": spec(GemmaForCausalLM, GemmaConfig(**common_config(), head_dim=8), 7001),
    "gpt_neox_tiny": spec(GPTNeoXForCausalLM, neox_config(), 8001, NEOX_TARGETS),
}


def main():
    import onnx
    import onnxruntime as ort
    import peft
    import transformers

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}")
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    names = sys.argv[1:] or list(MODELS)
    for name in names:
        mt.make_one(name, MODELS[name])
    if "llama_tiny" in names:
        mt.make_wrapped("llama_tiny", MODELS["llama_tiny"], "model.layers.0.self_attn.q_proj")
    print("\nall checks passed")


if __name__ == "__main__":
    main()
