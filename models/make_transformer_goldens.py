#!/usr/bin/env python3
"""Training goldens for the tiny GPT-2, Llama and ViT: one AdamW step of PEFT DoRA, float64, with
the causal LM loss (GPT-2, Llama) or the classification cross-entropy (ViT).

Run from the repository root, after make_transformers.py, make_decoders.py and make_encoders.py
(it reads each model's inputs and adapter and changes none of them):

    /work/pyenv/bin/python models/make_transformer_goldens.py [gpt2_tiny|llama_tiny|vit_tiny ...]

(all models without arguments). It writes models/<model>/train/ (described here for gpt2_tiny;
llama_tiny's is the same with its 14 nn.Linear projections, W0 = weight.T):

    data.safetensors     "input_ids" int64 [2, 16] (= ../inputs.safetensors), "labels" int64 [2, 16]
                         (= input_ids: the loss shifts internally)
    dora_lm.safetensors  float64: "loss" [], and for every adapted module (PEFT name without the
                         "base_model.model." prefix) grad.<module>.{lora_A,lora_B,magnitude} (before the
                         step), after.<module>.* (after one AdamW step), exp_avg.<module>.*,
                         exp_avg_sq.<module>.* (Adam moments after the step)
    cases.json           hyper-parameters and every key with its shape

The case: base GPT-2 rebuilt with make_transformers.py's code and seeds (checked against
legacy_op17.onnx), cast to float64; peft_dora loaded with PeftModel.from_pretrained(...,
is_trainable=True); train mode (every dropout probability is 0, so train mode = eval mode, checked);
eager attention. loss = the mean cross-entropy of logits[:, :-1] against input_ids[:, 1:]
(30 positions), computed in float64 by hand: it is what model(input_ids=x, labels=x).loss computes,
but HF's ForCausalLMLoss casts the logits to float32 first (checked equal to ~1e-7). AdamW lr 1e-2, betas (0.9, 0.999), eps 1e-8,
weight_decay 0.01 (on every trainable tensor, magnitude included), one step. PEFT's detached norm.

Checks: the loaded adapter reproduces peft_dora_outputs.safetensors; the optimizer holds exactly
lora_A, lora_B and the magnitude of the 8 adapted Conv1D layers; the loss by hand; every gradient
equals dora-math.md's Backward formulas (detached norm) from hooked layer inputs and output gradients,
with W0 = the Conv1D weight as stored ([in, out], fan_in_fan_out); a hand-written AdamW; central finite
differences for magnitude entries (exact in the detached mode too). Two runs give identical files.

vit_tiny/train/ is the same for the classifier ViT with the peft_dora_conv adapter (13 modules: the
six projections of both blocks and the patch-embedding Conv, PEFT's DoraConv2dLayer):

    data.safetensors     "pixel_values" float32 [2, 3, 16, 16] (= ../inputs.safetensors, the static
                         batch of the exports), "labels" int64 [2] class ids in [0, 3)
    dora_ce.safetensors  float64: "loss" [] = the mean softmax cross-entropy of logits [2, 3] vs
                         labels; grad./after./exp_avg./exp_avg_sq.<module>.<lora_A|lora_B|magnitude>
                         in PEFT's shapes: for the Conv vit.embeddings.patch_embeddings.projection
                         lora_A [4, 3, 4, 4], lora_B [32, 4, 1, 1], magnitude [1, 32, 1, 1]
    cases.json           the case dora_ce

Its gradient check reads the Conv as a linear layer on the unfolded patches: X = unfold(x) [N*16, 48]
in (channel, kh, kw) order, W0 = weight.reshape(32, 48).T, A = lora_A.reshape(4, 48), B = lora_B
[32, 4], m [32]. HF's ViT computes the attention softmax in float32 even in a float64 model (as
Llama its RMSNorm and softmax): the golden carries that rounding (~1e-7 relative). Its other checks
are the ones above, plus: every dropout probability is 0, the Conv is PEFT's DoraConv2dLayer with
its Conv-shaped tensors, HF's model(pixel_values, labels=labels).loss equals the loss, finite
differences also on the Conv's tensors.
"""

import copy
import json
import sys
from pathlib import Path

import onnx
import onnx.numpy_helper
import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

MODELS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(MODELS_DIR))
import make_transformers  # noqa: E402

