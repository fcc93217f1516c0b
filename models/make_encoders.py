#!/usr/bin/env python3
"""Tiny encoders (DistilBERT, the T5 encoder, ViT) as PyTorch's exporters write them, with
onnxruntime and PEFT goldens, in the layout of models/make_transformers.py (whose export,
inspection, adapter and check code this script reuses, as models/make_decoders.py does).

Run from the repository root:

    /work/pyenv/bin/python models/make_encoders.py [MODEL...]   # default: all of MODELS

It regenerates models/<name>/ for <name> in distilbert_tiny, t5_encoder_tiny, vit_tiny:
<variant>.onnx with <variant> in legacy_op14, legacy_op17, legacy_op17_dynamic and dynamo_op20
(the torch.export-based exporter at opset 20), each with its <variant>.ort.safetensors;
inputs.safetensors; peft_dora/ (DoRA, r=4, alpha=8 on every attention and MLP projection, B and m
perturbed) and peft_dora_outputs.safetensors (PEFT's output in float64).

- distilbert_tiny: DistilBertForSequenceClassification (dim 32, 2 layers, 2 heads, hidden_dim 64,
  vocabulary 128, 3 labels). Inputs input_ids, attention_mask int64 [2, 8] (the second row padded),
  output "logits" [2, 3]. Dynamic variant: batch and seq. Targets q_lin, k_lin, v_lin, out_lin,
  lin1, lin2 (12 layers). distilbert_tiny/wrapped/<variant>.onnx (legacy_op17, dynamo_op20) export
  it inside a wrapper module (module paths `m.distilbert.transformer.layer.0.attention.q_lin`):
  the PEFT adapter made on the plain model must apply to them.
- t5_encoder_tiny: T5EncoderModel (d_model 32, d_kv 8, 2 layers, 4 heads, d_ff 64, ReLU MLP,
  relative_attention_num_buckets 8, max distance 16, vocabulary 128, no biases, RMS layer norm).
  Inputs input_ids, attention_mask int64 [2, 12], output "last_hidden_state" [2, 12, 32]. The
  relative position buckets (Abs, Log, Min, Less, Where, Cast on positions) depend only on the
  sequence length. Dynamic variant: batch and seq. Targets q, k, v, o, wi, wo (12 layers).
- vit_tiny: ViTForImageClassification (image 16x16, patch 4 -> 16 patches + CLS token, 3
  channels, hidden 32, 2 layers, 2 heads, intermediate 64, 3 labels). Input pixel_values float32
  [2, 3, 16, 16], output "logits" [2, 3]. Dynamic variant: batch only. The patch embedding is a
  Conv (4x4, stride 4). In transformers 5 ViT's projections are q_proj, k_proj, v_proj, o_proj
  (attention) and fc1, fc2 (MLP); the adapter targets those six (12 layers; the names
  query/key/value/dense of transformers 4 no longer exist). vit_tiny also has peft_dora_conv/:
  the same targets plus the patch embedding Conv (`projection`, PEFT's DoraConv2dLayer), with its
  output in peft_dora_conv_outputs.safetensors.
"""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
from transformers import (DistilBertConfig, DistilBertForSequenceClassification, T5Config, T5EncoderModel,
                          ViTConfig, ViTForImageClassification)

MODELS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(MODELS_DIR))
import make_transformers as mt  # noqa: E402
from make_models import perturb_adapter, save_adapter_flat  # noqa: E402

VARIANTS = ["legacy_op14", "legacy_op17", "legacy_op17_dynamic", "dynamo_op20"]
DISTILBERT_TARGETS = ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"]
T5_TARGETS = ["q", "k", "v", "o", "wi", "wo"]
VIT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
VIT_CONV_TARGET = "projection"  # vit.embeddings.patch_embeddings.projection, a Conv2d


def builder(cls, config, seed):
    def build():
        torch.manual_seed(seed)
        m = cls(config)
        mt.randomize_small_params(m, seed + 1)
        return m.eval()

    return build


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def distilbert_config():
    return DistilBertConfig(
        vocab_size=128, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=32, num_labels=3,
        initializer_range=0.2, pad_token_id=0, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0,
        attn_implementation="eager",
    )


def t5_config():
    return T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, dropout_rate=0.0, feed_forward_proj="relu", is_encoder_decoder=False,
        use_cache=False, pad_token_id=0, attn_implementation="eager",
    )


def vit_config():
    return ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3, initializer_range=0.2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="eager",
    )


class DistilBertForExport(DistilBertForSequenceClassification):
    """Positional inputs, logits only (same modules and parameter names as the plain class)."""

    def forward(self, input_ids, attention_mask):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask).logits


