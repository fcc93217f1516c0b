#!/usr/bin/env python3
"""Training goldens for the tiny GPT-2 and Llama: one AdamW step of PEFT DoRA with the causal LM
loss, float64.

Run from the repository root, after make_transformers.py and make_decoders.py (it reads each
model's inputs and adapter and changes none of them):

    /work/pyenv/bin/python models/make_transformer_goldens.py [gpt2_tiny|llama_tiny ...]

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
from transformers.pytorch_utils import Conv1D

MODELS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(MODELS_DIR))
import make_transformers  # noqa: E402

DTYPE = torch.float64
import make_decoders  # noqa: E402

# Per model: how to rebuild the float32 base, whether its adapted layers are GPT-2's Conv1D
# (weight stored [in, out], fan_in_fan_out), how many modules PEFT adapts, the exported variants.
CASES = {
    "gpt2_tiny": dict(build=make_transformers.build_gpt2, conv1d=True, n_modules=8,
                      onnx=["legacy_op14", "legacy_op17", "legacy_op17_dynamic", "dynamo_op18"]),
    "llama_tiny": dict(build=make_decoders.MODELS["llama_tiny"]["build"], conv1d=False, n_modules=14,
                       onnx=["legacy_op14", "legacy_op17", "legacy_op17_dynamic", "dynamo_op20"]),
}
FOLDER = None  # models/<model>, set per case by main
CASE = None
OPT = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
EXACT_TOL = 1e-12
FD_H = 1e-6
FD_TOL = 1e-8
# transformers' Llama computes RMSNorm and the attention softmax in float32 even in a float64
# model, so its loss carries float32 rounding (~1e-7 relative, far under the tests' 1e-4): finite
# differences need a wider step there and are a sanity check only.
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
    m = PeftModel.from_pretrained(copy.deepcopy(base).to(DTYPE), str(FOLDER / "peft_dora"), is_trainable=True)
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


def check_base_against_ort(base):
    """For exports whose weights are anonymous (transposed): the rebuilt model gives the ORT golden."""
    ids = load_file(str(FOLDER / "inputs.safetensors"))["input_ids"]
    ort_out = load_file(str(FOLDER / "legacy_op17.ort.safetensors"))["logits"]
    with torch.no_grad():
        e = (base(input_ids=ids).logits - ort_out).abs().max().item()
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


def make_case(name):
    import peft

    base32 = CASE["build"]()
    if CASE["conv1d"]:
        check_base_against_onnx(base32)
    else:
        check_base_against_ort(base32)
    base = copy.deepcopy(base32).to(DTYPE)
    ids = load_file(str(FOLDER / "inputs.safetensors"))["input_ids"]
    gold = load_file(str(FOLDER / "peft_dora_outputs.safetensors"))["logits"]
    cfg = json.loads((FOLDER / "peft_dora" / "adapter_config.json").read_text())
    check(cfg["fan_in_fan_out"] == CASE["conv1d"] and cfg["lora_dropout"] == 0.0 and not cfg["use_rslora"], f"config {cfg}")
    s = cfg["lora_alpha"] / cfg["r"]

    model = load_peft(base)
    with torch.no_grad():
        y_train = model(input_ids=ids).logits
        y_eval = model.eval()(input_ids=ids).logits
    model.train()
    check(torch.equal(y_train, y_eval), "train and eval mode differ (dropout?)")
    e = (y_train - gold).abs().max().item()
    check(e < 1e-13, f"loaded adapter does not reproduce peft_dora_outputs.safetensors ({e:.3e})")
    print(f"  peft_dora (float64, train mode == eval mode) vs peft_dora_outputs.safetensors: max abs {e:.1e}")

    params, mods = trainable(model)
    for mod in mods:  # Conv1D base layers: weight [in, out]; lora_A [r, in], lora_B [out, r], m [out]
        lin = dict(model.named_modules())[f"base_model.model.{mod}"]
        w = lin.get_base_layer()
        if CASE["conv1d"]:
            check(isinstance(w, Conv1D) and lin.fan_in_fan_out, f"{mod} is not a fan_in_fan_out Conv1D")
            i, o = w.weight.shape
        else:
            check(isinstance(w, torch.nn.Linear) and not lin.fan_in_fan_out, f"{mod} is not a Linear")
            o, i = w.weight.shape
        shapes = {k.rsplit(".", 1)[1]: list(p.shape) for k, p in params if k.startswith(mod + ".")}
        check(shapes == {"lora_A": [4, i], "lora_B": [o, 4], "magnitude": [o]}, f"{mod}: shapes {shapes}")
    print(f"  trainable: {len(params)} tensors in {len(mods)} modules: {mods}")
    opt = torch.optim.AdamW([p for _, p in params], lr=OPT["lr"], betas=OPT["betas"], eps=OPT["eps"],
                            weight_decay=OPT["weight_decay"])
    before = {k: p.detach().clone() for k, p in params}
    with torch.no_grad():
        hf = model(input_ids=ids, labels=ids).loss  # before the step
    cap = Capture(model)
    opt.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    loss = lm_loss_by_hand(logits, ids)
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
    print(f"  loss {out['loss'].item():.12f} (ln 256 = {torch.log(torch.tensor(256.0)).item():.6f})")

    # HF's own loss (labels=input_ids, shifted inside the model) is the same formula, but
    # ForCausalLMLoss casts the logits to float32 first: equal to about 1e-7 only.
    check(logits.dtype == DTYPE, f"logits are {logits.dtype}")
    e_hf = rel_err(hf, out["loss"])
    check(e_hf < 1e-6, f"HF's loss differs from the float64 loss by {e_hf:.3e}")
    print(f"  HF model(input_ids, labels=input_ids).loss = {hf.item():.12f} ({hf.dtype}, logits cast to float32 "
          f"by ForCausalLMLoss): rel diff {e_hf:.1e}")
    # the same loss written out: log-softmax, pick the next byte, mean over the 30 positions
    lp = torch.log_softmax(logits.detach()[:, :-1], dim=-1)
    ref = -lp.gather(-1, ids[:, 1:, None]).mean()
    check(rel_err(out["loss"], ref) < EXACT_TOL, "loss by hand differs")
    for k, v in out.items():
        check(bool(torch.isfinite(v).all()), f"{k} not finite")
        if k.startswith("grad."):
            check(v.abs().max().item() > 1e-8, f"{k} is (almost) zero")

    # dora-math.md Backward (detached norm), W0 = Conv1D weight [in, out] as stored
    worst = 0.0
    for mod in mods:
        W0 = make_transformers.w0_doc(dict(model.named_modules())[f"base_model.model.{mod}"].get_base_layer()).detach()
        A, B, m = before[f"{mod}.lora_A"], before[f"{mod}.lora_B"], before[f"{mod}.magnitude"]
        X = cap.x[mod].reshape(-1, W0.shape[0])
        G = cap.g[mod].reshape(-1, W0.shape[1])
        XA = X @ A.T
        u = X @ W0 + s * XA @ B.T
        n = (W0 + s * (B @ A).T).norm(dim=0)
        Gu = G * (m / n)
        refs = {"magnitude": (G * u).sum(0) / n, "lora_B": s * Gu.T @ XA, "lora_A": s * (Gu @ B).T @ X}
        for tag, r in refs.items():
            e = rel_err(grads[f"{mod}.{tag}"], r)
            check(e < EXACT_TOL, f"{mod}.{tag}: grad vs dora-math.md: rel err {e:.3e}")
            worst = max(worst, e)
    print(f"  dora-math.md backward (detached) vs PEFT grads, W0 [in, out]: max rel err {worst:.2e}")

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
    for key, idx in [(f"{mods[0]}.magnitude", (5,)), (f"{mods[-1]}.magnitude", (3,)),
                     (f"{mods[2]}.lora_B", (7, 1)), (f"{mods[3]}.lora_A", (2, 9))]:
        p = fd_params[key]
        vals = []
        with torch.no_grad():
            orig = p[idx].item()
            fd_h = FD_H if CASE["conv1d"] else FD_F32_H
            for h in (fd_h, -fd_h):
                p[idx] = orig + h
                vals.append(lm_loss_by_hand(fd_model(input_ids=ids).logits, ids).item())
            p[idx] = orig
        fd = (vals[0] - vals[1]) / (2 * fd_h)
        gd = grads[key][idx].item()
        print(f"  FD {key}{list(idx)}: fd {fd:+.12e}  detached grad {gd:+.12e}  |diff| {abs(fd - gd):.1e}")
        if key.endswith("magnitude"):
            check(abs(fd - gd) < (FD_TOL if CASE["conv1d"] else FD_F32_TOL),
                  f"FD vs magnitude grad {key}: {abs(fd - gd):.3e}")

    # write
    train_dir = FOLDER / "train"
    train_dir.mkdir(exist_ok=True)
    for p in train_dir.iterdir():
        p.unlink()
    data = {"input_ids": ids.contiguous(), "labels": ids.clone().contiguous()}
    save_file(data, str(train_dir / "data.safetensors"))
    save_file(out, str(train_dir / "dora_lm.safetensors"))
    meta = {
        "model": name,
        "onnx": [f"../{v}.onnx" for v in CASE["onnx"]],
        "dtype": "float64 (model and every tensor of the case file; data.safetensors is int64)",
        "data": "data.safetensors",
        "data_tensors": {k: {"dtype": "int64", "shape": list(v.shape)} for k, v in sorted(data.items())},
        "modules": mods,
        "scaling": s,
        "key_format": "<tag>.<module>.<lora_A|lora_B|magnitude>, tag in grad, after, exp_avg, exp_avg_sq; "
                      "PEFT orientation: lora_A [r, in], lora_B [out, r], magnitude [out]"
                      + (", also for these Conv1D layers whose base weight is stored [in, out] (fan_in_fan_out)"
                         if CASE["conv1d"] else ""),
        "generated_with": {"torch": torch.__version__.split("+")[0], "peft": peft.__version__,
                           "transformers": __import__("transformers").__version__},
        "cases": {
            "dora_lm": {
                "file": "dora_lm.safetensors",
                "method": "dora",
                "adapter": "../peft_dora",
                "norm_grad": "detached",
                "inputs": {"input_ids": "input_ids"},
                "loss": {"kind": "lm", "logits": "logits", "labels": "labels",
                         "formula": "mean over batch and positions t < T-1 of cross_entropy(logits[:, t], labels[:, t+1])",
                         "n_positions": int(ids.shape[0] * (ids.shape[1] - 1)), "ignore_index": -100},
                "batch": "whole data set as one batch (2 sequences of 16 bytes)",
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
