#!/usr/bin/env python3
"""Runs dorac on `transformers` architectures that the test suite has no model of (not run by the
tests or CI, which need no Python; no model hub: random weights from config classes).

For each architecture: a two-layer model of width 32 is exported to ONNX (the TorchScript
exporter at opset 17 with dynamic batch and sequence, or with DYNAMO=1 the torch.export-based
one at opset 20, static shapes), and onnxruntime's output is the golden. Then
  - `dorac run` on the GPU against onnxruntime;
  - `dorac rewrite` (DoRA at PEFT's initialisation on every linear layer) in onnxruntime against
    the base model's output;
  - for models with a head, two steps of `dorac train` (the lm loss for decoders, cross-entropy
    for classifiers and, per token, for encoder-decoders) on the GPU and on the `--reference`
    executor: the same losses, and the
    largest difference between the two adapters, relative to each tensor's largest value.
    (AdamW's first steps divide by the gradients' own size, so elements whose gradient is near
    zero may differ by some 1e-3 of a tensor's largest value between f32 and f64.)

Usage (from the repository root, after `cargo build --release`; `DORAC=path` runs another binary):
    /path/to/venv/bin/python models/verify_architectures.py [ARCH...]      # default: all
    DYNAMO=1 /path/to/venv/bin/python models/verify_architectures.py gptj swin dinov2

Architectures that do not get as far as dorac, with why (as of transformers 5.25, torch 2.15):
Mixtral (torch's exporter has no `aten::histc`), Whisper (nor `aten::diff`), Cohere (its export
fails in onnxruntime),
ViT-MAE (random masking: RandomUniformLike), DINOv2 with registers (no ONNX form of antialiased
bicubic upsampling). The tiny MobileViT's output is all zeros and the tiny MobileNetV2's the same
for every image: for them the check shows only that dorac runs them.
"""
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import traceback

import numpy as np
import onnxruntime as ort
import torch
import transformers as tf
from safetensors.numpy import load_file, save_file

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models"))
from verify_transformers import rel  # noqa: E402
DORAC = os.environ.get("DORAC", ROOT / "target" / "release" / "dorac")
T = tf

DECODER = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, use_cache=False, tie_word_embeddings=False,
               attn_implementation="eager", bos_token_id=None, eos_token_id=None, pad_token_id=None)
ENCODER = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64, attn_implementation="eager")
SEQ2SEQ = dict(vocab_size=256, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
              patch_size=8, num_channels=3, attn_implementation="eager")
# Keys that other configs name differently; `None` drops a default.
NO_LLAMA_NAMES = dict(hidden_size=None, num_hidden_layers=None, num_attention_heads=None, num_key_value_heads=None,
                      intermediate_size=None, max_position_embeddings=None)


def config(kind, cfg, overrides):
    base = {"dec": DECODER, "enc": ENCODER, "s2s": SEQ2SEQ, "vis": VISION}[kind]
    merged = {**base, **overrides}
    return cfg(**{k: v for k, v in merged.items() if v is not None})


def arch(kind, cls, cfg, **overrides):
    return lambda: (kind, cls, config(kind, cfg, overrides))


