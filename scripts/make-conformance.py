#!/usr/bin/env python3
"""Writes tests/conformance/: the ONNX backend node test cases that dorac's importer can take.

    /work/pyenv/bin/python scripts/make-conformance.py      (needs onnx, numpy, safetensors)

The `onnx` pip package ships the generators of its backend node tests
(onnx/backend/test/case/node/*.py). `python -m onnx.backend.test.cmd_tools generate-data` writes
them out as model.onnx + protobuf tensors in some onnx versions; in others (1.23) it writes only
the model cases, so this script calls the same generators directly
(`onnx.backend.test.case.node.collect_testcases()`), which gives each case's model and its one
data set, exactly what generate-data would write.

A case is kept when every node of its graph (including the nodes of function-expanded cases,
`*_expanded`, and of If's branches) has an op type dorac imports. That list is read from the Rust source, so new ops
get their cases by re-running this script:

  - the `OPS` table of src/onnx/import_ops.rs (lines `("Name", Rule::...)`),
  - the unary functions of src/ops/unary/*.rs (`onnx: Some("Name")`),
  - the binary functions of src/ops/binary/*.rs imported directly (`onnx: "Name"`, `import: true`),
  - the reductions of src/ops/reduce/*.rs (`onnx: "Name"`).

Each kept case becomes tests/conformance/<case>/ with
  - model.onnx           the case's model, unchanged,
  - inputs.safetensors   the graph inputs by name, in their dtype,
  - outputs.safetensors  the expected graph outputs by name, in their dtype.

Cases kept by op type but not written (their reason in tests/conformance/EXCLUDED.md): a folder
over ~1 MB (the committed suite stays small), inputs or outputs that are not tensors (sequences,
optionals), or element types safetensors cannot hold (strings, complex). tests/conformance.rs runs
every written case; which of them dorac does not pass, and why, is in
tests/conformance/SKIPPED.md.
"""

import glob
import os
import re
import shutil
import sys
import tempfile

import numpy as np
import onnx
from onnx import numpy_helper
from safetensors.numpy import save

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "conformance")
MAX_BYTES = 1_000_000


def supported_ops():
    ops = set()
    with open(os.path.join(REPO, "src", "onnx", "import_ops.rs")) as f:
        src = f.read()
    table = src[src.index("pub const OPS"):]
    table = table[: table.index("];")]
    ops.update(re.findall(r'\(\s*"([A-Za-z0-9]+)"\s*,\s*Rule::', table))
    for path in glob.glob(os.path.join(REPO, "src", "ops", "unary", "*.rs")):
        with open(path) as f:
            ops.update(re.findall(r'onnx:\s*Some\("([A-Za-z0-9]+)"\)', f.read()))
    # Binary functions imported directly (`import: true`); the others come through OPS builders.
    for path in glob.glob(os.path.join(REPO, "src", "ops", "binary", "*.rs")):
        with open(path) as f:
            for name, imported in re.findall(r'onnx:\s*"([A-Za-z0-9]+)",.*?import:\s*(true|false)', f.read(), re.S):
                if imported == "true":
                    ops.add(name)
    for path in glob.glob(os.path.join(REPO, "src", "ops", "reduce", "*.rs")):
        with open(path) as f:
            ops.update(re.findall(r'onnx:\s*"([A-Za-z0-9]+)"', f.read()))
    # If has no rule: the importer inlines the branch its condition takes (src/onnx/import.rs).
    ops.add("If")
    return ops


def nodes_with_branches(nodes):
    """The nodes and, depth first, those of their subgraphs."""
    out = []
    for n in nodes:
        out.append(n)
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                out.extend(nodes_with_branches(sub.node))
    return out


def as_array(value, vi):
    """A data set entry as a numpy array (None when it is not a tensor)."""
    if not vi.type.HasField("tensor_type"):
        return None
    if isinstance(value, onnx.TensorProto):
        value = numpy_helper.to_array(value)
    if not isinstance(value, np.ndarray):
        value = np.asarray(value)
    return value


# numpy types safetensors holds (not strings, complex, or ml_dtypes' float8/int4/int2;
# ml_dtypes' bfloat16 it writes as BF16).
SAFETENSORS_TYPES = {
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "bfloat16",
}


def main():
    ops = supported_ops()
    from onnx.backend.test.case import node

    cases = node.collect_testcases()
    kept, excluded = [], []
    # Replace the case folders; SKIPPED.md (maintained by hand, checked by the test) stays.
    os.makedirs(OUT, exist_ok=True)
    for entry in os.listdir(OUT):
        if entry.startswith("test_"):
            shutil.rmtree(os.path.join(OUT, entry))
    for case in sorted(cases, key=lambda c: c.name):
        g = case.model.graph
        every = nodes_with_branches(g.node)
        if any(n.domain not in ("", "ai.onnx") or n.op_type not in ops for n in every):
            continue
        # Subgraphs are taken in If only.
        if any(n.op_type != "If" and (a.HasField("g") or len(a.graphs)) for n in every for a in n.attribute):
            continue
        inputs, outputs = case.data_sets[0]
        present_in = [vi for vi in g.input]
        tensors = {}
        reason = None
        for kind, vis, values in (("inputs", present_in, inputs), ("outputs", g.output, outputs)):
            named = {}
            for vi, v in zip(vis, values):
                a = as_array(v, vi)
                if a is None:
                    reason = f"{kind}: '{vi.name}' is not a tensor"
                    break
                if a.dtype.name not in SAFETENSORS_TYPES:
                    reason = f"{kind}: '{vi.name}' has dtype {a.dtype}, which safetensors cannot hold"
                    break
                named[vi.name] = a.copy(order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
            if reason:
                break
            tensors[kind] = named
        if reason is None:
            size = len(case.model.SerializeToString()) + sum(
                a.nbytes for d in tensors.values() for a in d.values()
            )
            if size > MAX_BYTES:
                reason = f"{size / 1e6:.1f} MB (the committed suite keeps cases under 1 MB)"
        if reason:
            excluded.append((case.name, reason))
            continue
        d = os.path.join(OUT, case.name)
        os.makedirs(d)
        onnx.save(case.model, os.path.join(d, "model.onnx"))
        for kind, named in tensors.items():
            with open(os.path.join(d, f"{kind}.safetensors"), "wb") as f:
                f.write(save(named))
        kept.append(case.name)
    with open(os.path.join(OUT, "EXCLUDED.md"), "w") as f:
        f.write(
            "# Node cases of supported ops that are not in the suite\n\n"
            "Written by scripts/make-conformance.py (onnx "
            f"{onnx.__version__}): cases whose every op dorac imports but that the script did not "
            "write, with the reason.\n\n"
            "| case | reason |\n|---|---|\n"
        )
        for name, reason in excluded:
            f.write(f"| {name} | {reason} |\n")
    print(f"{len(kept)} cases written to {OUT}, {len(excluded)} excluded (see EXCLUDED.md)")


if __name__ == "__main__":
    sys.exit(main())
