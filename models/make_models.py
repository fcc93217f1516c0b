#!/usr/bin/env python3
"""Build the small test models and golden files used by dorac's tests.

Run from the repository root:

    /work/pyenv/bin/python models/make_models.py

It regenerates everything under models/ (except this script and README.md):

    models/<name>/model.onnx                    base model, legacy torch exporter, opset 17
    models/<name>/inputs.safetensors            graph inputs, keyed by graph input name ("x"), float32
    models/<name>/ort_outputs.safetensors       onnxruntime CPU outputs, keyed by graph output name ("y"), float32
    models/<name>/peft_dora/                    PEFT DoRA adapter on every nn.Linear
        adapter_config.json, adapter_model.safetensors
    models/<name>/peft_dora_outputs.safetensors "y": PEFT output in float64, "y_f32": PEFT output in float32
    models/<name>/peft_lora/                    the same with plain LoRA (use_dora=False)
    models/<name>/peft_lora_outputs.safetensors

where <name> is mlp2d (2-D input, Linear -> Gemm) or mlp3d (3-D input, Linear -> MatMul + Add).

Everything is deterministic: every random draw uses a fixed seed (global torch seed for the
module initialisation and PEFT's own LoRA-A init, explicit torch.Generator objects for the
inputs and the adapter perturbation).

The listing of op types, initializers and nodes goes to stdout only.
"""

import collections
import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

MODELS_DIR = Path(__file__).resolve().parent

# Adapter hyper-parameters shared by every adapter written here.
RANK = 4
LORA_ALPHA = 8  # scaling s = alpha / r = 2

