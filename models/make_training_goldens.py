#!/usr/bin/env python3
"""Training goldens: one (or three) AdamW steps of PEFT DoRA / LoRA, in float64.

Run from the repository root, after make_models.py (it reads the models and adapters that
make_models.py wrote and never changes them):

    /work/pyenv/bin/python models/make_training_goldens.py

It writes, for <name> in mlp2d and mlp3d:

    models/<name>/train/data.safetensors    "x" (float32 graph input), "target" (float32, shape of y,
                                            for MSE), "labels" (int64 class indices, for cross-entropy)
    models/<name>/train/<case>.safetensors  loss, gradients, Adam moments and the adapter after the
                                            optimizer step(s), all float64, PEFT orientation
    models/<name>/train/cases.json          the hyper-parameters of every case, and its tensor keys

Cases (every one on the whole data set as a single batch, model and data in float64):

    dora_mse         DoRA, MSE (mean), PEFT's detached norm, one AdamW step (lr 1e-2, wd 0.01)
    lora_mse         the same with the plain LoRA adapter
    dora_mse_exact   as dora_mse, norm NOT detached (PEFT's DoRA forward minus its two detach calls)
    dora_ce          DoRA, softmax cross-entropy on the graph output y, ignore_index -100, one step
    dora_mse_clip    as dora_mse, clip_grad_norm_ (max_norm 0.05 mlp2d, 0.005 mlp3d), AdamW weight_decay 0
    dora_mse_3steps  as dora_mse, three AdamW steps

The base model is rebuilt with make_models.py's own classes and seeds, and checked against the
initializers of model.onnx; the adapters are loaded from peft_dora / peft_lora with
PeftModel.from_pretrained. The script runs its own checks (the formulas of shared/docs/dora-math.md
from hooked activations, central finite differences, a hand-written AdamW, ...) and stops with an
error if one fails. Two runs give byte-identical files.
"""

import copy
import inspect
import json
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.lora import dora as peft_dora
from safetensors.torch import load_file, save_file

MODELS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(MODELS_DIR))
import make_models  # noqa: E402  (the model classes, SPECS and seeds of the bundled models)

DTYPE = torch.float64
IGNORE_INDEX = -100

# Data set sizes (dim 0 = examples). mlp3d's model.onnx has a static input [2, 5, 16]: its data set
# holds 4 examples, i.e. two graph-sized batches; the goldens treat all 4 as one batch.
DATA_SHAPES = {"mlp2d": (8, 16), "mlp3d": (4, 5, 16)}
# Positions of mlp3d's labels set to IGNORE_INDEX.
IGNORED_LABELS = {"mlp3d": [(1, 2), (3, 0)]}

ADAMW_DEFAULT = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
ADAMW_NO_WD = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
# clip_grad_norm_ max_norm per model, chosen below each model's gradient norm so clipping is active:
# mlp3d's MSE on softmax outputs has a total gradient norm of about 0.008 only.
CLIP_MAX_NORM = {"mlp2d": 0.05, "mlp3d": 0.005}
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: clip_coef = max_norm / (total_norm + 1e-6)

CASES = [
    dict(name="dora_mse", method="dora", loss="mse", norm_grad="detached", opt=ADAMW_DEFAULT, clip=None, steps=1),
    dict(name="lora_mse", method="lora", loss="mse", norm_grad=None, opt=ADAMW_DEFAULT, clip=None, steps=1),
    dict(name="dora_mse_exact", method="dora", loss="mse", norm_grad="exact", opt=ADAMW_DEFAULT, clip=None, steps=1),
    dict(name="dora_ce", method="dora", loss="cross_entropy", norm_grad="detached", opt=ADAMW_DEFAULT, clip=None,
         steps=1),
    dict(name="dora_mse_clip", method="dora", loss="mse", norm_grad="detached", opt=ADAMW_NO_WD,
         clip="max_norm", steps=1),
    dict(name="dora_mse_3steps", method="dora", loss="mse", norm_grad="detached", opt=ADAMW_DEFAULT, clip=None,
         steps=3),
]

