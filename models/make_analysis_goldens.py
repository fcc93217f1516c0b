#!/usr/bin/env python3
"""Make models/shift/runs/analysis_goldens.json: reference magnitude / direction changes of the
fine-tuning runs in models/shift/runs/ (the DoRA paper's weight-decomposition analysis), computed
with numpy in float64 from the checkpoint files alone.

Run from the repository root (about a second), after the runs exist:

    /work/pyenv/bin/python models/make_analysis_goldens.py

Inputs: models/shift/base.onnx (Gemm, transB=1: initializers fc1.weight etc. stored [out, in]) and
models/shift/runs/<run>/checkpoint-<step>/ for every run folder: full fine-tuning has
trained_weights.safetensors (tensors named like the ONNX initializers, module = name without
".weight"); LoRA / DoRA have adapter_config.json and adapter_model.safetensors (PEFT keys
base_model.model.<module>.lora_A.weight [r, in], .lora_B.weight [out, r], .lora_magnitude_vector [out]).

For each run, checkpoint and layer, with W0 the base weight [out, in] and Wt the effective weight:

    full   Wt = the trained weight
    lora   Wt = W0 + s B A,  s = lora_alpha / r  (lora_alpha / sqrt(r) if use_rslora)
    dora   V = W0 + s B A,  Wt = (m / ||V||_row)[:, None] * V   (norm over the input dim, per output feature)

    m0_j = ||W0[j, :]||, mt_j = ||Wt[j, :]||
    delta_m = mean_j |mt_j - m0_j|,  delta_d = mean_j (1 - cos(Wt[j, :], W0[j, :]))

r, lora_alpha, use_dora and use_rslora are read from each adapter_config.json. The file holds
{"changes": [{run, method, step, layer, delta_m, delta_d}, ...] sorted by run, step, layer,
 "fits": {method: {slope, intercept, correlation, points}}}: per method the least-squares line
delta_m = slope * delta_d + intercept over that method's points and their Pearson correlation.

Deterministic (no random draws): two runs give byte-identical files.
"""

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
from safetensors.numpy import load_file

MODELS = Path(__file__).resolve().parent
RUNS = MODELS / "shift" / "runs"
OUT = RUNS / "analysis_goldens.json"


def base_weights():
    m = onnx.load(str(MODELS / "shift" / "base.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    weights = {}
    for node in m.graph.node:
        if node.op_type != "Gemm":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs.get("transB") == 1 and attrs.get("transA", 0) == 0, (node.name, attrs)
        w = node.input[1]
        assert w.endswith(".weight"), w
        weights[w[: -len(".weight")]] = inits[w].astype(np.float64)  # [out, in]
    assert sorted(weights) == ["fc1", "fc2", "head"], sorted(weights)
    return weights


def effective_weights(ckpt, w0):
    """(method, {module: Wt float64 [out, in]}) for one checkpoint folder."""
    full = ckpt / "trained_weights.safetensors"
    if full.exists():
        t = load_file(str(full))
        out = {}
        for name, w in t.items():
            assert name.endswith(".weight"), name
            mod = name[: -len(".weight")]
            assert w.shape == w0[mod].shape, (name, w.shape)
            out[mod] = w.astype(np.float64)
        return "full", out
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA", cfg["peft_type"]
    assert not cfg.get("rank_pattern") and not cfg.get("alpha_pattern"), "per-layer r/alpha not handled"
    assert not cfg.get("fan_in_fan_out"), "fan_in_fan_out not handled"
    r, alpha = cfg["r"], cfg["lora_alpha"]
    s = alpha / np.sqrt(r) if cfg.get("use_rslora") else alpha / r
    dora = bool(cfg.get("use_dora"))
    t = load_file(str(ckpt / "adapter_model.safetensors"))
    mods = sorted({re.match(r"base_model\.model\.(.+)\.lora_A\.weight$", k).group(1)
                   for k in t if k.endswith(".lora_A.weight")})
    out = {}
    for mod in mods:
        p = f"base_model.model.{mod}."
        a, b = t[p + "lora_A.weight"].astype(np.float64), t[p + "lora_B.weight"].astype(np.float64)
        assert a.shape == (r, w0[mod].shape[1]) and b.shape == (w0[mod].shape[0], r), (mod, a.shape, b.shape)
        v = w0[mod] + s * (b @ a)
        if dora:
            m = t[p + "lora_magnitude_vector"].astype(np.float64)
            v = (m / np.linalg.norm(v, axis=1))[:, None] * v
        else:
            assert p + "lora_magnitude_vector" not in t
        out[mod] = v
    expected = {f"base_model.model.{mod}.{k}" for mod in mods
                for k in ["lora_A.weight", "lora_B.weight"] + (["lora_magnitude_vector"] if dora else [])}
    assert set(t) == expected, set(t) ^ expected
    return ("dora" if dora else "lora"), out


def changes(w0, wt):
    n0, nt = np.linalg.norm(w0, axis=1), np.linalg.norm(wt, axis=1)
    cos = (wt * w0).sum(axis=1) / (nt * n0)
    return float(np.mean(np.abs(nt - n0))), float(np.mean(1.0 - cos))


def fit(points):
    d = np.array([p["delta_d"] for p in points])
    m = np.array([p["delta_m"] for p in points])
    dc, mc = d - d.mean(), m - m.mean()
    slope = float((dc * mc).sum() / (dc * dc).sum())
    return dict(slope=slope, intercept=float(m.mean() - slope * d.mean()),
                correlation=float((dc * mc).sum() / np.sqrt((dc * dc).sum() * (mc * mc).sum())),
                points=len(points))


def main():
    w0 = base_weights()
    rows = []
    for run in sorted(p for p in RUNS.iterdir() if p.is_dir()):
        ckpts = [(int(c.name.split("-")[1]), c) for c in run.iterdir()
                 if c.is_dir() and re.fullmatch(r"checkpoint-\d+", c.name)]
        for step, ckpt in sorted(ckpts):
            state = json.loads((ckpt / "trainer_state.json").read_text())
            assert state["step"] == step, (ckpt, state["step"])
            method, wts = effective_weights(ckpt, w0)
            assert state["config"]["method"] == method, (ckpt, state["config"]["method"], method)
            for layer in sorted(wts):
                dm, dd = changes(w0[layer], wts[layer])
                rows.append(dict(run=run.name, method=method, step=step, layer=layer, delta_m=dm, delta_d=dd))
    rows.sort(key=lambda r: (r["run"], r["step"], r["layer"]))
    fits = {}
    for method in sorted({r["method"] for r in rows}):
        pts = [r for r in rows if r["method"] == method]
        if len(pts) >= 2:
            fits[method] = fit(pts)
    OUT.write_text(json.dumps({"changes": rows, "fits": fits}, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(MODELS.parent)}\n")
    print(f"{'run':6s} {'method':6s} {'step':>4s} {'layer':6s} {'delta_m':>22s} {'delta_d':>22s}")
    for r in rows:
        print(f"{r['run']:6s} {r['method']:6s} {r['step']:4d} {r['layer']:6s} {r['delta_m']:22.15g} {r['delta_d']:22.15g}")
    print(f"\n{'method':6s} {'points':>6s} {'slope':>22s} {'intercept':>22s} {'correlation':>22s}")
    for method, f in fits.items():
        print(f"{method:6s} {f['points']:6d} {f['slope']:22.15g} {f['intercept']:22.15g} {f['correlation']:22.15g}")


if __name__ == "__main__":
    main()
