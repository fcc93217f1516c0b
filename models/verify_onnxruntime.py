"""Checks dorac's ONNX output with the ONNX toolchain (not run by the tests or CI).

For each bundled model it runs the dorac binary to rewrite (DoRA at init), merge (with the PEFT
adapter) and run unmerged inference, then:
  - onnx.checker (full_check) accepts the rewritten and the merged model;
  - the rewritten model at init, in onnxruntime, matches the base model's onnxruntime output (1e-6);
  - the merged model, in onnxruntime, matches dorac's unmerged GPU output (1e-5) and PEFT (1e-5).

Usage (from the repository root, after `cargo build --release`):
    /path/to/venv/bin/python models/verify_onnxruntime.py
"""
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


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def ort_run(path, inputs):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v for k, v in inputs.items()})[0]


def dorac(*args):
    subprocess.run([str(DORAC), *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def main():
    failures = 0
    out = pathlib.Path(tempfile.mkdtemp(prefix="dorac-verify-"))
    for name in ["mlp2d", "mlp3d"]:
        d = ROOT / "models" / name
        inputs = load_file(d / "inputs.safetensors")
        base = load_file(d / "ort_outputs.safetensors")["y"]
        peft = load_file(d / "peft_dora_outputs.safetensors")["y"]
        batch = inputs["x"].shape[0]
        rewritten, merged, unmerged = out / f"{name}.dora.onnx", out / f"{name}.merged.onnx", out / f"{name}.y.safetensors"
        pin = ["--shape", f"batch={batch}"] if name == "mlp2d" else []
        dorac("rewrite", d / "model.onnx", "-o", rewritten, "--rank", 4, "--alpha", 8, *pin)
        dorac("merge", d / "model.onnx", "--adapter", d / "peft_dora", "-o", merged, *pin)
        dorac("run", d / "model.onnx", "--adapter", d / "peft_dora", "--inputs", d / "inputs.safetensors", "-o", unmerged)
        for p in (rewritten, merged):
            onnx.checker.check_model(onnx.load(str(p)), full_check=True)
        checks = [
            ("rewritten at init (ORT) vs base (ORT)", rel(ort_run(rewritten, inputs), base), 1e-6),
            ("merged (ORT) vs dorac unmerged (GPU)", rel(ort_run(merged, inputs), load_file(unmerged)["y"]), 1e-5),
            ("merged (ORT) vs PEFT", rel(ort_run(merged, inputs), peft), 1e-5),
        ]
        print(f"{name}: onnx.checker ok for rewritten and merged models")
        for what, e, tol in checks:
            ok = e <= tol
            failures += not ok
            print(f"  {what:<40} {e:.2e} (tol {tol:.0e}) {'ok' if ok else 'FAIL'}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