DTYPE = torch.float64
import make_decoders  # noqa: E402
import make_encoders  # noqa: E402

# Per model: how to rebuild the float32 base, whether its adapted layers are GPT-2's Conv1D
# (weight stored [in, out], fan_in_fan_out), how many modules PEFT adapts, the exported variants,
# the adapter folder, the input, the loss (causal "lm" or classification "ce"), and whether the
# float64 model still computes in float32 somewhere (then finite differences take a wide step).
LM = dict(adapter="peft_dora", input="input_ids", loss="lm")
CASES = {
    "gpt2_tiny": dict(build=make_transformers.build_gpt2, conv1d=True, n_modules=8, fd_f32=False, **LM,
                      onnx=["legacy_op14", "legacy_op17", "legacy_op17_dynamic", "dynamo_op18"]),
    "llama_tiny": dict(build=make_decoders.MODELS["llama_tiny"]["build"], conv1d=False, n_modules=14, fd_f32=True,
                       **LM, onnx=["legacy_op14", "legacy_op17", "legacy_op17_dynamic", "dynamo_op20"]),
    "vit_tiny": dict(build=make_encoders.MODELS["vit_tiny"]["build"], conv1d=False, n_modules=13, fd_f32=True,
                     adapter="peft_dora_conv", input="pixel_values", loss="ce", n_classes=3, label_seed=11020,
                     onnx=["legacy_op14", "legacy_op17", "legacy_op17_dynamic", "dynamo_op20"]),
}
FOLDER = None  # models/<model>, set per case by main
CASE = None
OPT = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
EXACT_TOL = 1e-12
FD_H = 1e-6
FD_TOL = 1e-8
# transformers' Llama computes RMSNorm and the attention softmax in float32 even in a float64
# model (ViT its attention softmax), so its loss carries float32 rounding (~1e-7 relative, far under
# the tests' 1e-4): finite differences need a wider step there and are a sanity check only.
FD_F32_H = 1e-3
FD_F32_TOL = 2e-3


def check(cond, msg):
    if not cond:
        raise RuntimeError(msg)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def check_base_against_onnx(base):
    g = onnx.load(str(FOLDER / "legacy_op17.onnx")).graph
    inits = {i.name: torch.from_numpy(onnx.numpy_helper.to_array(i).copy()) for i in g.initializer}
    params = dict(base.named_parameters())
    named = [n for n in inits if n in params]
    for n in named:
        check(torch.equal(inits[n], params[n].detach()), f"{n} differs from legacy_op17.onnx")
    anon = [n for n in inits if n not in params]
    check(len(anon) == 1 and torch.equal(inits[anon[0]], base.lm_head.weight.detach().T),
          f"unexpected anonymous initializers {anon}")
    check(len(named) == len(params), f"{len(params) - len(named)} parameters missing from the ONNX file")
    print(f"  base GPT-2 == legacy_op17.onnx: {len(named)} named initializers bitwise, {anon[0]} == lm_head.weight.T")


def load_peft(base):
    m = PeftModel.from_pretrained(copy.deepcopy(base).to(DTYPE), str(FOLDER / CASE["adapter"]), is_trainable=True)
    m.to(DTYPE)
    return m.train()


def trainable(model):
    got = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out, mods = [], []
    for n, p in got:
        short = n.removeprefix("base_model.model.")
        for suffix, tag in [(".lora_A.default.weight", "lora_A"), (".lora_B.default.weight", "lora_B"),
                            (".lora_magnitude_vector.default.weight", "magnitude")]:
            if short.endswith(suffix):
                mod = short[: -len(suffix)]
                out.append((f"{mod}.{tag}", p))
                if mod not in mods:
                    mods.append(mod)
                break
        else:
            raise RuntimeError(f"unexpected trainable parameter {n}")
    check(len(out) == 3 * len(mods) == 3 * CASE["n_modules"], f"{len(out)} trainable tensors in {len(mods)} modules")
    return out, mods


class Capture:
    def __init__(self, model):
        self.x, self.g, self.handles = {}, {}, []
        for name, mod in model.named_modules():
            if isinstance(mod, LoraLayer):
                self.handles.append(mod.register_forward_hook(self._hook(name.removeprefix("base_model.model."))))

    def _hook(self, name):
        def fn(mod, args, out):
            self.x[name] = args[0].detach()
            out.register_hook(lambda g: self.g.__setitem__(name, g.detach()))

        return fn

    def remove(self):
        for h in self.handles:
            h.remove()


