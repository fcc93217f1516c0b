#!/usr/bin/env python3
"""Make models/eval_goldens.json: reference metrics for `dorac eval`, computed without dorac.

Run from the repository root (about 10 s on 2 CPU cores):

    /work/pyenv/bin/python models/make_eval_goldens.py

It writes:

    models/shift/peft_dora/              PEFT DoRA adapter for models/shift/base.onnx (r 4, alpha 8,
                                         fc1, fc2, head; init_lora_weights=False so B != 0, then every
                                         magnitude m *= 1 + 0.1 * N(0,1)): adapter_config.json and
                                         adapter_model.safetensors only
    models/text/eval_lm.safetensors      the first 32 windows of models/text/corpus.safetensors:
                                         input_ids, labels int64 [32, 16], labels -100 where the flat
                                         index i (row-major) has i % 7 == 3
    models/eval_goldens.json             a list of cases: model, adapter, data, loss kind, label tensor,
                                         examples, counted positions, loss, correct, accuracy,
                                         min_margin, and how the outputs were computed

Metrics, as `dorac eval` defines them (all in float64 with numpy, over the whole data set):

    mse            mean over every output element of every example of (y - target)^2; no accuracy
    cross-entropy  mean over positions with label != -100 of logsumexp(logits) - logits[label];
                   accuracy = positions whose argmax (first index on ties) equals the label / counted
    lm             logits [N, T, V] at position t scored against label t + 1, t = 0 .. T-2; -100 skipped

The model outputs come from onnxruntime (CPU, float32 logits) or from PEFT on a float64 copy of the
torch model (the inputs cast to float64). `min_margin` is the smallest top-1 minus top-2 logit gap
over the counted positions, so one can see that the accuracy counts do not hang on a near tie.

The script also checks: the torch models' weights equal the ONNX initializers; ORT equals a float64
torch forward pass (loss within 1e-5, the same correct count); the saved DoRA adapter, reloaded, gives PEFT's
output, and a numpy DoRA forward from the saved files equals it.

Deterministic: fixed torch seeds (global seed before get_peft_model, explicit generators for the
perturbation), one CPU thread; two runs give byte-identical files.
"""

import copy
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.numpy import load_file, save_file

import make_models as mm
import make_shift as ms

MODELS = Path(__file__).resolve().parent
ROOT = MODELS.parent

SHIFT_PEFT_SEED = 31  # global torch seed for PEFT's random A and B (init_lora_weights=False)
SHIFT_MAG_SEED = 32  # generator for m *= 1 + 0.1 * N(0,1)
LM_ROWS = 32
LM_IGNORE_EVERY, LM_IGNORE_AT = 7, 3  # labels[flat i] = -100 when i % 7 == 3
NEAR_TIE = 1e-4


def rel(p):
    return str(Path(p).resolve().relative_to(ROOT))


# --------------------------------------------------------------------------------------------
# Metrics (float64, numpy)
# --------------------------------------------------------------------------------------------


def mse(y, target):
    y, target = np.asarray(y, np.float64), np.asarray(target, np.float64)
    assert y.shape == target.shape, (y.shape, target.shape)
    return dict(counted=int(y.size), loss_value=float(np.mean((y - target) ** 2)), correct=None,
                accuracy=None, min_margin=None)


def cross_entropy(logits, labels):
    """logits [..., C], labels [...] int; positions with label -100 are skipped."""
    logits = np.asarray(logits, np.float64)
    c = logits.shape[-1]
    logits, labels = logits.reshape(-1, c), np.asarray(labels).reshape(-1)
    keep = labels != -100
    z, t = logits[keep], labels[keep]
    assert np.all((t >= 0) & (t < c)), "label out of range"
    zmax = z.max(axis=1)
    lse = zmax + np.log(np.exp(z - zmax[:, None]).sum(axis=1))
    nll = lse - z[np.arange(len(t)), t]
    correct = int((z.argmax(axis=1) == t).sum())  # np.argmax: first index on ties
    top2 = np.sort(z, axis=1)[:, -2:]
    return dict(counted=int(keep.sum()), loss_value=float(nll.mean()), correct=correct,
                accuracy=correct / int(keep.sum()), min_margin=float((top2[:, 1] - top2[:, 0]).min()))