ARCHS = {
    # Decoders (logits of a causal LM).
    "opt": arch("dec", T.OPTForCausalLM, T.OPTConfig, ffn_dim=64, num_key_value_heads=None, intermediate_size=None,
                word_embed_proj_dim=32),
    "falcon": arch("dec", T.FalconForCausalLM, T.FalconConfig, num_key_value_heads=None, intermediate_size=None,
                   new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False, alibi=False),
    "bloom": arch("dec", T.BloomForCausalLM, T.BloomConfig, n_layer=2, n_head=4, **NO_LLAMA_NAMES),
    "gptj": arch("dec", T.GPTJForCausalLM, T.GPTJConfig, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64,
                 **NO_LLAMA_NAMES),
    "gpt_neo": arch("dec", T.GPTNeoForCausalLM, T.GPTNeoConfig, num_layers=2, num_heads=4, window_size=4,
                    attention_types=[[["global", "local"], 1]], num_hidden_layers=None, num_attention_heads=None,
                    num_key_value_heads=None, intermediate_size=None),
    "codegen": arch("dec", T.CodeGenForCausalLM, T.CodeGenConfig, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                    n_positions=64, n_ctx=64, **NO_LLAMA_NAMES),
    "gpt_bigcode": arch("dec", T.GPTBigCodeForCausalLM, T.GPTBigCodeConfig, n_embd=32, n_layer=2, n_head=4,
                        n_positions=64, multi_query=True, **NO_LLAMA_NAMES),
    "mpt": arch("dec", T.MptForCausalLM, T.MptConfig, d_model=32, n_heads=4, n_layers=2, expansion_ratio=2,
                max_seq_len=64, **NO_LLAMA_NAMES),
    "xglm": arch("dec", T.XGLMForCausalLM, T.XGLMConfig, d_model=32, num_layers=2, attention_heads=4, ffn_dim=64,
                 hidden_size=None, num_hidden_layers=None, num_attention_heads=None, num_key_value_heads=None,
                 intermediate_size=None),
    "biogpt": arch("dec", T.BioGptForCausalLM, T.BioGptConfig, num_key_value_heads=None),
    "phi": arch("dec", T.PhiForCausalLM, T.PhiConfig, partial_rotary_factor=0.5),
    "stablelm": arch("dec", T.StableLmForCausalLM, T.StableLmConfig, partial_rotary_factor=0.25),
    "persimmon": arch("dec", T.PersimmonForCausalLM, T.PersimmonConfig, num_key_value_heads=None),
    "qwen3": arch("dec", T.Qwen3ForCausalLM, T.Qwen3Config, head_dim=8),
    "gemma2": arch("dec", T.Gemma2ForCausalLM, T.Gemma2Config, head_dim=8, sliding_window=8,
                   query_pre_attn_scalar=8),
    "gemma3": arch("dec", T.Gemma3ForCausalLM, T.Gemma3TextConfig, head_dim=8, sliding_window=8,
                   query_pre_attn_scalar=8),
    "starcoder2": arch("dec", T.Starcoder2ForCausalLM, T.Starcoder2Config, sliding_window=None),
    "olmo": arch("dec", T.OlmoForCausalLM, T.OlmoConfig),
    "olmo2": arch("dec", T.Olmo2ForCausalLM, T.Olmo2Config),
    "granite": arch("dec", T.GraniteForCausalLM, T.GraniteConfig),
    "nemotron": arch("dec", T.NemotronForCausalLM, T.NemotronConfig, head_dim=8),
    # Encoders (sequence classification, 3 classes, the second example padded).
    "roberta": arch("enc", T.RobertaForSequenceClassification, T.RobertaConfig, num_labels=3, pad_token_id=1),
    "xlm_roberta": arch("enc", T.XLMRobertaForSequenceClassification, T.XLMRobertaConfig, num_labels=3,
                        pad_token_id=1),
    "electra": arch("enc", T.ElectraForSequenceClassification, T.ElectraConfig, embedding_size=16, num_labels=3),
    "albert": arch("enc", T.AlbertForSequenceClassification, T.AlbertConfig, embedding_size=16, num_labels=3),
    "deberta": arch("enc", T.DebertaForSequenceClassification, T.DebertaConfig, num_labels=3),
    "deberta_v2": arch("enc", T.DebertaV2ForSequenceClassification, T.DebertaV2Config, num_labels=3),
    "mpnet": arch("enc", T.MPNetForSequenceClassification, T.MPNetConfig, num_labels=3),
    "mobilebert": arch("enc", T.MobileBertForSequenceClassification, T.MobileBertConfig, embedding_size=16,
                       intra_bottleneck_size=16, num_feedforward_networks=2, num_labels=3),
    "roformer": arch("enc", T.RoFormerForSequenceClassification, T.RoFormerConfig, embedding_size=32, num_labels=3),
    "convbert": arch("enc", T.ConvBertForSequenceClassification, T.ConvBertConfig, embedding_size=32, num_labels=3),
    "funnel": arch("enc", T.FunnelForSequenceClassification, T.FunnelConfig, block_sizes=[1, 1], d_model=32, n_head=4,
                   d_head=8, d_inner=64, num_labels=3, hidden_size=None, num_hidden_layers=None,
                   num_attention_heads=None, intermediate_size=None),
    "squeezebert": arch("enc", T.SqueezeBertForSequenceClassification, T.SqueezeBertConfig, embedding_size=32,
                        q_groups=1, k_groups=1, v_groups=1, post_attention_groups=1, intermediate_groups=1,
                        output_groups=1, num_labels=3),
    # Encoder-decoders (logits of the decoder, trained with cross-entropy on labels per token).
    "t5": arch("s2s", T.T5ForConditionalGeneration, T.T5Config, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
               num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, encoder_layers=None,
               decoder_layers=None, encoder_attention_heads=None, decoder_attention_heads=None,
               encoder_ffn_dim=None, decoder_ffn_dim=None, max_position_embeddings=None),
    "bart": arch("s2s", T.BartForConditionalGeneration, T.BartConfig, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                 decoder_start_token_id=2),
    "marian": arch("s2s", T.MarianMTModel, T.MarianConfig, pad_token_id=1, decoder_start_token_id=1, eos_token_id=2),
    # Vision (image classification, 5 classes, or the encoder's last hidden state).
    "deit": arch("vis", T.DeiTForImageClassification, T.DeiTConfig, num_labels=5),
    "beit": arch("vis", T.BeitForImageClassification, T.BeitConfig, num_labels=5),
    "data2vec_vision": arch("vis", T.Data2VecVisionForImageClassification, T.Data2VecVisionConfig, num_labels=5),
    "dinov2": arch("vis", T.Dinov2ForImageClassification, T.Dinov2Config, num_labels=5),
    "swin": arch("vis", T.SwinForImageClassification, T.SwinConfig, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                 window_size=2, patch_size=4, hidden_size=None, num_hidden_layers=None, num_attention_heads=None,
                 intermediate_size=None, num_labels=5),
    "swinv2": arch("vis", T.Swinv2ForImageClassification, T.Swinv2Config, embed_dim=16, depths=[1, 1],
                   num_heads=[2, 4], window_size=2, patch_size=4, hidden_size=None, num_hidden_layers=None,
                   num_attention_heads=None, intermediate_size=None, num_labels=5),
    "pvt": arch("vis", T.PvtForImageClassification, T.PvtConfig, num_encoder_blocks=2, depths=[1, 1],
                sequence_reduction_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[4, 2], strides=[4, 2],
                num_attention_heads=[1, 2], mlp_ratios=[2, 2], hidden_size=None, num_hidden_layers=None,
                intermediate_size=None, num_labels=5),
    "segformer": arch("vis", T.SegformerForImageClassification, T.SegformerConfig, num_encoder_blocks=2,
                      depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2],
                      num_attention_heads=[1, 2], mlp_ratios=[2, 2], hidden_size=None, num_hidden_layers=None,
                      intermediate_size=None, num_labels=5),
    "mobilevit": arch("vis", T.MobileViTForImageClassification, T.MobileViTConfig, hidden_sizes=[16, 24, 32],
                      neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32], patch_size=2, hidden_size=None,
                      num_hidden_layers=None, num_attention_heads=None, intermediate_size=None, num_labels=5),
    "convnext": arch("vis", T.ConvNextForImageClassification, T.ConvNextConfig, num_stages=2, hidden_sizes=[16, 32],
                     depths=[1, 1], patch_size=4, hidden_size=None, num_hidden_layers=None, num_attention_heads=None,
                     intermediate_size=None, image_size=None, num_labels=5),
    "resnet": arch("vis", T.ResNetForImageClassification, T.ResNetConfig, embedding_size=16, hidden_sizes=[16, 32],
                   depths=[1, 1], layer_type="basic", hidden_size=None, num_hidden_layers=None,
                   num_attention_heads=None, intermediate_size=None, image_size=None, patch_size=None,
                   num_labels=5),
    "mobilenet_v2": arch("vis", T.MobileNetV2ForImageClassification, T.MobileNetV2Config, depth_multiplier=0.25,
                         hidden_size=None, num_hidden_layers=None, num_attention_heads=None,
                         intermediate_size=None, patch_size=None, num_labels=5),
    "regnet": arch("vis", T.RegNetForImageClassification, T.RegNetConfig, embedding_size=16, hidden_sizes=[16, 32],
                   depths=[1, 1], groups_width=8, hidden_size=None, num_hidden_layers=None,
                   num_attention_heads=None, intermediate_size=None, image_size=None, patch_size=None,
                   num_labels=5),
    "clip_vision": arch("vis", T.CLIPVisionModel, T.CLIPVisionConfig),
    "siglip_vision": arch("vis", T.SiglipVisionModel, T.SiglipVisionConfig),
}


