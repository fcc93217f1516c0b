#!/usr/bin/env python3
"""Writes models/genai/: tiny decoders as onnxruntime-genai's model builder exports them (the
`model.onnx` of the Hub's `*-onnx` repositories, run by onnxruntime-genai), with onnxruntime's
outputs on fixed inputs, for tests/genai.rs. No model hub: random weights, a word-level tokenizer.

    /work/pyenv/bin/python models/make_genai.py     (torch, transformers, onnx, onnxruntime,
                                                    onnxruntime-genai, tokenizers)

The builder (onnxruntime-genai 0.18) imports transformers 5, which Optimum's pin (4.57) rules out
of a shared venv: install it aside and name the folder in GENAI_TRANSFORMERS (default
/work/scratch/tfnew), which this script puts first on the builder's PYTHONPATH only:
    pip install --target /work/scratch/tfnew --no-deps transformers tokenizers huggingface_hub

Variants (`models/genai/<variant>/model.onnx` and its `model.onnx.data`):
  - llama: Llama, 2 query heads of 16 sharing 1 key/value head; packed QKV into
    GroupQueryAttention (rotary inside), SimplifiedLayerNormalization and
    SkipSimplifiedLayerNormalization;
  - qwen3: Qwen3, whose per-head Q and K norms make the builder pass Q, K and V separately,
    with a softcap of 5 set on its attention (the builder writes one for Gemma 2);
  - phi: Phi-2 style, 2 heads of 32, no grouping, rotary over half of each head, LayerNorm and
    SkipLayerNormalization with a bias, GELU;
  - phi3: Phi-3, whose Hugging Face model packs qkv_proj and gate_up_proj (the builder splits
    gate_up_proj into gate_proj and up_proj);
  - qwen2_int4: Qwen2 with its embedding tied to the LM head, quantized to int4 by the builder:
    MatMulNBits, and the table a GatherBlockQuantized reads through a Reshape of the LM head's
    codes (accuracy_level set to 0, see INT4);
  - llama_window: the llama model with its GroupQueryAttention attributes edited to a local
    window of 2 keys and interleaved rotary pairs (ONNX Runtime computes them; the builder
    writes a window for Gemma 2, with a window-sized cache that dorac refuses). With both a window and a softcap, ONNX
    Runtime's padding rows of a padded prompt differ from dorac's (they are padding).
Cases (`<variant>/<case>.inputs.safetensors` and `<case>.ort.safetensors`, every output):
  - prompt:        batch 2, 5 tokens, an empty cache;
  - padded:        batch 2, 5 tokens, the second sequence 3 tokens long (attention mask 0 after);
  - decode:        1 token after `prompt`'s cache;
  - ragged_decode: 1 token after `padded`'s cache, each sequence at its own length (3 and 5);
  - chunk:         batch 1, 3 tokens after a 5-token prompt (ONNX Runtime's subsequent prompt).
train.safetensors: 6 sequences of 8 tokens (input_ids, attention_mask, labels) for `dorac train`.
"""
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers as T
from safetensors.numpy import save_file

ROOT = pathlib.Path(__file__).resolve().parent
OUT = ROOT / "genai"
TRANSFORMERS5 = os.environ.get("GENAI_TRANSFORMERS", "/work/scratch/tfnew")
# Not 64, the MLP's width: the builder takes a [32, 64] gate_proj for the lm_head when the two
# shapes agree, and wires the logits to the first layer's norm (see also phi3 below).
VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False)
ARCHS = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {"head_dim": 16}),
    "phi": (T.PhiConfig, T.PhiForCausalLM, {"hidden_size": 64, "num_key_value_heads": 2, "partial_rotary_factor": 0.5}),
    # Hugging Face's packed qkv_proj and gate_up_proj, which the builder writes as qkv_proj and as
    # gate_proj and up_proj. An original context other than the model's makes it a LongRoPE one.
    # The builder finds the lm_head by its shape: no layer may have [vocab, hidden] (a qkv_proj of
    # 2 + 2 * 2 heads of 16, a gate_up_proj of 2 * 48).
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, {"intermediate_size": 40, "original_max_position_embeddings": 32,
                                               "pad_token_id": 0, "bos_token_id": VOCAB - 2, "eos_token_id": VOCAB - 1}),
    # int4 (below), with the embedding tied to the LM head as Qwen2.5-0.5B and Llama-3.2-1B have it.
    "qwen2_int4": (T.Qwen2Config, T.Qwen2ForCausalLM, {"tie_word_embeddings": True}),
}
# Variants the builder quantizes (-p int4): MatMulNBits layers, and a tied embedding as a
# GatherBlockQuantized reading the LM head's codes. The builder asks for accuracy_level 4, with
# which onnxruntime's CPU quantizes activations to int8; the files here say 0, so that
# onnxruntime computes the float product of the dequantized weights, as dorac does.
INT4 = {"qwen2_int4"}