# Tolerances of the self-checks (everything is float64).
EXACT_TOL = 1e-12  # relative: same quantity computed two ways in float64
FD_TOL = 1e-8  # absolute: central finite differences vs autograd
FD_H = 1e-6
MIN_DETACH_EFFECT = 1e-6  # detached vs exact gradients of A/B must differ by at least this (relative)


class CheckError(RuntimeError):
    pass


def check(cond, msg):
    if not cond:
        raise CheckError(msg)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


# --------------------------------------------------------------------------------------------
# Base model (make_models.py's classes and seeds) and its check against model.onnx
# --------------------------------------------------------------------------------------------


def build_base(spec):
    """Exactly what make_models.make_one does: global seed, then the constructor."""
    torch.manual_seed(spec["seed"])
    return spec["build"]().eval()


def check_against_onnx(model, spec, folder):
    """Every torch parameter must equal an initializer of model.onnx: by name for biases and
    LayerNorm, through the linear node for the weights ([out, in] for Gemm transB=1, [in, out] for
    MatMul). Raises on any mismatch or any unmatched parameter / initializer."""
    g = onnx.load(str(folder / "model.onnx")).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
    nodes = {n.name: n for n in g.node}
    used = set()
    for name, p in model.named_parameters():
        w = p.detach().numpy()
        mod = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and mod in spec["onnx_nodes"]:
            node = nodes[spec["onnx_nodes"][mod]]
            init_name = node.input[1]
            arr = inits[init_name]
            if node.op_type == "Gemm":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                check(attrs.get("transB") == 1, f"{node.name}: expected transB=1")
                ok = arr.shape == w.shape and np.array_equal(arr, w)
            else:
                check(node.op_type == "MatMul", f"{node.name}: unexpected op {node.op_type}")
                ok = arr.shape == w.T.shape and np.array_equal(arr, w.T)
        else:
            init_name = name
            ok = name in inits and inits[name].shape == w.shape and np.array_equal(inits[name], w)
        if not ok:
            raise CheckError(f"{spec['name']}: torch parameter {name} {list(w.shape)} does not equal "
                             f"ONNX initializer {init_name}: the rebuilt model is not the one in model.onnx")
        used.add(init_name)
    check(used == set(inits), f"{spec['name']}: ONNX initializers not matched: {set(inits) - used}")
    print(f"  torch weights == model.onnx initializers ({len(used)} tensors, bitwise)")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def make_data(spec, base):
    name = spec["name"]
    gen = torch.Generator().manual_seed(spec["seed"] + 300)
    x = torch.randn(DATA_SHAPES[name], generator=gen, dtype=torch.float32)
    with torch.no_grad():
        y = base(x)
    if name == "mlp3d":  # the output is a softmax: a probability-like target
        target = torch.softmax(torch.randn(y.shape, generator=gen, dtype=torch.float32), dim=-1)
    else:
        target = torch.randn(y.shape, generator=gen, dtype=torch.float32)
    n_classes = y.shape[-1]
    labels = torch.randint(0, n_classes, y.shape[:-1], generator=gen, dtype=torch.int64)
    for pos in IGNORED_LABELS.get(name, []):
        labels[pos] = IGNORE_INDEX
    return {"x": x.contiguous(), "target": target.contiguous(), "labels": labels.contiguous()}


# --------------------------------------------------------------------------------------------
# PEFT model, trainable parameters, the exact-norm DoRA forward
# --------------------------------------------------------------------------------------------


def load_peft(base, folder, method):
    m = PeftModel.from_pretrained(copy.deepcopy(base).to(DTYPE), str(folder / f"peft_{method}"), is_trainable=True)
    m.to(DTYPE)
    m.train()
    return m