class T5EncoderForExport(T5EncoderModel):
    def forward(self, input_ids, attention_mask):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class ViTForExport(ViTForImageClassification):
    def forward(self, pixel_values):
        return super().forward(pixel_values=pixel_values).logits


def token_inputs(seed, batch, seq, pad_from):
    """input_ids in [1, 128) and a mask; row 1 padded from position pad_from (ids 0, mask 0)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, seq), generator=gen, dtype=torch.int64)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    if pad_from is not None:
        mask[1, pad_from:] = 0
        ids[1, pad_from:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def pixel_inputs(seed, batch):
    gen = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=gen, dtype=torch.float32)}


def token_spec(cls, export_cls, config, seed, seq, targets, output="logits"):
    return dict(
        build=builder(cls, config, seed), export_cls=export_cls,
        inputs=lambda: token_inputs(seed + 2, 2, seq, seq - 3),
        input_names=["input_ids", "attention_mask"],
        dynamic_out={0: "batch"} if output == "logits" else {0: "batch", 1: "seq"}, variants=VARIANTS,
        alt_same=lambda: token_inputs(seed + 3, 2, seq, 2),
        alt_shape=lambda: token_inputs(seed + 4, 3, 5, 3),
        peft_targets=targets, fan_in_fan_out=False, task_type=None, peft_seed=seed + 10, output=output,
    )


MODELS = {
    "distilbert_tiny": token_spec(DistilBertForSequenceClassification, DistilBertForExport, distilbert_config(),
                                  9001, 8, DISTILBERT_TARGETS),
    "t5_encoder_tiny": token_spec(T5EncoderModel, T5EncoderForExport, t5_config(), 10001, 12, T5_TARGETS,
                                  output="last_hidden_state"),
    "vit_tiny": dict(
        build=builder(ViTForImageClassification, vit_config(), 11001), export_cls=ViTForExport,
        inputs=lambda: pixel_inputs(11003, 2), input_names=["pixel_values"],
        dynamic_in={0: "batch"}, dynamic_out={0: "batch"}, variants=VARIANTS,
        alt_same=lambda: pixel_inputs(11004, 2), alt_shape=lambda: pixel_inputs(11005, 3),
        peft_targets=VIT_TARGETS, fan_in_fan_out=False, task_type=None, peft_seed=11010,
    ),
}


# --------------------------------------------------------------------------------------------
# ViT: a second adapter that also targets the patch-embedding Conv
# --------------------------------------------------------------------------------------------


def conv_reference_from_files(base, dest, feeds, skip=None):
    """dora-math.md's merge for every target, from the saved files only, on a float64 copy of the
    base model. Linear: as make_transformers.reference_from_files. Conv2d (weight [out, in, kh, kw],
    PEFT's lora_A a Conv2d [r, in, kh, kw], lora_B a 1x1 Conv2d [out, r, 1, 1]):
    dW = s * (B[:, :, 0, 0] @ A.flatten(1)).reshape(W0.shape), norm per output channel over
    (in, kh, kw), W' = m * (W0 + dW) / norm (m stored as [1, out, 1, 1]). The module `skip` keeps
    its base weight."""
    cfg = json.loads((dest / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    ad = mt.load_file(str(dest / "adapter_model.safetensors"))
    ref = copy.deepcopy(base).double().eval()
    n_mod = 0
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if not any(name == t or name.endswith("." + t) for t in cfg["target_modules"]) or name == skip:
                continue
            n_mod += 1
            A = ad[f"base_model.model.{name}.lora_A.weight"].double()
            B = ad[f"base_model.model.{name}.lora_B.weight"].double()
            m = ad[f"base_model.model.{name}.lora_magnitude_vector"].double().reshape(-1)  # [out]
            W0 = mod.weight.double()
            if isinstance(mod, nn.Conv2d):
                dW = s * (B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)).reshape(W0.shape)
                n = (W0 + dW).flatten(1).norm(dim=1)  # [out]
                mod.weight.copy_((W0 + dW) * (m / n).reshape(-1, 1, 1, 1))
            else:
                dW = s * (B @ A)  # [out, in]
                n = (W0 + dW).norm(dim=1)
                mod.weight.copy_((W0 + dW) * (m / n).reshape(-1, 1))
        return mt.torch_logits(ref, feeds), n_mod


def make_conv_adapter(name, spec, folder):
    """vit_tiny/peft_dora_conv/: DoRA on the linear targets and on the patch-embedding Conv2d."""
    print("\n  --- peft_dora_conv ---")
    base = spec["build"]()
    feeds = spec["inputs"]()
    targets = list(spec["peft_targets"]) + [VIT_CONV_TARGET]
    torch.manual_seed(spec["peft_seed"] + 100)
    cfg = mt.LoraConfig(r=mt.RANK, lora_alpha=mt.LORA_ALPHA, lora_dropout=0.0, use_dora=True, init_lora_weights=True,
                        target_modules=targets, fan_in_fan_out=False, task_type=None)
    pm = mt.get_peft_model(copy.deepcopy(base), cfg).eval()
    y_base = mt.torch_logits(base, feeds)
    assert (mt.torch_logits(pm, feeds) - y_base).abs().max().item() < 1e-5
    convs = [n for n, m in pm.named_modules() if type(m).__name__ == "Conv2d" and hasattr(m, "lora_magnitude_vector")]
    dora_types = {type(m.lora_magnitude_vector["default"]).__name__ for n, m in pm.named_modules() if n in convs}
    assert convs == ["base_model.model.vit.embeddings.patch_embeddings.projection"], convs
    assert dora_types == {"DoraConv2dLayer"}, dora_types
    n_layers = perturb_adapter(pm, True, spec["peft_seed"] + 101)
    assert n_layers == 13, n_layers
    dest = folder / "peft_dora_conv"
    save_adapter_flat(pm, dest)
    ad = mt.load_file(str(dest / "adapter_model.safetensors"))
    for k in sorted(ad):
        if "projection" in k or "layers.0.attention.q_proj" in k:
            print(f"    {k:72s} {str(ad[k].dtype):14s} {list(ad[k].shape)}")
    print(f"    ... {len(ad)} tensors for {n_layers} layers")
    pre = "base_model.model.vit.embeddings.patch_embeddings.projection"
    assert list(ad[f"{pre}.lora_A.weight"].shape) == [mt.RANK, 3, 4, 4]
    assert list(ad[f"{pre}.lora_B.weight"].shape) == [32, mt.RANK, 1, 1]
    assert list(ad[f"{pre}.lora_magnitude_vector"].shape) == [1, 32, 1, 1]
    with torch.no_grad():
        y32 = mt.torch_logits(pm, feeds).float()
        m64 = copy.deepcopy(pm).double().eval()
        y64 = mt.torch_logits(m64, feeds)
        y64_merged = mt.torch_logits(copy.deepcopy(m64).merge_and_unload().eval(), feeds)
        reloaded = mt.PeftModel.from_pretrained(copy.deepcopy(base).double(), str(dest)).eval().double()
        y64_reloaded = mt.torch_logits(reloaded, feeds)
    y64_ref, n_ref = conv_reference_from_files(base, dest, feeds)
    assert n_ref == 13
    errs = dict(merge=(y64 - y64_merged).abs().max().item(), reload=(y64 - y64_reloaded).abs().max().item(),
                doc=(y64 - y64_ref).abs().max().item(), f32=(y32.double() - y64).abs().max().item(),
                effect=(y64 - y_base.double()).abs().max().item())
    # the Conv's part: the same adapter without it
    y_no_conv, _ = conv_reference_from_files(base, dest, feeds, skip=pre.removeprefix("base_model.model."))
    errs["conv_effect"] = (y64 - y_no_conv).abs().max().item()
    print(f"  max|merged - unmerged| f64 {errs['merge']:.2e}, |reloaded - in-memory| f64 {errs['reload']:.2e}, "
          f"|dora-math.md from files - peft| f64 {errs['doc']:.2e}, |f32 - f64| {errs['f32']:.2e}, "
          f"adapter effect {errs['effect']:.3e}, of which the Conv's (vs the same adapter without it) "
          f"{errs['conv_effect']:.3e}")
    assert errs["merge"] < mt.F64_TOL and errs["reload"] < mt.F64_TOL and errs["doc"] < mt.F64_TOL
    assert errs["f32"] < 1e-4 and errs["effect"] > mt.MIN_ADAPTER_EFFECT and errs["conv_effect"] > mt.MIN_ADAPTER_EFFECT
    mt.save_file({"logits": y64.contiguous(), "logits_f32": y32.contiguous()},
                 str(folder / "peft_dora_conv_outputs.safetensors"))
    for p in [dest, *dest.iterdir(), folder / "peft_dora_conv_outputs.safetensors"]:
        p.chmod(0o755 if p.is_dir() else 0o644)


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
        if name == "vit_tiny":
            make_conv_adapter(name, MODELS[name], MODELS_DIR / name)
    if "distilbert_tiny" in names:
        mt.make_wrapped("distilbert_tiny", MODELS["distilbert_tiny"], "distilbert.transformer.layer.0.attention.q_lin")
    print("\nall checks passed")


if __name__ == "__main__":
    main()