def lm_loss_by_hand(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="mean")


def loss_of(logits, labels):
    """The case's loss: causal LM (labels = input_ids, shifted here) or one class per example."""
    if CASE["loss"] == "lm":
        return lm_loss_by_hand(logits, labels)
    return F.cross_entropy(logits, labels, reduction="mean")


def forward(model, x):
    return model(**{CASE["input"]: x}).logits


def check_no_dropout(model):
    """Train mode is the training golden's mode: every dropout must be off (nn.Dropout modules and
    the attention probability dropout that HF's eager attention reads from a float attribute)."""
    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Dropout):
            check(mod.p == 0.0, f"{name}: dropout p = {mod.p}")
            n += 1
        for attr, v in vars(mod).items():
            if "dropout" in attr and isinstance(v, float):
                check(v == 0.0, f"{name}.{attr} = {v}")
                n += 1
    return n


def check_base_against_ort(base):
    """For exports whose weights are anonymous (transposed): the rebuilt model gives the ORT golden."""
    x = load_file(str(FOLDER / "inputs.safetensors"))[CASE["input"]]
    ort_out = load_file(str(FOLDER / "legacy_op17.ort.safetensors"))["logits"]
    with torch.no_grad():
        e = (forward(base, x) - ort_out).abs().max().item()
    check(e < 1e-5, f"rebuilt base vs legacy_op17.ort.safetensors: {e:.3e}")
    print(f"  rebuilt base vs onnxruntime on legacy_op17.onnx: max abs {e:.1e}")


def main():
    import peft

    global FOLDER, CASE
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, peft {peft.__version__}")
    torch.set_num_threads(1)
    for name in sys.argv[1:] or list(CASES):
        FOLDER, CASE = MODELS_DIR / name, CASES[name]
        print(f"\n=================== {name} ===================")
        make_case(name)
    print("\nall checks passed")


def make_labels(x):
    """Class ids for the classification case (fixed seed), one per example."""
    gen = torch.Generator().manual_seed(CASE["label_seed"])
    return torch.randint(0, CASE["n_classes"], (x.shape[0],), generator=gen, dtype=torch.int64)


def as_linear(mod, x, g, A, B, m):
    """dora-math.md's operands [rows, in] / [in, out] for a hooked layer: a linear layer as it is; a
    Conv2d as the linear layer on its unfolded patches (PEFT's DoraConv2dLayer: norm per output
    channel over (in, kh, kw), lora_A a Conv2d [r, in, kh, kw], lora_B a 1x1 Conv2d [out, r, 1, 1],
    m [1, out, 1, 1]); W0 [in, out]."""
    base = mod.get_base_layer()
    if not isinstance(base, nn.Conv2d):
        W0 = make_transformers.w0_doc(base).detach()
        return x.reshape(-1, W0.shape[0]), g.reshape(-1, W0.shape[1]), W0, A, B, m
    check(base.groups == 1, "grouped Conv")
    o, r = base.out_channels, A.shape[0]
    X = F.unfold(x, base.kernel_size, dilation=base.dilation, padding=base.padding, stride=base.stride)
    X = X.transpose(1, 2).reshape(-1, X.shape[1])  # [N * positions, in * kh * kw]
    G = g.flatten(2).transpose(1, 2).reshape(-1, o)  # [N * positions, out], same position order
    return X, G, base.weight.detach().reshape(o, -1).T, A.reshape(r, -1), B.reshape(o, r), m.reshape(-1)