def trainable_params(model, modules, method):
    """[(golden key suffix, parameter)] in named_parameters order; fails unless the trainable set is
    exactly lora_A, lora_B (and for DoRA lora_magnitude_vector) of every target module."""
    got = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    expected = {}
    for mod in modules:
        expected[f"base_model.model.{mod}.lora_A.default.weight"] = f"{mod}.lora_A"
        expected[f"base_model.model.{mod}.lora_B.default.weight"] = f"{mod}.lora_B"
        if method == "dora":
            expected[f"base_model.model.{mod}.lora_magnitude_vector.default.weight"] = f"{mod}.magnitude"
    names = [n for n, _ in got]
    check(sorted(names) == sorted(expected), f"trainable params {names} != expected {sorted(expected)}")
    for n, p in got:
        check(p.dtype == DTYPE, f"{n} is {p.dtype}")
    return [(expected[n], p) for n, p in got], names


def make_exact_norm_forward():
    """PEFT's DoraLinearLayer.forward, source-edited to drop its two detach calls (the lora_weight
    passed to get_weight_norm, and weight_norm itself). Everything else is PEFT's own code, compiled
    in the namespace of peft.tuners.lora.dora. Fails loudly if PEFT's source does not have the
    expected lines."""
    src = textwrap.dedent(inspect.getsource(peft_dora.DoraLinearLayer.forward))
    edits = [
        ("weight=weight, lora_weight=lora_weight.detach(), scaling=scaling",
         "weight=weight, lora_weight=lora_weight, scaling=scaling"),
        ("weight_norm = weight_norm.detach()\n", "pass  # exact norm gradient: no detach\n"),
    ]
    for old, new in edits:
        check(src.count(old) == 1, f"PEFT's DoraLinearLayer.forward changed: {old!r} found {src.count(old)} times")
        src = src.replace(old, new)
    check(".detach()" not in src, "a detach is left in the exact-norm forward")
    ns = {}
    exec(compile(src, "<dora_forward_exact_norm>", "exec"), vars(peft_dora).copy(), ns)
    return ns["forward"]


EXACT_FORWARD = make_exact_norm_forward()


class ExactNorm:
    """Context manager: DoraLinearLayer.forward -> the exact-norm copy."""

    def __enter__(self):
        self.saved = peft_dora.DoraLinearLayer.forward
        peft_dora.DoraLinearLayer.forward = EXACT_FORWARD

    def __exit__(self, *exc):
        peft_dora.DoraLinearLayer.forward = self.saved


def compute_loss(kind, y, data):
    if kind == "mse":
        return F.mse_loss(y, data["target"].to(DTYPE), reduction="mean")
    # cross-entropy with the graph output y as logits, positions flattened
    return F.cross_entropy(y.reshape(-1, y.shape[-1]), data["labels"].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="mean")


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------


class Capture:
    """Forward hooks on the LoRA layers: layer input and dL/d(layer output) of the last backward."""

    def __init__(self, model):
        self.x, self.g, self.handles = {}, {}, []
        for name, mod in model.named_modules():
            if isinstance(mod, LoraLayer):
                short = name.removeprefix("base_model.model.")
                self.handles.append(mod.register_forward_hook(self._hook(short)))

    def _hook(self, name):
        def fn(mod, args, out):
            self.x[name] = args[0].detach()

            def grad_hook(g):
                self.g[name] = g.detach()

            out.register_hook(grad_hook)

        return fn

    def remove(self):
        for h in self.handles:
            h.remove()