def lm(logits, labels):
    """logits [N, T, V]: position t predicts labels[:, t + 1]."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    assert logits.ndim == 3 and labels.shape == logits.shape[:2], (logits.shape, labels.shape)
    return cross_entropy(logits[:, :-1, :], labels[:, 1:])


METRICS = {"mse": mse, "cross-entropy": cross_entropy, "lm": lm}


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def onnx_inputs(path):
    m = onnx.load(str(path))
    inits = {t.name for t in m.graph.initializer}
    return [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
            for i in m.graph.input if i.name not in inits]


def run_ort(path, feeds):
    """Run in chunks of the model's batch size when dim 0 is fixed; concatenate the first output."""
    (name0, shape0), *_ = onnx_inputs(path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    n = len(next(iter(feeds.values())))
    chunk = shape0[0] if isinstance(shape0[0], int) and shape0[0] > 0 else n
    assert n % chunk == 0, (n, chunk)
    outs = [sess.run(None, {k: v[i:i + chunk] for k, v in feeds.items()})[0] for i in range(0, n, chunk)]
    return np.concatenate(outs, axis=0), chunk


def shift_base_torch():
    """make_shift.MLP with the weights read from models/shift/base.onnx (checked: Gemm, transB=1,
    so the initializers are in torch's [out, in] layout)."""
    m = onnx.load(str(MODELS / "shift" / "base.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    state = {}
    for name in ("fc1", "fc2", "head"):
        w = f"{name}.weight"
        nodes = [n for n in m.graph.node if w in n.input]
        assert len(nodes) == 1 and nodes[0].op_type == "Gemm", nodes
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
        assert attrs.get("transB") == 1 and attrs.get("transA", 0) == 0, attrs
        assert list(nodes[0].input[1:]) == [w, f"{name}.bias"], nodes[0].input
        for k in (w, f"{name}.bias"):
            state[k] = torch.from_numpy(inits[k].copy())
    model = ms.MLP()
    model.load_state_dict(state)  # strict: shapes [64, 32], [64, 64], [8, 64] as torch [out, in]
    return model.eval(), inits


def numpy_dora_forward(inits, adapter_dir, x):
    """The shift MLP with a DoRA adapter, from the files alone, float64:
    W' = m / ||W0 + s B A||_row * (W0 + s B A), y = x W'^T + b."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    ad = load_file(str(adapter_dir / "adapter_model.safetensors"))
    s = cfg["lora_alpha"] / (np.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    h = x.astype(np.float64)
    for i, name in enumerate(("fc1", "fc2", "head")):
        w0 = inits[f"{name}.weight"].astype(np.float64)
        a = ad[f"base_model.model.{name}.lora_A.weight"].astype(np.float64)
        b = ad[f"base_model.model.{name}.lora_B.weight"].astype(np.float64)
        mag = ad[f"base_model.model.{name}.lora_magnitude_vector"].astype(np.float64)
        v = w0 + s * b @ a
        w = (mag / np.linalg.norm(v, axis=1))[:, None] * v
        h = h @ w.T + inits[f"{name}.bias"].astype(np.float64)
        if i < 2:
            h = np.maximum(h, 0)
    return h


def make_shift_adapter(base):
    torch.manual_seed(SHIFT_PEFT_SEED)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True, init_lora_weights=False,
                     target_modules=["fc1", "fc2", "head"])
    pm = get_peft_model(copy.deepcopy(base), cfg).eval()
    gen = torch.Generator().manual_seed(SHIFT_MAG_SEED)
    n = 0
    with torch.no_grad():
        for _, mod in pm.named_modules():
            if isinstance(mod, LoraLayer):
                n += 1
                assert mod.lora_B["default"].weight.abs().max() > 0
                m = mod.lora_magnitude_vector["default"].weight
                m.mul_(1 + 0.1 * torch.randn(m.shape, generator=gen, dtype=m.dtype))
    assert n == 3, n
    dest = MODELS / "shift" / "peft_dora"
    mm.save_adapter_flat(pm, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = sorted(load_file(str(dest / "adapter_model.safetensors")))
    want = sorted(f"base_model.model.{m}.{k}" for m in ("fc1", "fc2", "head")
                  for k in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"))
    assert keys == want, keys
    print(f"wrote {rel(dest)}: {keys}")
    return pm, dest


def peft_f64(pm, x):
    with torch.no_grad():
        return copy.deepcopy(pm).double().eval()(torch.from_numpy(x).double()).numpy()


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def case(name, model, adapter, data, loss, labels, outputs, label_values, how):
    r = METRICS[loss](outputs, label_values)
    out = dict(name=name, model=rel(model), adapter=rel(adapter) if adapter else None, data=rel(data),
               loss=loss, labels=labels, examples=int(len(outputs)), counted=r["counted"],
               loss_value=r["loss_value"], correct=r["correct"], accuracy=r["accuracy"],
               min_margin=r["min_margin"], how=how)
    if r["min_margin"] is not None and r["min_margin"] < NEAR_TIE:
        out["how"] += f" Near tie: the smallest top-1/top-2 gap is {r['min_margin']:.2e}."
    return out, r


def check_close(what, a, b, tol):
    d = abs(a - b)
    print(f"  check {what}: {a!r} vs {b!r} (diff {d:.1e}, tol {tol:g})")
    assert d <= tol, (what, a, b)


def main():
    import peft

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, peft {peft.__version__}, "
          f"onnx {onnx.__version__}, onnxruntime {ort.__version__}")
    torch.set_num_threads(1)
    cases = []

    # 1. shift base, onnxruntime.
    shift_onnx = MODELS / "shift" / "base.onnx"
    print(f"{rel(shift_onnx)} inputs: {onnx_inputs(shift_onnx)}")
    base, inits = shift_base_torch()
    datasets = {k: load_file(str(MODELS / "shift" / f"{k}.safetensors")) for k in ("eval_a", "eval_b")}
    d = datasets["eval_b"]
    logits, _ = run_ort(shift_onnx, {"x": d["x"]})
    c, r = case("shift_base", shift_onnx, None, MODELS / "shift" / "eval_b.safetensors", "cross-entropy",
                "labels", logits, d["labels"],
                "onnxruntime CPUExecutionProvider on models/shift/base.onnx (float32 logits), metrics in float64.")
    cases.append(c)
    with torch.no_grad():
        ref = cross_entropy(base.double()(torch.from_numpy(d["x"]).double()).numpy(), d["labels"])
    base.float()
    check_close("shift_base loss, ORT vs torch float64", r["loss_value"], ref["loss_value"], 1e-5)
    assert r["correct"] == ref["correct"]

    # 2, 3. shift with a PEFT DoRA adapter, float64.
    pm, dest = make_shift_adapter(base)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), str(dest)).eval()
    for key, cname in (("eval_b", "shift_peft_dora"), ("eval_a", "shift_peft_dora_eval_a")):
        d = datasets[key]
        y = peft_f64(pm, d["x"])
        y_reload = peft_f64(reloaded, d["x"])
        y_np = numpy_dora_forward(inits, dest, d["x"])
        err_reload, err_np = np.abs(y - y_reload).max(), np.abs(y - y_np).max()
        print(f"  {cname}: max|reloaded - in-memory| {err_reload:.1e}, max|numpy DoRA - PEFT| {err_np:.1e}, "
              f"max|PEFT - base ORT| {np.abs(y - run_ort(shift_onnx, {'x': d['x']})[0]).max():.2f}")
        assert err_reload == 0.0 and err_np < 1e-10, (err_reload, err_np)
        c, _ = case(cname, shift_onnx, dest, MODELS / "shift" / f"{key}.safetensors", "cross-entropy", "labels",
                    y, d["labels"], "PEFT (PeftModel with the saved DoRA adapter) on the torch MLP rebuilt "
                    "from base.onnx's initializers, model and x cast to float64; equals a numpy DoRA forward "
                    "pass from the saved files to 1e-10.")
        cases.append(c)

    # 4. mlp2d + PEFT LoRA on the demo teacher data, MSE, float64.
    spec = next(s for s in mm.SPECS if s["name"] == "mlp2d")
    torch.manual_seed(spec["seed"])  # the same weights as models/mlp2d/model.onnx
    mbase = spec["build"]().eval()
    monnx = MODELS / "mlp2d" / "model.onnx"
    minits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(monnx)).graph.initializer}
    state = mbase.state_dict()
    assert set(minits) == set(state), (sorted(minits), sorted(state))
    for k in state:
        assert np.array_equal(minits[k], state[k].numpy()), k
    print(f"{rel(monnx)} inputs: {onnx_inputs(monnx)}; torch weights equal its {len(minits)} initializers")
    ldir = MODELS / "mlp2d" / "peft_lora"
    lora_model = PeftModel.from_pretrained(mbase, str(ldir)).eval()
    d = load_file(str(MODELS / "demo" / "teacher.safetensors"))
    y = peft_f64(lora_model, d["x"])
    c, _ = case("mlp2d_peft_lora_mse", monnx, ldir, MODELS / "demo" / "teacher.safetensors", "mse", "target",
                y, d["target"], "PEFT (PeftModel.from_pretrained with models/mlp2d/peft_lora) on make_models.py's "
                "mlp2d (seed 1234, weights equal to model.onnx's initializers), model and x cast to float64.")
    cases.append(c)

    # 5. gpt2_tiny, lm loss, onnxruntime.
    gonnx = MODELS / "gpt2_tiny" / "legacy_op17.onnx"
    gin = onnx_inputs(gonnx)
    print(f"{rel(gonnx)} inputs: {gin}")
    assert [n for n, _ in gin] == ["input_ids"], gin  # no attention_mask input
    corpus = load_file(str(MODELS / "text" / "corpus.safetensors"))
    ids = corpus["input_ids"][:LM_ROWS].copy()
    assert np.array_equal(corpus["labels"][:LM_ROWS], ids)
    labels = ids.copy().reshape(-1)
    labels[np.arange(labels.size) % LM_IGNORE_EVERY == LM_IGNORE_AT] = -100
    labels = labels.reshape(ids.shape)
    lm_path = MODELS / "text" / "eval_lm.safetensors"
    save_file({"input_ids": ids.astype(np.int64), "labels": labels.astype(np.int64)}, str(lm_path))
    print(f"wrote {rel(lm_path)}: input_ids, labels int64 {list(ids.shape)}, "
          f"{int((labels == -100).sum())} labels set to -100 "
          f"({int((labels[:, 1:] == -100).sum())} of them at positions 1..{ids.shape[1] - 1})")
    logits, chunk = run_ort(gonnx, {"input_ids": ids})
    c, r = case("gpt2_tiny_lm", gonnx, None, lm_path, "lm", "labels", logits, labels,
                f"onnxruntime CPUExecutionProvider on models/gpt2_tiny/legacy_op17.onnx (static batch {chunk}, "
                f"run in {len(ids) // chunk} chunks; float32 logits), metrics in float64.")
    cases.append(c)
    try:  # cross-check against the float64 torch model make_transformers.py exports
        import make_transformers as mt
        g = mt.build_gpt2().double()
        with torch.no_grad():
            g64 = g(input_ids=torch.from_numpy(ids)).logits.numpy()
        print(f"  gpt2_tiny: max|ORT - torch float64| logits {np.abs(logits - g64).max():.1e}")
        ref = lm(g64, labels)
        check_close("gpt2_tiny_lm loss, ORT vs torch float64", r["loss_value"], ref["loss_value"], 1e-5)
        assert r["correct"] == ref["correct"]
    except ImportError as e:
        print(f"  (no float64 cross-check for gpt2_tiny: {e})")

    out = MODELS / "eval_goldens.json"
    out.write_text(json.dumps(cases, indent=2) + "\n")
    print(f"\nwrote {rel(out)}\n")
    hdr = f"{'name':24s} {'loss':13s} {'examples':>8s} {'counted':>7s} {'loss_value':>20s} {'correct':>7s} " \
          f"{'accuracy':>10s} {'min_margin':>10s}"
    print(hdr)
    print("-" * len(hdr))
    for c in cases:
        acc = "-" if c["accuracy"] is None else f"{c['accuracy']:.6f}"
        cor = "-" if c["correct"] is None else str(c["correct"])
        mar = "-" if c["min_margin"] is None else f"{c['min_margin']:.2e}"
        print(f"{c['name']:24s} {c['loss']:13s} {c['examples']:8d} {c['counted']:7d} {c['loss_value']:20.15g} "
              f"{cor:>7s} {acc:>10s} {mar:>10s}")


if __name__ == "__main__":
    main()