def tokenizer(folder):
    """A word-level tokenizer over VOCAB tokens: the builder copies one beside the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"t{i}": i for i in range(VOCAB - 3)}
    vocab.update({"<unk>": VOCAB - 3, "<s>": VOCAB - 2, "</s>": VOCAB - 1})
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    T.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>",
                              eos_token="</s>").save_pretrained(folder)


def build(arch, out, **attention):
    config, model, extra = ARCHS[arch]
    torch.manual_seed(0)
    export(model(config(**{**SMALL, **extra})).eval(), out / "build", "int4" if arch in INT4 else "fp32")
    if arch in INT4:
        float_accuracy(out / "build")
    if attention:
        edit_attention(out / "build", out, **attention)
    else:
        for f in ("model.onnx", "model.onnx.data"):
            shutil.move(out / "build" / f, out / f)
    shutil.rmtree(out / "build")


def export(model, out, precision="fp32"):
    """The builder's CPU export of a Hugging Face model, into the folder `out`."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tokenizer(tmp)
        env = dict(os.environ, PYTHONPATH=TRANSFORMERS5)
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", tmp, "-o", out,
                        "-p", precision, "-e", "cpu"], env=env, check=True, capture_output=True)


def float_accuracy(folder):
    """MatMulNBits' accuracy_level set to 0 in folder/model.onnx (see INT4)."""
    m = onnx.load(folder / "model.onnx")
    for n in m.graph.node:
        for a in n.attribute:
            if a.name == "accuracy_level":
                a.i = 0
    (folder / "model.onnx.data").unlink()
    onnx.save(m, folder / "model.onnx", save_as_external_data=True, location="model.onnx.data")


def edit_attention(src, dst, **attrs):
    """A copy of a model with these GroupQueryAttention attributes set."""
    m = onnx.load(src / "model.onnx")
    for n in m.graph.node:
        if n.op_type == "GroupQueryAttention":
            keep = [a for a in n.attribute if a.name not in attrs]
            del n.attribute[:]
            n.attribute.extend(keep + [onnx.helper.make_attribute(k, v) for k, v in attrs.items()])
    # onnx appends to an existing data file.
    (dst / "model.onnx.data").unlink(missing_ok=True)
    onnx.save(m, dst / "model.onnx", save_as_external_data=True, location="model.onnx.data")


def head_size(arch):
    config = {**SMALL, **ARCHS[arch][2]}
    return config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])


def cases(folder, head):
    model = onnx.load(folder / "model.onnx", load_external_data=False)
    sess = ort.InferenceSession(str(folder / "model.onnx"))
    names = [o.name for o in model.graph.output]
    pasts = [i for i in model.graph.input if i.name.startswith("past_key_values")]
    rng = np.random.default_rng(0)

    def feed(batch, seq, mask, cache=None):
        f = {"input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64),
             "attention_mask": np.asarray(mask, np.int64)}
        for p in pasts:
            heads = p.type.tensor_type.shape.dim[1].dim_value
            f[p.name] = (cache[p.name.replace("past_key_values", "present")] if cache is not None
                         else np.zeros((batch, heads, 0, head), np.float32))
        return f

    def run(name, f):
        out = dict(zip(names, sess.run(None, f)))
        save_file(f, folder / f"{name}.inputs.safetensors")
        save_file(out, folder / f"{name}.ort.safetensors")
        return out

    prompt = run("prompt", feed(2, 5, np.ones((2, 5))))
    padded = run("padded", feed(2, 5, [[1] * 5, [1, 1, 1, 0, 0]]))
    run("decode", feed(2, 1, np.ones((2, 6)), prompt))
    run("ragged_decode", feed(2, 1, [[1] * 6, [1, 1, 1, 0, 0, 1]], padded))
    first = dict(zip(names, sess.run(None, feed(1, 5, np.ones((1, 5))))))
    run("chunk", feed(1, 3, np.ones((1, 8)), first))


def main():
    """`make_genai.py [VARIANT...]` remakes only those variants (all by default)."""
    only = set(sys.argv[1:])
    OUT.mkdir(exist_ok=True)
    for arch in ARCHS:
        if only and arch not in only:
            continue
        folder = OUT / arch
        folder.mkdir(exist_ok=True)
        build(arch, folder, **({"softcap": 5.0} if arch == "qwen3" else {}))
        cases(folder, head_size(arch))
    if not only or "llama_window" in only:
        window = OUT / "llama_window"
        window.mkdir(exist_ok=True)
        edit_attention(OUT / "llama", window, local_window_size=2, rotary_interleaved=1)
        cases(window, head_size("llama"))
    if not only:
        ids = np.random.default_rng(1).integers(0, VOCAB, (6, 8)).astype(np.int64)
        save_file({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}, OUT / "train.safetensors")
    for f in sorted(OUT.rglob("*")):
        if f.is_file():
            print(f"{f.relative_to(OUT)}: {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