def run_case(spec, case, base, data, folder):
    method = case["method"]
    model = load_peft(base, folder, method)
    params, names = trainable_params(model, spec["target_modules"], method)
    print(f"  [{case['name']}] optimizer params ({len(names)}): {names}")
    opt = torch.optim.AdamW([p for _, p in params], lr=case["opt"]["lr"], betas=case["opt"]["betas"],
                            eps=case["opt"]["eps"], weight_decay=case["opt"]["weight_decay"])
    groups = opt.param_groups
    check(len(groups) == 1 and len(groups[0]["params"]) == len(params), "optimizer does not hold every param")
    check(not groups[0]["amsgrad"] and not groups[0]["maximize"], "unexpected AdamW flags")
    x = data["x"].to(DTYPE)
    before = {k: p.detach().clone() for k, p in params}
    losses, grads, extra, cap = [], None, {}, Capture(model)
    ctx = ExactNorm() if case["norm_grad"] == "exact" else None
    if ctx:
        ctx.__enter__()
    try:
        for step in range(case["steps"]):
            opt.zero_grad(set_to_none=True)
            y = model(x)
            loss = compute_loss(case["loss"], y, data)
            loss.backward()
            losses.append(loss.detach().clone())
            grads = {k: p.grad.detach().clone() for k, p in params}  # last step's raw gradients
            if step == 0:
                first = dict(grads=grads, x_in=dict(cap.x), g_out=dict(cap.g), y=y.detach().clone())
            if case["clip"] is not None:
                max_norm = CLIP_MAX_NORM[spec["name"]]
                total = torch.nn.utils.clip_grad_norm_([p for _, p in params], max_norm=max_norm)
                extra["grad_norm"] = total.detach().clone()
                extra["clip_coef"] = torch.clamp(max_norm / (total + CLIP_EPS), max=1.0).detach().clone()
            opt.step()
    finally:
        if ctx:
            ctx.__exit__()
        cap.remove()
    out = {}
    if case["steps"] == 1:
        out["loss"] = losses[0].reshape([])
    else:
        out["losses"] = torch.stack(losses).reshape([case["steps"]])
    out.update(extra)
    for k, p in params:
        st = opt.state[p]
        check(int(st["step"]) == case["steps"], f"{k}: Adam step {st['step']}")
        out[f"grad.{k}"] = grads[k]
        out[f"after.{k}"] = p.detach().clone()
        out[f"exp_avg.{k}"] = st["exp_avg"].detach().clone()
        out[f"exp_avg_sq.{k}"] = st["exp_avg_sq"].detach().clone()
    out = {k: v.to(DTYPE).contiguous() for k, v in sorted(out.items())}
    return out, dict(model=model, before=before, first=first, params=params)


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def layer_tensors(spec, state, mod):
    """W0 in the doc's orientation [in, out], bias, A [r, in], B [out, r], m [out] (before the step)."""
    base_lin = dict(state["model"].named_modules())[f"base_model.model.{mod}"].get_base_layer()
    W0 = base_lin.weight.detach().T
    A = state["before"][f"{mod}.lora_A"]
    B = state["before"][f"{mod}.lora_B"]
    m = state["before"].get(f"{mod}.magnitude")
    return W0, A, B, m


def check_doc_formulas(spec, case, state, scaling):
    """Gradients of shared/docs/dora-math.md's Backward section, from the hooked layer input X and
    G = dL/dy of each adapted layer, against PEFT's autograd gradients (first step)."""
    s = scaling
    worst = 0.0
    for mod in spec["target_modules"]:
        W0, A, B, m = layer_tensors(spec, state, mod)
        X = state["first"]["x_in"][mod].reshape(-1, W0.shape[0])
        G = state["first"]["g_out"][mod].reshape(-1, W0.shape[1])
        XA = X @ A.T  # [N, r]
        u = X @ W0 + s * XA @ B.T  # [N, out]
        pg = state["first"]["grads"]
        if m is None:  # LoRA
            dB = s * G.T @ XA
            dA = s * (G @ B).T @ X
        else:
            V = W0 + s * (B @ A).T
            n = V.norm(dim=0)
            g = m / n
            Gu = G * g
            Gu_sum = (G * u).sum(0)
            dm = Gu_sum / n
            dB = s * Gu.T @ XA
            dA = s * (Gu @ B).T @ X
            if case["norm_grad"] == "exact":
                c = (-m / n**2 * Gu_sum) / n
                AW0, AAt = A @ W0, A @ A.T
                dB = dB + s * c[:, None] * (AW0.T + s * B @ AAt)
                dA = dA + s * (B.T @ torch.diag(c) @ W0.T + s * B.T @ torch.diag(c) @ B @ A)
            e = rel_err(pg[f"{mod}.magnitude"], dm)
            check(e < EXACT_TOL, f"{mod}: magnitude grad vs dL/dm_j = sum_i G u / n_j: rel err {e:.3e}")
            worst = max(worst, e)
        for key, ref in [("lora_A", dA), ("lora_B", dB)]:
            e = rel_err(pg[f"{mod}.{key}"], ref)
            check(e < EXACT_TOL, f"{mod}.{key}: grad vs dora-math.md formula: rel err {e:.3e}")
            worst = max(worst, e)
    print(f"    dora-math.md backward formulas ({case['norm_grad'] or 'lora'}) vs PEFT grads: "
          f"max rel err {worst:.2e}")