def dorac(*args):
    r = subprocess.run([str(DORAC), *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"dorac {args[0]}: {r.stderr.strip().splitlines()[-1]}")
    return r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""


class Wrapped(torch.nn.Module):
    """Plain tensors in, one tensor out: logits, or the encoder's last hidden state."""

    def __init__(self, kind, model):
        super().__init__()
        self.kind, self.m = kind, model

    def forward(self, *args):
        if self.kind == "dec":
            ids = args[0]
            out = self.m(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        elif self.kind == "enc":
            out = self.m(input_ids=args[0], attention_mask=args[1])
        elif self.kind == "s2s":
            out = self.m(input_ids=args[0], attention_mask=args[1], decoder_input_ids=args[2], use_cache=False)
        else:
            out = self.m(pixel_values=args[0])
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def example(kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "dec":
        return {"input_ids": torch.randint(0, 256, (2, 12), generator=g)}
    if kind == "enc":
        ids = torch.randint(3, 256, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    if kind == "s2s":
        return {"input_ids": torch.randint(3, 256, (2, 10), generator=g),
                "attention_mask": torch.ones(2, 10, dtype=torch.long),
                "decoder_input_ids": torch.randint(3, 256, (2, 6), generator=g)}
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}


def check(name, out_dir, dynamo):
    kind, cls, cfg = ARCHS[name]()
    d = out_dir / name
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    model = Wrapped(kind, cls(cfg).eval()).eval()
    feeds = example(kind, 2)
    path = d / "model.onnx"
    with torch.no_grad():
        if dynamo:
            torch.onnx.export(model, tuple(feeds.values()), str(path), input_names=list(feeds),
                              output_names=["out"], opset_version=20, dynamo=True, external_data=False)
        else:
            dynamic = {k: {0: "batch", 1: "seq"} if kind != "vis" else {0: "batch"} for k in feeds}
            if kind == "s2s":
                dynamic["decoder_input_ids"] = {0: "batch", 1: "target"}
            dynamic["out"] = {0: "batch"}
            torch.onnx.export(model, tuple(feeds.values()), str(path), input_names=list(feeds),
                              output_names=["out"], dynamic_axes=dynamic, opset_version=17, dynamo=False)
    feeds = {k: v.numpy() for k, v in feeds.items()}
    save_file(feeds, str(d / "inputs.safetensors"))
    golden = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    shapes = [a for k, v in feeds.items() for a in ("--shape", f"{k}={'x'.join(map(str, v.shape))}")]
    result = {}
    dorac("run", path, "--inputs", d / "inputs.safetensors", "-o", d / "y.safetensors", *shapes)
    result["run"] = rel(load_file(str(d / "y.safetensors"))["out"], golden)
    dorac("rewrite", path, "-o", d / "dora.onnx", "--rank", 4, *shapes)
    rewritten = ort.InferenceSession(str(d / "dora.onnx"), providers=["CPUExecutionProvider"])
    result["rewrite"] = rel(rewritten.run(None, feeds)[0], golden)
    if kind == "vis" and "ForImageClassification" not in cls.__name__:
        return result
    rng = np.random.default_rng(3)
    if kind == "dec":
        data = {"input_ids": rng.integers(0, 256, (4, 12)).astype(np.int64)}
        data["labels"] = data["input_ids"].copy()
        loss = "lm"
    elif kind == "enc":
        data = {"input_ids": rng.integers(3, 256, (4, 12)).astype(np.int64),
                "attention_mask": np.ones((4, 12), np.int64), "labels": np.array([0, 1, 2, 1], np.int64)}
        loss = "cross-entropy"
    elif kind == "s2s":
        data = {"input_ids": rng.integers(3, 256, (4, 10)).astype(np.int64),
                "attention_mask": np.ones((4, 10), np.int64),
                "decoder_input_ids": rng.integers(3, 256, (4, 6)).astype(np.int64),
                "labels": rng.integers(3, 256, (4, 6)).astype(np.int64)}
        loss = "cross-entropy"
    else:
        data = {"pixel_values": rng.standard_normal((4, 3, 32, 32)).astype(np.float32),
                "labels": np.array([0, 1, 2, 3], np.int64)}
        loss = "cross-entropy"
    save_file(data, str(d / "data.safetensors"))
    seq = {"dec": ["--shape", "seq=12"], "enc": ["--shape", "seq=12"],
           "s2s": ["--shape", "seq=10", "--shape", "target=6"]}.get(kind, [])
    seq = [] if dynamo else seq
    common = [path, "--data", d / "data.safetensors", "--loss", loss, "--batch-size", 2, "--steps", 2, *seq,
              "--overwrite"]
    gpu = dorac("train", *common, "-o", d / "gpu")
    ref = dorac("train", *common, "-o", d / "ref", "--reference")
    result["losses"] = [gpu.split(" in ")[0], ref.split(" in ")[0]]
    a = load_file(str(d / "gpu" / "adapter_model.safetensors"))
    b = load_file(str(d / "ref" / "adapter_model.safetensors"))
    result["adapters"] = max(rel(a[k], b[k]) for k in b)
    return result


def losses_agree(gpu, ref):
    """'loss A -> B' of the GPU and the reference: equal to 1e-5 relative."""
    values = [[float(v) for v in line.split()[1::2]] for line in (gpu, ref)]
    return all(abs(a - b) <= 1e-5 * max(abs(b), 1.0) for a, b in zip(*values))


def main():
    torch.set_num_threads(2)
    tf.logging.set_verbosity_error()
    dynamo = bool(os.environ.get("DYNAMO"))
    out_dir = pathlib.Path(tempfile.mkdtemp(prefix="dorac-archs-"))
    failures = 0
    for name in sys.argv[1:] or list(ARCHS):
        try:
            r = check(name, out_dir, dynamo)
            bad = [k for k in ("run", "rewrite") if not r[k] < 1e-5]
            if "losses" in r and not losses_agree(*r["losses"]):
                bad.append("losses")
        except Exception as e:  # noqa: BLE001 (report and go on to the next architecture)
            r, bad = {"error": "".join(traceback.format_exception_only(e)).strip()[-300:]}, ["error"]
        failures += bool(bad)
        print(f"{name}: {json.dumps(r)}{'  FAIL' if bad else ''}", flush=True)
    print("all checks passed" if failures == 0 else f"{failures} architectures failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
