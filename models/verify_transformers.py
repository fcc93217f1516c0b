"""Checks dorac's rewritten and merged transformer models with the ONNX toolchain (not run by the
tests or CI, which need no Python).

For every model folder with exporter variants (`<variant>.onnx` + `<variant>.ort.safetensors`) and
a `peft_dora/` adapter, and every variant:
  - `dorac rewrite` (DoRA at PEFT's init on the adapter's target modules): onnx.checker (full_check)
    accepts it, and in onnxruntime it gives the variant's onnxruntime output (1e-4 relative);
  - `dorac merge --adapter peft_dora`: onnx.checker accepts it, and in onnxruntime it gives PEFT's
    output (peft_dora_outputs.safetensors, 1e-4 relative).
vit_tiny's `peft_dora_conv/` (DoRA on the patch-embedding Conv too) is merged and checked the same way.

Usage (from the repository root, after `cargo build --release`):
    /path/to/venv/bin/python models/verify_transformers.py [MODEL...]
"""
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from safetensors.numpy import load_file

ROOT = pathlib.Path(__file__).resolve().parent.parent
DORAC = ROOT / "target" / "release" / "dorac"
TOL = 1e-4


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def ort_run(path, inputs):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in inputs.items() if k in names})[0]


def dorac(*args):
    subprocess.run([str(DORAC), *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def models():
    for d in sorted((ROOT / "models").iterdir()):
        if (d / "peft_dora").is_dir() and any(d.glob("*.ort.safetensors")):
            yield d


def main():
    wanted = sys.argv[1:]
    out = pathlib.Path(tempfile.mkdtemp(prefix="dorac-verify-"))
    failures = 0
    for d in models():
        if wanted and d.name not in wanted:
            continue
        inputs = load_file(d / "inputs.safetensors")
        shapes = [a for k, v in inputs.items() for a in ("--shape", f"{k}={'x'.join(map(str, v.shape))}")]
        adapters = ["peft_dora"] + (["peft_dora_conv"] if (d / "peft_dora_conv").is_dir() else [])
        for variant in sorted(p.name.removesuffix(".ort.safetensors") for p in d.glob("*.ort.safetensors")):
            golden = next(iter(load_file(d / f"{variant}.ort.safetensors").values()))
            model = d / f"{variant}.onnx"
            targets = json.loads((d / "peft_dora" / "adapter_config.json").read_text())["target_modules"]
            rewritten = out / f"{d.name}-{variant}.dora.onnx"
            dorac("rewrite", model, "-o", rewritten, "--target", ",".join(sorted(targets)), "--rank", 4, *shapes)
            onnx.checker.check_model(onnx.load(str(rewritten)), full_check=True)
            checks = [("rewritten at init vs ORT", rel(ort_run(rewritten, inputs), golden))]
            for adapter in adapters:
                peft = next(iter(load_file(d / f"{adapter}_outputs.safetensors").values()))
                merged = out / f"{d.name}-{variant}-{adapter}.merged.onnx"
                dorac("merge", model, "--adapter", d / adapter, "-o", merged, *shapes)
                onnx.checker.check_model(onnx.load(str(merged)), full_check=True)
                checks.append((f"merged {adapter} (ORT) vs PEFT", rel(ort_run(merged, inputs), peft)))
            line = ", ".join(f"{what} {e:.1e}" for what, e in checks)
            bad = [what for what, e in checks if not e < TOL]
            failures += len(bad)
            print(f"{d.name}/{variant}: {line}{'  FAIL' if bad else ''}", flush=True)
    print("all checks passed" if failures == 0 else f"{failures} checks failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