def adamw_by_hand(p0, grads_per_step, opt):
    """PyTorch AdamW (decoupled weight decay, bias correction, eps outside the sqrt)."""
    lr, (b1, b2), eps, wd = opt["lr"], opt["betas"], opt["eps"], opt["weight_decay"]
    p, mom, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for t, g in enumerate(grads_per_step, start=1):
        p = p * (1 - lr * wd)
        mom = b1 * mom + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat = mom / (1 - b1**t)
        denom = (v / (1 - b2**t)).sqrt() + eps
        p = p - lr * mhat / denom
    return p, mom, v


def check_adamw_one_step(case, out, state):
    worst = 0.0
    for k, _ in state["params"]:
        g = out[f"grad.{k}"]
        if case["clip"] is not None:
            g = g * out["clip_coef"]
        p, mom, v = adamw_by_hand(state["before"][k], [g], case["opt"])
        for tag, ref in [("after", p), ("exp_avg", mom), ("exp_avg_sq", v)]:
            e = rel_err(out[f"{tag}.{k}"], ref)
            check(e < EXACT_TOL, f"{k}: {tag} vs hand AdamW: rel err {e:.3e}")
            worst = max(worst, e)
        moved = (out[f"after.{k}"] - state["before"][k]).abs().max().item()
        check(moved > 0, f"{k}: the optimizer step did not move it")
    print(f"    hand-written AdamW vs torch.optim.AdamW: max rel err {worst:.2e}")


def check_grads_finite_nonzero(case, out):
    for k, v in out.items():
        check(bool(torch.isfinite(v).all()), f"{case['name']}: {k} not finite")
        if k.startswith("grad."):
            check(v.abs().max().item() > 1e-8, f"{case['name']}: {k} is (almost) zero")


def loss_at(model, data, kind):
    with torch.no_grad():
        return compute_loss(kind, model(data["x"].to(DTYPE)), data).item()


def finite_differences(spec, base, data, folder, kind, entries):
    """Central differences of the loss (PEFT model, default forward: the forward value does not
    depend on the detach) w.r.t. single adapter entries."""
    model = load_peft(base, folder, "dora")
    params = dict(trainable_params(model, spec["target_modules"], "dora")[0])
    fd = {}
    for key, idx in entries:
        p = params[key]
        with torch.no_grad():
            orig = p[idx].item()
            p[idx] = orig + FD_H
            lp = loss_at(model, data, kind)
            p[idx] = orig - FD_H
            lm = loss_at(model, data, kind)
            p[idx] = orig
        fd[(key, idx)] = (lp - lm) / (2 * FD_H)
    return fd