# Tolerances for the self-checks.
ORT_TOL = 1e-5  # ORT float32 vs torch float32 (expected ~1e-7)
MERGE_TOL = 1e-10  # PEFT merged vs unmerged, both float64
MIN_ADAPTER_EFFECT = 1e-2  # the adapted output must differ from the base output by at least this


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class MLP2d(nn.Module):
    """x: [batch, 16] -> y: [batch, 4]. Every nn.Linear exports as Gemm(transB=1)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.Tanh())
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.layers(x))


class Block(nn.Module):
    """Residual block: h + sigmoid(fc(h)) * 0.5."""

    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, h):
        return h + torch.sigmoid(self.fc(h)) * 0.5


class MLP3d(nn.Module):
    """x: [2, 5, 16] -> y: [2, 5, 8]. Every nn.Linear exports as MatMul (transposed anonymous
    weight initializer) + Add (bias)."""

    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.blocks = nn.ModuleList([Block(32), Block(32)])
        self.out = nn.Linear(32, 8)

    def forward(self, x):
        h = torch.relu(self.norm(self.proj_in(x)))
        for blk in self.blocks:
            h = blk(h)
        return torch.softmax(self.out(h), dim=-1)


# One entry per model: constructor, input shape, export dynamic_axes, PEFT target modules, seed.
SPECS = [
    dict(
        name="mlp2d",
        build=MLP2d,
        input_shape=(3, 16),
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        target_modules=["layers.0", "layers.2", "head"],
        # PEFT module name -> ONNX node the legacy exporter emits for it (checked below).
        onnx_nodes={
            "layers.0": "/layers/layers.0/Gemm",
            "layers.2": "/layers/layers.2/Gemm",
            "head": "/head/Gemm",
        },
        seed=1234,
    ),
    dict(
        name="mlp3d",
        build=MLP3d,
        input_shape=(2, 5, 16),
        dynamic_axes=None,  # static shapes
        target_modules=["proj_in", "blocks.0.fc", "blocks.1.fc", "out"],
        # Note: ModuleList children get the scope "blocks.0" (not "/blocks/blocks.0" as
        # Sequential children do), and the weights are anonymous "onnx::MatMul_<n>" [in, out].
        onnx_nodes={
            "proj_in": "/proj_in/MatMul",
            "blocks.0.fc": "/blocks.0/fc/MatMul",
            "blocks.1.fc": "/blocks.1/fc/MatMul",
            "out": "/out/MatMul",
        },
        seed=5678,
    ),
]


# --------------------------------------------------------------------------------------------
# ONNX export and inspection
# --------------------------------------------------------------------------------------------


def export_onnx(model, x, path, dynamic_axes):
    """Export with the legacy (TorchScript) exporter, opset 17, constant folding on."""
    kwargs = dict(
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["y"],
        do_constant_folding=True,
    )
    if dynamic_axes is not None:
        kwargs["dynamic_axes"] = dynamic_axes
    torch.onnx.export(model, (x,), str(path), **kwargs)


def dim_str(d):
    return d.dim_param if d.HasField("dim_param") else str(d.dim_value)


def value_info_str(vi):
    t = vi.type.tensor_type
    dims = ", ".join(dim_str(d) for d in t.shape.dim)
    return f"{vi.name}: {onnx.TensorProto.DataType.Name(t.elem_type)}[{dims}]"


def describe_onnx(path):
    """Check the model and print inputs/outputs, op types, initializers and nodes."""
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    g = m.graph
    print(f"  checker: OK  (ir_version={m.ir_version}, opset={[(o.domain or 'ai.onnx', o.version) for o in m.opset_import]})")
    print("  inputs :", [value_info_str(v) for v in g.input])
    print("  outputs:", [value_info_str(v) for v in g.output])
    ops = collections.Counter(n.op_type for n in g.node)
    print("  op types:", dict(sorted(ops.items())))
    print("  initializers:")
    for init in g.initializer:
        print(f"    {init.name:28s} {onnx.TensorProto.DataType.Name(init.data_type)}{list(init.dims)}")
    print("  nodes:")
    for n in g.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute if a.name != "value"}
        attr_s = f" {attrs}" if attrs else ""
        print(f"    {n.op_type:20s} {n.name:32s} in={list(n.input)} out={list(n.output)}{attr_s}")
    # The linear layers, which dorac rewrites: Gemm nodes and MatMul nodes with a weight initializer.
    inits = {i.name: list(i.dims) for i in g.initializer}
    print("  linear layers (node -> weight initializer [shape], bias):")
    consumers = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    for n in g.node:
        if n.op_type == "Gemm":
            w, b = n.input[1], (n.input[2] if len(n.input) > 2 else None)
            print(f"    {n.name:24s} Gemm   W={w} {inits.get(w)}  bias={b} {inits.get(b)}")
        elif n.op_type == "MatMul" and n.input[1] in inits:
            w = n.input[1]
            adds = [c for c in consumers[n.output[0]] if c.op_type == "Add"]
            bias = None
            for a in adds:
                for i in a.input:
                    if i in inits:
                        bias = i
            add_name = adds[0].name if adds else None
            print(f"    {n.name:24s} MatMul W={w} {inits.get(w)}  then {add_name} bias={bias} {inits.get(bias)}")
    return m


def check_onnx_linears(onnx_model, base_model, spec):
    """Each targeted nn.Linear must map to the expected ONNX node, whose weight initializer
    holds W0 as [out, in] (Gemm, transB=1) or [in, out] (MatMul)."""
    g = onnx_model.graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
    nodes = {n.name: n for n in g.node}
    mods = dict(base_model.named_modules())
    for mod_name, node_name in spec["onnx_nodes"].items():
        node = nodes[node_name]
        w = inits[node.input[1]]
        w0 = mods[mod_name].weight.detach().numpy()
        if node.op_type == "Gemm":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs.get("transB") == 1 and node.input[1] == f"{mod_name}.weight"
            assert np.array_equal(w, w0)
        else:
            assert node.op_type == "MatMul"
            assert np.array_equal(w, w0.T)
    print("  ONNX linear nodes match the torch weights:", spec["onnx_nodes"])


def reference_from_files(base_model, spec, dest, x):
    """Recompute the adapted output from the files on disk with the formulas of
    shared/docs/dora-math.md (doc orientation W0: [in, out]; factored norm), by merging
    W' = (W0 + dW) * g into a float64 copy of the base model. Independent of PEFT's code."""
    cfg = json.loads((dest / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg["use_rslora"] else cfg["r"])
    ad = load_file(str(dest / "adapter_model.safetensors"))
    ref = copy.deepcopy(base_model).double().eval()
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for t in cfg["target_modules"]:
            lin = mods[t]
            W0 = lin.weight.T  # [in, out]
            A = ad[f"base_model.model.{t}.lora_A.weight"].double()  # [r, in]
            B = ad[f"base_model.model.{t}.lora_B.weight"].double()  # [out, r]
            dW = s * (B @ A).T  # [in, out]
            if cfg["use_dora"]:
                m = ad[f"base_model.model.{t}.lora_magnitude_vector"].double()  # [out]
                AW0 = A @ W0  # [r, out]
                AAt = A @ A.T  # [r, r]
                n2 = (W0 * W0).sum(0) + 2 * s * (AW0.T * B).sum(1) + s * s * ((B @ AAt) * B).sum(1)
                n = n2.clamp_min(0).sqrt()
                # cross-check the factored norm against the direct one
                assert torch.allclose(n, (W0 + dW).norm(dim=0), rtol=1e-12, atol=1e-12)
                Wp = (W0 + dW) * (m / n)
            else:
                Wp = W0 + dW
            lin.weight.copy_(Wp.T)
        return ref(x.double())


def run_ort(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(names, {k: v.numpy() for k, v in feeds.items()})
    return {n: torch.from_numpy(np.ascontiguousarray(o)) for n, o in zip(names, outs)}


# --------------------------------------------------------------------------------------------
# PEFT adapters
# --------------------------------------------------------------------------------------------


def perturb_adapter(peft_model, use_dora, seed):
    """Move the adapter away from the identity so the golden outputs test something.

    For every LoRA layer (in named_modules order, so the draws are deterministic):
      lora_B  <- N(0,1) * 0.1                     (PEFT initialises B = 0)
      lora_A  += N(0,1) * 0.05
      m       *= 1 + 0.1 * N(0,1)                 (DoRA only)
    """
    gen = torch.Generator().manual_seed(seed)
    n_layers = 0
    with torch.no_grad():
        for name, mod in peft_model.named_modules():
            if not isinstance(mod, LoraLayer):
                continue
            n_layers += 1
            B = mod.lora_B["default"].weight
            A = mod.lora_A["default"].weight
            B.copy_(torch.randn(B.shape, generator=gen, dtype=B.dtype) * 0.1)
            A.add_(torch.randn(A.shape, generator=gen, dtype=A.dtype) * 0.05)
            if use_dora:
                m = mod.lora_magnitude_vector["default"].weight
                m.mul_(1 + 0.1 * torch.randn(m.shape, generator=gen, dtype=m.dtype))
    return n_layers


def save_adapter_flat(peft_model, dest):
    """save_pretrained into a temp dir, then keep only adapter_config.json and
    adapter_model.safetensors directly in dest (PEFT also writes a README.md model card, and
    nests non-default adapters in a sub folder)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        for fname in ["adapter_config.json", "adapter_model.safetensors"]:
            found = sorted(Path(tmp).rglob(fname))
            assert len(found) == 1, f"expected one {fname} in PEFT output, got {found}"
            shutil.copyfile(found[0], dest / fname)
    # PEFT keeps target_modules as a Python set, so its order in the JSON depends on the
    # per-process string hash seed. Sort it so the file is byte-for-byte reproducible; this is
    # the only change made to PEFT's file (same JSON layout: indent 2, sorted keys).
    cfg_path = dest / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def check_adapter_file(dest, target_modules, use_dora, model):
    """Print keys/shapes of adapter_model.safetensors and check they follow PEFT's naming."""
    path = dest / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys = sorted(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    print(f"  {path.relative_to(MODELS_DIR.parent)}:")
    for k in keys:
        print(f"    {k:60s} {str(tensors[k].dtype):14s} {list(tensors[k].shape)}")
    expected = set()
    mods = dict(model.named_modules())
    for t in target_modules:
        lin = mods[t]
        expected.add(f"base_model.model.{t}.lora_A.weight")
        expected.add(f"base_model.model.{t}.lora_B.weight")
        assert list(tensors[f"base_model.model.{t}.lora_A.weight"].shape) == [RANK, lin.in_features]
        assert list(tensors[f"base_model.model.{t}.lora_B.weight"].shape) == [lin.out_features, RANK]
        if use_dora:
            expected.add(f"base_model.model.{t}.lora_magnitude_vector")
            assert list(tensors[f"base_model.model.{t}.lora_magnitude_vector"].shape) == [lin.out_features]
    assert set(keys) == expected, f"unexpected keys: {set(keys) ^ expected}"
    cfg = json.loads((dest / "adapter_config.json").read_text())
    print(
        "  adapter_config.json:",
        {k: cfg.get(k) for k in ["peft_type", "use_dora", "r", "lora_alpha", "lora_dropout",
                                 "use_rslora", "fan_in_fan_out", "bias", "target_modules"]},
    )
    assert cfg["peft_type"] == "LORA" and bool(cfg["use_dora"]) == use_dora
    assert sorted(os_listdir(dest)) == ["adapter_config.json", "adapter_model.safetensors"]


def os_listdir(p):
    return [c.name for c in Path(p).iterdir()]


def make_adapter(base_model, spec, x, y_base32, folder, use_dora):
    """Wrap a copy of the base model with PEFT, perturb, save, and write golden outputs."""
    kind = "dora" if use_dora else "lora"
    print(f"\n  --- peft_{kind} ---")
    # Fixed seed for PEFT's kaiming-uniform init of lora_A (uses the global RNG).
    torch.manual_seed(spec["seed"] + (1 if use_dora else 2))
    cfg = LoraConfig(
        r=RANK,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        use_dora=use_dora,
        init_lora_weights=True,
        target_modules=list(spec["target_modules"]),
    )
    # get_peft_model modifies the module in place: give it a copy of the base model.
    peft_model = get_peft_model(copy.deepcopy(base_model), cfg)
    peft_model.eval()

    # At init the adapted model must reproduce the base model (B = 0, m = ||W0||).
    with torch.no_grad():
        y_init = peft_model(x)
    print(f"  at init: max|peft - base| = {(y_init - y_base32).abs().max().item():.3e}")

    n = perturb_adapter(peft_model, use_dora, spec["seed"] + (11 if use_dora else 12))
    assert n == len(spec["target_modules"]), (n, spec["target_modules"])

    dest = folder / f"peft_{kind}"
    save_adapter_flat(peft_model, dest)
    check_adapter_file(dest, spec["target_modules"], use_dora, base_model)

    # Golden outputs: float64 copy (the reference), plus float32 for information.
    with torch.no_grad():
        y32 = peft_model(x).float()
        m64 = copy.deepcopy(peft_model).double().eval()
        y64 = m64(x.double())
        # Merge on another float64 copy: must equal the unmerged float64 output.
        merged = copy.deepcopy(m64).merge_and_unload().eval()
        y64_merged = merged(x.double())
        # Reload the saved adapter onto a fresh float64 base: must give the same output, i.e.
        # the files on disk carry everything that matters.
        from peft import PeftModel

        reloaded = PeftModel.from_pretrained(copy.deepcopy(base_model).double(), str(dest)).eval()
        reloaded.double()
        y64_reloaded = reloaded(x.double())

    y64_ref = reference_from_files(base_model, spec, dest, x)
    ref_err = (y64 - y64_ref).abs().max().item()
    merge_err = (y64 - y64_merged).abs().max().item()
    reload_err = (y64 - y64_reloaded).abs().max().item()
    f32_err = (y32.double() - y64).abs().max().item()
    effect = (y64 - y_base32.double()).abs().max().item()
    print(f"  max|merged - unmerged| (float64)     = {merge_err:.3e}  (tol {MERGE_TOL:g})")
    print(f"  max|reloaded - in-memory| (float64)  = {reload_err:.3e}")
    print(f"  max|dora-math.md reference - peft| (float64, from files) = {ref_err:.3e}")
    print(f"  max|peft f32 - peft f64|             = {f32_err:.3e}")
    print(f"  max|peft f64 - base|  (adapter effect) = {effect:.3e}  (|base| max {y_base32.abs().max().item():.3e})")
    assert merge_err < MERGE_TOL, merge_err
    assert reload_err < MERGE_TOL, reload_err
    assert ref_err < MERGE_TOL, ref_err
    assert f32_err < 1e-4, f32_err
    assert effect > MIN_ADAPTER_EFFECT, effect

    save_file(
        {"y": y64.contiguous(), "y_f32": y32.contiguous()},
        str(folder / f"peft_{kind}_outputs.safetensors"),
    )


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def make_one(spec):
    name = spec["name"]
    folder = MODELS_DIR / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    print(f"\n=================== {name} ===================")

    # Base model: fixed seed for the module initialisation.
    torch.manual_seed(spec["seed"])
    model = spec["build"]().eval()

    # Inputs: random normal with its own generator.
    gen = torch.Generator().manual_seed(spec["seed"] + 100)
    x = torch.randn(spec["input_shape"], generator=gen, dtype=torch.float32)
    save_file({"x": x.contiguous()}, str(folder / "inputs.safetensors"))

    with torch.no_grad():
        y_torch = model(x)

    onnx_path = folder / "model.onnx"
    export_onnx(model, x, onnx_path, spec["dynamic_axes"])
    onnx_model = describe_onnx(onnx_path)
    check_onnx_linears(onnx_model, model, spec)

    ort_out = run_ort(onnx_path, {"x": x})
    assert list(ort_out) == ["y"], list(ort_out)
    ort_err = (ort_out["y"] - y_torch).abs().max().item()
    print(f"  ORT vs torch float32: max abs diff = {ort_err:.3e}  (y shape {list(ort_out['y'].shape)})")
    assert ort_err < ORT_TOL, ort_err
    save_file({"y": ort_out["y"].float().contiguous()}, str(folder / "ort_outputs.safetensors"))

    make_adapter(model, spec, x, y_torch, folder, use_dora=True)
    make_adapter(model, spec, x, y_torch, folder, use_dora=False)

    for p in folder.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    print(f"\n  files in models/{name}:")
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            print(f"    {str(p.relative_to(MODELS_DIR)):48s} {p.stat().st_size:8d} B")
    print("  golden tensors:")
    for fname in ["inputs.safetensors", "ort_outputs.safetensors",
                  "peft_dora_outputs.safetensors", "peft_lora_outputs.safetensors"]:
        t = load_file(str(folder / fname))
        print(f"    {fname:32s}", {k: (str(v.dtype), list(v.shape)) for k, v in t.items()})


def main():
    import peft

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, peft {peft.__version__}, "
          f"onnx {onnx.__version__}, onnxruntime {ort.__version__}")
    torch.set_num_threads(1)  # deterministic CPU reductions
    for spec in SPECS:
        make_one(spec)
    print("\nall checks passed")


if __name__ == "__main__":
    main()