def make_case(name):
    import peft

    base32 = CASE["build"]()
    if CASE["conv1d"]:
        check_base_against_onnx(base32)
    else:
        check_base_against_ort(base32)
    base = copy.deepcopy(base32).to(DTYPE)
    lm = CASE["loss"] == "lm"
    ids = load_file(str(FOLDER / "inputs.safetensors"))[CASE["input"]]  # input_ids or pixel_values
    labels = ids if lm else make_labels(ids)
    gold = load_file(str(FOLDER / f"{CASE['adapter']}_outputs.safetensors"))["logits"]
    cfg = json.loads((FOLDER / CASE["adapter"] / "adapter_config.json").read_text())
    check(cfg["fan_in_fan_out"] == CASE["conv1d"] and cfg["lora_dropout"] == 0.0 and not cfg["use_rslora"], f"config {cfg}")
    s = cfg["lora_alpha"] / cfg["r"]

    model = load_peft(base)
    n_drop = check_no_dropout(model)
    with torch.no_grad():
        y_train = forward(model, ids)
        y_eval = forward(model.eval(), ids)
    model.train()
    check(torch.equal(y_train, y_eval), "train and eval mode differ (dropout?)")
    e = (y_train - gold).abs().max().item()
    check(e < 1e-13, f"loaded adapter does not reproduce {CASE['adapter']}_outputs.safetensors ({e:.3e})")
    print(f"  {n_drop} dropout probabilities, all 0")
    print(f"  {CASE['adapter']} (float64, train mode == eval mode) vs {CASE['adapter']}_outputs.safetensors: "
          f"max abs {e:.1e}")

    params, mods = trainable(model)
    convs = []
    for mod in mods:  # Conv1D base layers: weight [in, out]; lora_A [r, in], lora_B [out, r], m [out]
        lin = dict(model.named_modules())[f"base_model.model.{mod}"]
        w = lin.get_base_layer()
        shapes = {k.rsplit(".", 1)[1]: list(p.shape) for k, p in params if k.startswith(mod + ".")}
        if isinstance(w, nn.Conv2d):  # PEFT's Conv shapes
            check(type(lin.lora_magnitude_vector["default"]).__name__ == "DoraConv2dLayer", f"{mod}: not DoRA")
            o, c, kh, kw = w.weight.shape
            check(shapes == {"lora_A": [4, c, kh, kw], "lora_B": [o, 4, 1, 1], "magnitude": [1, o, 1, 1]},
                  f"{mod}: shapes {shapes}")
            convs.append(mod)
            continue
        if CASE["conv1d"]:
            check(isinstance(w, Conv1D) and lin.fan_in_fan_out, f"{mod} is not a fan_in_fan_out Conv1D")
            i, o = w.weight.shape
        else:
            check(isinstance(w, torch.nn.Linear) and not lin.fan_in_fan_out, f"{mod} is not a Linear")
            o, i = w.weight.shape
        check(shapes == {"lora_A": [4, i], "lora_B": [o, 4], "magnitude": [o]}, f"{mod}: shapes {shapes}")
    print(f"  trainable: {len(params)} tensors in {len(mods)} modules: {mods}" +
          (f" (Conv2d: {convs})" if convs else ""))
    opt = torch.optim.AdamW([p for _, p in params], lr=OPT["lr"], betas=OPT["betas"], eps=OPT["eps"],
                            weight_decay=OPT["weight_decay"])
    before = {k: p.detach().clone() for k, p in params}
    with torch.no_grad():
        hf = model(**{CASE["input"]: ids}, labels=labels).loss  # before the step
    cap = Capture(model)
    opt.zero_grad(set_to_none=True)
    logits = forward(model, ids)
    loss = loss_of(logits, labels)
    loss.backward()
    cap.remove()
    grads = {k: p.grad.detach().clone() for k, p in params}
    opt.step()
    out = {"loss": loss.detach().clone().reshape([])}
    for k, p in params:
        st = opt.state[p]
        out[f"grad.{k}"] = grads[k]
        out[f"after.{k}"] = p.detach().clone()
        out[f"exp_avg.{k}"] = st["exp_avg"].detach().clone()
        out[f"exp_avg_sq.{k}"] = st["exp_avg_sq"].detach().clone()
    out = {k: v.to(DTYPE).contiguous() for k, v in sorted(out.items())}
    n_cls = logits.shape[-1]
    print(f"  loss {out['loss'].item():.12f} (ln {n_cls} = {torch.log(torch.tensor(float(n_cls))).item():.6f})")
    if not lm:
        print(f"  labels {labels.tolist()}, logits {logits.detach().tolist()}")

    # HF's own loss (LM: labels=input_ids, shifted inside the model) is the same formula, but its
    # loss functions cast the logits to float32 first: equal to about 1e-7 only.
    check(logits.dtype == DTYPE, f"logits are {logits.dtype}")
    e_hf = rel_err(hf, out["loss"])
    check(e_hf < 1e-6, f"HF's loss differs from the float64 loss by {e_hf:.3e}")
    if lm:
        print(f"  HF model(input_ids, labels=input_ids).loss = {hf.item():.12f} ({hf.dtype}, logits cast to float32 "
              f"by ForCausalLMLoss): rel diff {e_hf:.1e}")
    else:
        print(f"  HF model(pixel_values, labels=labels).loss = {hf.item():.12f} ({hf.dtype}): rel diff {e_hf:.1e}")
    # the same loss written out: log-softmax, pick the next byte (LM, mean over the 30 positions) or
    # the label (mean over the batch)
    lp = torch.log_softmax(logits.detach()[:, :-1] if lm else logits.detach(), dim=-1)
    ref = -lp.gather(-1, (ids[:, 1:] if lm else labels)[..., None]).mean()
    check(rel_err(out["loss"], ref) < EXACT_TOL, "loss by hand differs")
    for k, v in out.items():
        check(bool(torch.isfinite(v).all()), f"{k} not finite")
        if k.startswith("grad."):
            check(v.abs().max().item() > 1e-8, f"{k} is (almost) zero")

    # dora-math.md Backward (detached norm), W0 = Conv1D weight [in, out] as stored (Linear: weight.T,
    # Conv2d: on the unfolded patches, see as_linear)
    worst = 0.0
    for mod in mods:
        X, G, W0, A, B, m = as_linear(dict(model.named_modules())[f"base_model.model.{mod}"], cap.x[mod], cap.g[mod],
                                      before[f"{mod}.lora_A"], before[f"{mod}.lora_B"], before[f"{mod}.magnitude"])
        XA = X @ A.T
        u = X @ W0 + s * XA @ B.T
        n = (W0 + s * (B @ A).T).norm(dim=0)
        Gu = G * (m / n)
        refs = {"magnitude": (G * u).sum(0) / n, "lora_B": s * Gu.T @ XA, "lora_A": s * (Gu @ B).T @ X}
        for tag, r in refs.items():
            e = rel_err(grads[f"{mod}.{tag}"], r.reshape(grads[f"{mod}.{tag}"].shape))
            check(e < EXACT_TOL, f"{mod}.{tag}: grad vs dora-math.md: rel err {e:.3e}")
            worst = max(worst, e)
    print(f"  dora-math.md backward (detached) vs PEFT grads, W0 [in, out]: max rel err {worst:.2e}"
          + (f" (Conv2d {convs} on unfolded patches)" if convs else ""))

    # AdamW by hand
    lr, (b1, b2), eps, wd = OPT["lr"], OPT["betas"], OPT["eps"], OPT["weight_decay"]
    worst = 0.0
    for k, _ in params:
        g = grads[k]
        mom, v = (1 - b1) * g, (1 - b2) * g * g
        p = before[k] * (1 - lr * wd) - lr * (mom / (1 - b1)) / ((v / (1 - b2)).sqrt() + eps)
        for tag, r in [("after", p), ("exp_avg", mom), ("exp_avg_sq", v)]:
            e = rel_err(out[f"{tag}.{k}"], r)
            check(e < EXACT_TOL, f"{k}: {tag} vs hand AdamW: {e:.3e}")
            worst = max(worst, e)
    print(f"  hand-written AdamW vs torch.optim.AdamW: max rel err {worst:.2e}")

    # central finite differences: magnitude entries (exact in the detached mode), A/B for information
    fd_model = load_peft(base)
    fd_params = dict(trainable(fd_model)[0])
    lins = [m for m in mods if m not in convs]
    points = [(f"{lins[0]}.magnitude", (5,)), (f"{lins[-1]}.magnitude", (3,)),
              (f"{lins[2]}.lora_B", (7, 1)), (f"{lins[3]}.lora_A", (2, 9))]
    for c in convs:  # PEFT's Conv shapes: m [1, out, 1, 1], A [r, in, kh, kw], B [out, r, 1, 1]
        points += [(f"{c}.magnitude", (0, 5, 0, 0)), (f"{c}.lora_A", (1, 2, 3, 1)), (f"{c}.lora_B", (6, 2, 0, 0))]
    for key, idx in points:
        p = fd_params[key]
        vals = []
        with torch.no_grad():
            orig = p[idx].item()
            fd_h = FD_F32_H if CASE["fd_f32"] else FD_H
            for h in (fd_h, -fd_h):
                p[idx] = orig + h
                vals.append(loss_of(forward(fd_model, ids), labels).item())
            p[idx] = orig
        fd = (vals[0] - vals[1]) / (2 * fd_h)
        gd = grads[key][idx].item()
        print(f"  FD {key}{list(idx)}: fd {fd:+.12e}  detached grad {gd:+.12e}  |diff| {abs(fd - gd):.1e}")
        if key.endswith("magnitude"):
            check(abs(fd - gd) < (FD_F32_TOL if CASE["fd_f32"] else FD_TOL),
                  f"FD vs magnitude grad {key}: {abs(fd - gd):.3e}")

    # write
    train_dir = FOLDER / "train"
    train_dir.mkdir(exist_ok=True)
    for p in train_dir.iterdir():
        p.unlink()
    data = {CASE["input"]: ids.contiguous(), "labels": labels.clone().contiguous()}
    case = "dora_lm" if lm else "dora_ce"
    save_file(data, str(train_dir / "data.safetensors"))
    save_file(out, str(train_dir / f"{case}.safetensors"))
    if lm:
        loss_meta = {"kind": "lm", "logits": "logits", "labels": "labels",
                     "formula": "mean over batch and positions t < T-1 of cross_entropy(logits[:, t], labels[:, t+1])",
                     "n_positions": int(ids.shape[0] * (ids.shape[1] - 1)), "ignore_index": -100}
        batch = "whole data set as one batch (2 sequences of 16 bytes)"
    else:
        loss_meta = {"kind": "cross_entropy", "logits": "logits", "labels": "labels",
                     "formula": "mean over the batch of cross_entropy(logits[b], labels[b]) (softmax over the "
                                f"{n_cls} classes)", "n_positions": int(ids.shape[0]), "ignore_index": -100}
        batch = f"whole data set as one batch ({ids.shape[0]} images {list(ids.shape[1:])}, the exports' static batch)"
    meta = {
        "model": name,
        "onnx": [f"../{v}.onnx" for v in CASE["onnx"]],
        "dtype": "float64 (model and every tensor of the case file; data.safetensors is "
                 + ("int64)" if lm else f"{CASE['input']} float32, labels int64)"),
        "data": "data.safetensors",
        "data_tensors": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                         for k, v in sorted(data.items())},
        "modules": mods,
        "scaling": s,
        "key_format": "<tag>.<module>.<lora_A|lora_B|magnitude>, tag in grad, after, exp_avg, exp_avg_sq; "
                      "PEFT orientation: lora_A [r, in], lora_B [out, r], magnitude [out]"
                      + (", also for these Conv1D layers whose base weight is stored [in, out] (fan_in_fan_out)"
                         if CASE["conv1d"] else "")
                      + (f"; PEFT's Conv shapes for the Conv2d {', '.join(convs)}: lora_A [r, in, kh, kw], "
                         "lora_B [out, r, 1, 1], magnitude [1, out, 1, 1] (element order of the flattened "
                         "[r, in*kh*kw], [out, r], [out])" if convs else ""),
        "generated_with": {"torch": torch.__version__.split("+")[0], "peft": peft.__version__,
                           "transformers": __import__("transformers").__version__},
        "cases": {
            case: {
                "file": f"{case}.safetensors",
                "method": "dora",
                "adapter": f"../{CASE['adapter']}",
                "norm_grad": "detached",
                "inputs": {CASE["input"]: CASE["input"]},
                "loss": loss_meta,
                "batch": batch,
                "steps": 1,
                "optimizer": {"kind": "adamw", "lr": OPT["lr"], "betas": list(OPT["betas"]), "eps": OPT["eps"],
                              "weight_decay": OPT["weight_decay"], "amsgrad": False, "maximize": False,
                              "decoupled_weight_decay": True,
                              "weight_decay_on": "all trainable tensors, magnitude included"},
                "grad_clip": None,
                "grad_step": 1,
                "tensors": {k: list(v.shape) for k, v in out.items()},
            }
        },
    }
    (train_dir / "cases.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    for p in train_dir.iterdir():
        p.chmod(0o644)
    print(f"  files in models/{name}/train:")
    for p in sorted(train_dir.iterdir()):
        print(f"    {p.name:24s} {p.stat().st_size:7d} B")


if __name__ == "__main__":
    main()