def check_finite_differences(spec, base, data, folder, outs):
    mods = spec["target_modules"]
    entries = [(f"{mods[0]}.lora_B", (3, 1)), (f"{mods[-1]}.lora_B", (2, 0)),
               (f"{mods[1]}.lora_A", (1, 5)), (f"{mods[-1]}.magnitude", (1,))]
    fd = finite_differences(spec, base, data, folder, "mse", entries)
    det, exact = outs["dora_mse"], outs["dora_mse_exact"]
    for (key, idx), v in fd.items():
        ge = exact[f"grad.{key}"][idx].item()
        gd = det[f"grad.{key}"][idx].item()
        print(f"    FD {key}{list(idx)}: fd {v:+.12e}  exact {ge:+.12e} (|diff| {abs(v - ge):.1e})  "
              f"detached {gd:+.12e} (|diff| {abs(v - gd):.1e})")
        check(abs(v - ge) < FD_TOL, f"FD vs exact gradient for {key}{list(idx)}: {abs(v - ge):.3e}")
        if key.endswith("magnitude"):
            # m does not enter the norm: both modes give the true gradient
            check(abs(v - gd) < FD_TOL, f"FD vs detached magnitude gradient {key}: {abs(v - gd):.3e}")
        else:
            # the detached gradient must be off by far more than the finite-difference error
            check(abs(v - gd) > 1e3 * max(abs(v - ge), 1e-12),
                  f"FD should differ from the detached gradient for {key}{list(idx)}")


def check_exact_vs_detached(spec, base, data, folder, outs):
    """The exact-norm forward reproduces PEFT's output bitwise; A/B grads differ, m grads agree."""
    x = data["x"].to(DTYPE)
    model = load_peft(base, folder, "dora")
    with torch.no_grad():
        y_peft = model(x)
        with ExactNorm():
            y_exact = model(x)
    check(torch.equal(y_peft, y_exact), "exact-norm forward does not reproduce PEFT's output bitwise")
    det, exact = outs["dora_mse"], outs["dora_mse_exact"]
    check(torch.equal(det["loss"], exact["loss"]), "loss differs between detached and exact")
    msg = []
    for mod in spec["target_modules"]:
        for key in ["lora_A", "lora_B"]:
            e = rel_err(det[f"grad.{mod}.{key}"], exact[f"grad.{mod}.{key}"])
            check(e > MIN_DETACH_EFFECT, f"{mod}.{key}: detached and exact grads do not differ ({e:.3e})")
            msg.append(f"{mod}.{key} {e:.2e}")
        e = rel_err(det[f"grad.{mod}.magnitude"], exact[f"grad.{mod}.magnitude"])
        check(e < EXACT_TOL, f"{mod}: magnitude grad differs between detached and exact ({e:.3e})")
    print("    exact-norm forward == PEFT forward (bitwise); rel diff of exact vs detached grads: " + ", ".join(msg))


def check_inference_golden(spec, base, folder, method):
    """The loaded float64 PEFT model reproduces peft_<method>_outputs.safetensors on inputs.safetensors,
    in train mode and in eval mode."""
    x = load_file(str(folder / "inputs.safetensors"))["x"].to(DTYPE)
    y_gold = load_file(str(folder / f"peft_{method}_outputs.safetensors"))["y"]
    model = load_peft(base, folder, method)
    with torch.no_grad():
        y_train = model(x)
        y_eval = model.eval()(x)
    e = (y_train - y_gold).abs().max().item()
    check(e < 1e-13, f"{method}: loaded adapter does not reproduce the inference golden ({e:.3e})")
    check(torch.equal(y_train, y_eval), f"{method}: train and eval mode outputs differ")
    print(f"  peft_{method} (float64, train mode) vs peft_{method}_outputs.safetensors: max abs {e:.1e}")


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def case_json(case, out, data, spec):
    opt = case["opt"]
    loss = ({"kind": "mse", "reduction": "mean", "prediction": "y", "target": "target"}
            if case["loss"] == "mse" else
            {"kind": "cross_entropy", "reduction": "mean_over_non_ignored", "logits": "y",
             "logits_layout": "graph output reshaped to [-1, classes] (classes = last dim)",
             "labels": "labels", "ignore_index": IGNORE_INDEX,
             "n_non_ignored": int((data["labels"] != IGNORE_INDEX).sum())})
    return {
        "file": f"{case['name']}.safetensors",
        "method": case["method"],
        "adapter": f"../peft_{case['method']}",
        "norm_grad": case["norm_grad"],
        "loss": loss,
        "inputs": {"x": "x"},
        "batch": "whole data set as one batch",
        "steps": case["steps"],
        "optimizer": {"kind": "adamw", "lr": opt["lr"], "betas": list(opt["betas"]), "eps": opt["eps"],
                      "weight_decay": opt["weight_decay"], "amsgrad": False, "maximize": False,
                      "decoupled_weight_decay": True, "weight_decay_on": "all trainable tensors, magnitude included"},
        "grad_clip": None if case["clip"] is None else {
            "max_norm": CLIP_MAX_NORM[spec["name"]], "norm_type": 2.0, "eps": CLIP_EPS,
            "scope": "one global L2 norm over all trainable tensors",
            "formula": "g *= min(1, max_norm / (total_norm + eps)); grad.* are the gradients BEFORE clipping"},
        "grad_step": case["steps"],
        "tensors": {k: list(v.shape) for k, v in sorted(out.items())},
    }


def make_one(spec):
    name = spec["name"]
    folder = MODELS_DIR / name
    train_dir = folder / "train"
    print(f"\n=================== {name} ===================")
    base32 = build_base(spec)
    check_against_onnx(base32, spec, folder)
    base = copy.deepcopy(base32).to(DTYPE)
    for method in ["dora", "lora"]:
        check_inference_golden(spec, base, folder, method)
        cfg = json.loads((folder / f"peft_{method}" / "adapter_config.json").read_text())
        check(cfg["lora_dropout"] == 0.0 and not cfg["use_rslora"] and sorted(cfg["target_modules"]) ==
              sorted(spec["target_modules"]), f"unexpected adapter config {cfg}")
    scaling = cfg["lora_alpha"] / cfg["r"]

    data = make_data(spec, base32)
    print("  data:", {k: (str(v.dtype), list(v.shape)) for k, v in data.items()})

    outs, jcases = {}, {}
    for case in CASES:
        out, state = run_case(spec, case, base, data, folder)
        check_grads_finite_nonzero(case, out)
        check_doc_formulas(spec, case, state, scaling)
        # the loss itself, by hand
        y = state["first"]["y"]
        if case["loss"] == "mse":
            ref = ((y - data["target"].to(DTYPE)) ** 2).mean()
        else:
            lab = data["labels"].reshape(-1)
            keep = lab != IGNORE_INDEX
            logp = torch.log_softmax(y.reshape(-1, y.shape[-1]), dim=-1)
            ref = -logp[keep.nonzero().squeeze(1), lab[keep]].mean()
        first_loss = out["loss"] if "loss" in out else out["losses"][0]
        check(rel_err(first_loss, ref) < EXACT_TOL, f"{case['name']}: loss by hand differs")
        if case["steps"] == 1:
            check_adamw_one_step(case, out, state)
        if case["clip"] is not None:
            total = torch.sqrt(sum((out[f"grad.{k}"] ** 2).sum() for k, _ in state["params"]))
            check(rel_err(out["grad_norm"], total) < EXACT_TOL, "grad_norm differs from the hand L2 norm")
            max_norm = CLIP_MAX_NORM[spec["name"]]
            check(out["grad_norm"].item() > max_norm, "clipping is not active (grad norm <= max_norm)")
            check(out["clip_coef"].item() < 0.9, "clipping barely active")
            print(f"    grad_norm {out['grad_norm'].item():.6e} > max_norm {max_norm}: "
                  f"clip_coef {out['clip_coef'].item():.6e}")
        l = out["loss"].item() if "loss" in out else out["losses"].tolist()
        print(f"    loss {l}")
        outs[case["name"]] = out
        jcases[case["name"]] = case_json(case, out, data, spec)

    # cross-case checks
    check_exact_vs_detached(spec, base, data, folder, outs)
    check_finite_differences(spec, base, data, folder, outs)
    c3, c1 = outs["dora_mse_3steps"], outs["dora_mse"]
    check(torch.equal(c3["losses"][0], c1["loss"]), "3steps: first loss != dora_mse loss")
    check(bool((c3["losses"][1:] < c3["losses"][:-1]).all()), "3steps: the loss does not decrease")
    # 3 steps by hand: recompute each step's gradient with autograd, AdamW by hand
    model = load_peft(base, folder, "dora")
    params = trainable_params(model, spec["target_modules"], "dora")[0]
    state = {k: (p.detach().clone(), torch.zeros_like(p), torch.zeros_like(p)) for k, p in params}
    opt = ADAMW_DEFAULT
    lr, (b1, b2), eps, wd = opt["lr"], opt["betas"], opt["eps"], opt["weight_decay"]
    for t in range(1, 4):
        for _, p in params:
            p.grad = None
        loss = compute_loss("mse", model(data["x"].to(DTYPE)), data)
        loss.backward()
        check(rel_err(loss.detach(), c3["losses"][t - 1]) < EXACT_TOL, f"3steps: loss {t} by hand differs")
        with torch.no_grad():
            for k, p in params:
                w, mom, v = state[k]
                w = w * (1 - lr * wd)
                mom = b1 * mom + (1 - b1) * p.grad
                v = b2 * v + (1 - b2) * p.grad ** 2
                w = w - lr * (mom / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
                state[k] = (w, mom, v)
                p.copy_(w)
    worst = max(max(rel_err(c3[f"after.{k}"], state[k][0]), rel_err(c3[f"exp_avg.{k}"], state[k][1]),
                    rel_err(c3[f"exp_avg_sq.{k}"], state[k][2])) for k, _ in params)
    check(worst < 1e-10, f"3steps: hand AdamW differs ({worst:.3e})")
    print(f"  dora_mse_3steps by hand (autograd grads, hand AdamW x3): max rel err {worst:.2e}")

    # write
    train_dir.mkdir(exist_ok=True)
    for p in train_dir.iterdir():
        p.unlink()
    save_file(dict(sorted(data.items())), str(train_dir / "data.safetensors"))
    for cname, out in outs.items():
        save_file(out, str(train_dir / f"{cname}.safetensors"))
    meta = {
        "model": name,
        "dtype": "float64 (model, data and every tensor of the case files; data.safetensors itself is float32/int64)",
        "data": "data.safetensors",
        "data_tensors": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                         for k, v in sorted(data.items())},
        "note_static_batch": ("model.onnx has a static input [2, 5, 16]; the data set has 4 examples, "
                              "used as ONE batch of 4 here") if name == "mlp3d" else None,
        "modules": list(spec["target_modules"]),
        "scaling": scaling,
        "key_format": "<tag>.<module>.<lora_A|lora_B|magnitude>, tag in grad, after, exp_avg, exp_avg_sq; "
                      "PEFT orientation: lora_A [r, in], lora_B [out, r], magnitude [out]",
        "generated_with": {"torch": torch.__version__.split("+")[0], "peft": __import__("peft").__version__},
        "cases": jcases,
    }
    (train_dir / "cases.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    for p in train_dir.iterdir():
        p.chmod(0o644)
    print(f"  files in models/{name}/train:")
    for p in sorted(train_dir.iterdir()):
        print(f"    {p.name:32s} {p.stat().st_size:7d} B")


def main():
    import peft

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, peft {peft.__version__}")
    torch.set_num_threads(1)  # deterministic CPU reductions
    for spec in make_models.SPECS:
        make_one(spec)
    print("\nall checks passed")


if __name__ == "__main__":
    main()
