#!/usr/bin/env python3
"""Build models/shift/: a small classification task with a distribution shift, for fine-tuning
experiments (full fine-tuning vs LoRA vs DoRA) where the adaptation has a real target.

Run from the repository root (about 15 s on 2 CPU cores):

    /work/pyenv/bin/python models/make_shift.py

It writes:

    models/shift/base.onnx              MLP x[batch, 32] -> fc1 -> ReLU -> fc2 -> ReLU -> head -> logits[batch, 8],
                                        pre-trained on distribution A; legacy torch exporter, opset 17
    models/shift/train_b.safetensors    2048 examples of the shifted distribution B: x float32 [2048, 32], labels int64 [2048]
    models/shift/eval_b.safetensors     1024 examples of B (same tensor names)
    models/shift/eval_a.safetensors     1024 examples of A (same tensor names)

The task. Inputs u ~ N(0, I_32). A fixed random "teacher" labels them: it looks only at the 8-dim
projection z = Q[:, :8]^T u (Q a random orthogonal matrix), computes logits
T2 tanh(T1 z) - b (T1 [16, 8] scaled by 0.3, so nearly linear; T2 [8, 16]; b chosen so that the 8
classes are equally frequent) and takes the argmax: labels are a deterministic function of u, without
noise. Distribution A is x = u. Distribution B is x = R u with the same labels, where R rotates each
of the 8 teacher directions Q[:, i] by 0.7 rad towards an irrelevant direction Q[:, 8 + i]. So on B
the right function is the teacher applied to R^T x: fc1 needs the change W1 (R^T - I), of rank 8 or more,
which a rank-4 adapter cannot fully make.

The script then prints reference figures (accuracies on eval_b unless said otherwise): the base on
A and B (computed with onnxruntime on base.onnx); full fine-tuning of a torch copy of the base
(weights read back from base.onnx) on train_b with Adam lr 1e-3, batch 32, 640 steps (10 epochs,
reshuffled each epoch); a manual rank-4 LoRA on fc1, fc2 and head (base frozen, A kaiming-uniform as
PEFT, B = 0, scale alpha / r = 8 / 4 = 2) with the same optimizer, steps and batches; and, to show B
is learnable, a fresh MLP trained on train_b only (Adam lr 1e-3, batch 32, 3840 steps).

Everything is deterministic: explicit torch.Generator objects with fixed seeds for the teacher, the
data and the batch orders, torch.manual_seed before every module initialisation, and one CPU thread
(two runs give byte-identical files).
"""

import copy
import math
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.numpy import save_file

OUT = Path(__file__).resolve().parent / "shift"

D_IN, HIDDEN, CLASSES = 32, 64, 8

# Teacher and shift.
TEACHER_SEED = 7
TEACHER_DIM = 8  # the teacher looks at an 8-dim projection of the input
TEACHER_HIDDEN = 16
TEACHER_SCALE = 0.3  # tanh(0.3 * ...): close to linear, so 4096 examples reach ~90% on A
SHIFT_ANGLE = 0.7  # radians, in each of the 8 planes (teacher direction i, irrelevant direction 8 + i)

# Data sets (sizes, seeds).
N_TRAIN_A, N_EVAL_A, N_TRAIN_B, N_EVAL_B = 4096, 1024, 2048, 1024
DATA_SEED_A, DATA_SEED_B = 11, 12

# Training.
LR, BATCH = 1e-3, 32
PRETRAIN_EPOCHS = 30  # 3840 steps on 4096 examples of A; accuracy on A has levelled off by then
FT_STEPS = 640  # 10 epochs of train_b
SCRATCH_STEPS = 3840
RANK, ALPHA = 4, 8
MODEL_SEED, PRETRAIN_ORDER_SEED, FT_ORDER_SEED, LORA_SEED, SCRATCH_SEED = 0, 1, 2, 5, 3


# --------------------------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------------------------


class Teacher:
    def __init__(self):
        g = torch.Generator().manual_seed(TEACHER_SEED)
        self.q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g))
        self.t1 = torch.randn(TEACHER_HIDDEN, TEACHER_DIM, generator=g) / math.sqrt(TEACHER_DIM) * TEACHER_SCALE
        self.t2 = torch.randn(CLASSES, TEACHER_HIDDEN, generator=g) / math.sqrt(TEACHER_HIDDEN)
        # Class biases that make the 8 classes equally frequent (fixed-point iteration on a large sample).
        self.bias = torch.zeros(CLASSES)
        logits = self.raw_logits(torch.randn(50000, D_IN, generator=g))
        sd = logits.std().item()
        for _ in range(300):
            freq = torch.bincount((logits - self.bias).argmax(1), minlength=CLASSES).float() / len(logits)
            self.bias = self.bias + 0.5 * sd * (freq - 1.0 / CLASSES)
        # The rotation R: plane i is spanned by q[:, i] (teacher) and q[:, TEACHER_DIM + i] (irrelevant).
        c, s = math.cos(SHIFT_ANGLE), math.sin(SHIFT_ANGLE)
        local = torch.eye(D_IN)
        for i in range(TEACHER_DIM):
            j = TEACHER_DIM + i
            local[i, i], local[j, j], local[i, j], local[j, i] = c, c, -s, s
        self.rotation = self.q @ local @ self.q.T

    def raw_logits(self, u):
        return torch.tanh(u @ self.q[:, :TEACHER_DIM] @ self.t1.T) @ self.t2.T

    def labels(self, u):
        return (self.raw_logits(u) - self.bias).argmax(1)

    def sample(self, n, shifted, gen):
        u = torch.randn(n, D_IN, generator=gen)
        x = u @ self.rotation.T if shifted else u
        return x.contiguous(), self.labels(u)


# --------------------------------------------------------------------------------------------
# Models and training
# --------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D_IN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


class LoRALinear(nn.Module):
    """y = W0 x + b0 + (alpha / r) * B (A x); W0, b0 frozen; A kaiming-uniform (as PEFT), B = 0."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.lora_A.T) @ self.lora_B.T


def train(model, x, y, steps, order_seed, log_every=0, log=None):
    """Adam (lr 1e-3) on the mean cross-entropy, batch 32, reshuffled each epoch (last partial batch
    dropped). If log_every > 0, log(model) is called (under no_grad) every log_every steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=LR)
    gen = torch.Generator().manual_seed(order_seed)
    n, pos, perm = len(x), 0, None
    model.train()
    for step in range(1, steps + 1):
        if perm is None or pos + BATCH > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + BATCH]
        pos += BATCH
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log_every and step % log_every == 0:
            model.eval()
            log(model)
            model.train()
    model.eval()
    return model


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


# --------------------------------------------------------------------------------------------
# Export and checks
# --------------------------------------------------------------------------------------------


def export(model, path):
    torch.onnx.export(
        model, (torch.zeros(2, D_IN),), str(path), dynamo=False, opset_version=17,
        export_params=True, do_constant_folding=True, input_names=["x"], output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})


def describe_and_load(path, model):
    """Print the graph's linear layers; check the initializers equal the torch weights; return an
    MLP whose weights are read back from the ONNX file."""
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    print("  inputs:", [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]) for i in m.graph.input])
    print("  outputs:", [(o.name, [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]) for o in m.graph.output])
    print("  nodes:", [f"{n.name} ({n.op_type})" for n in m.graph.node])
    print("  initializers:", {k: list(v.shape) for k, v in inits.items()})
    state = model.state_dict()
    loaded = MLP()
    new_state = {}
    for name in ("fc1", "fc2", "head"):
        w, b = f"{name}.weight", f"{name}.bias"
        assert w in inits and b in inits, f"initializer {w} / {b} missing: {sorted(inits)}"
        nodes = [n for n in m.graph.node if w in n.input]
        assert len(nodes) == 1 and nodes[0].op_type == "Gemm", nodes
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
        assert attrs.get("transB") == 1 and list(nodes[0].input) == [nodes[0].input[0], w, b], nodes[0]
        assert np.array_equal(inits[w], state[w].numpy()) and np.array_equal(inits[b], state[b].numpy())
        print(f"  {name}: node {nodes[0].name} Gemm(transB=1), {w} {list(inits[w].shape)}, {b} {list(inits[b].shape)}")
        new_state[w], new_state[b] = torch.from_numpy(inits[w].copy()), torch.from_numpy(inits[b].copy())
    loaded.load_state_dict(new_state)
    return loaded.eval()


def main():
    torch.set_num_threads(1)
    OUT.mkdir(exist_ok=True)
    teacher = Teacher()

    ga = torch.Generator().manual_seed(DATA_SEED_A)
    xa, ya = teacher.sample(N_TRAIN_A, False, ga)
    xea, yea = teacher.sample(N_EVAL_A, False, ga)
    gb = torch.Generator().manual_seed(DATA_SEED_B)
    xb, yb = teacher.sample(N_TRAIN_B, True, gb)
    xeb, yeb = teacher.sample(N_EVAL_B, True, gb)
    for name, x, y in (("eval_a", xea, yea), ("train_b", xb, yb), ("eval_b", xeb, yeb)):
        save_file({"x": x.numpy().astype(np.float32), "labels": y.numpy().astype(np.int64)},
                  str(OUT / f"{name}.safetensors"))
        print(f"wrote shift/{name}.safetensors: x float32 {list(x.shape)}, labels int64 {list(y.shape)}, "
              f"class counts {torch.bincount(y, minlength=CLASSES).tolist()}")

    # Pre-train the base on A.
    torch.manual_seed(MODEL_SEED)
    base = MLP()
    steps_per_epoch = N_TRAIN_A // BATCH
    curve = []
    train(base, xa, ya, PRETRAIN_EPOCHS * steps_per_epoch, PRETRAIN_ORDER_SEED,
          log_every=10 * steps_per_epoch, log=lambda m: curve.append(f"{accuracy(m, xea, yea):.4f}"))
    print(f"pre-training on A: eval A accuracy after 10, 20, 30 epochs: {', '.join(curve)}")
    print(f"pre-trained base on A ({PRETRAIN_EPOCHS * steps_per_epoch} steps): "
          f"train A {accuracy(base, xa, ya):.4f}, eval A {accuracy(base, xea, yea):.4f}")

    path = OUT / "base.onnx"
    export(base, path)
    print(f"wrote shift/base.onnx ({path.stat().st_size} bytes)")
    loaded = describe_and_load(path, base)

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for name, x, y in (("A", xea, yea), ("B", xeb, yeb)):
        logits = sess.run(["logits"], {"x": x.numpy()})[0]
        with torch.no_grad():
            diff = np.abs(logits - base(x).numpy()).max()
        assert diff < 1e-4, diff
        acc = float((logits.argmax(1) == y.numpy()).mean())
        print(f"base (onnxruntime) accuracy on eval_{name.lower()}: {acc:.4f}  (max |ORT - torch| {diff:.1e})")

    full = train(copy.deepcopy(loaded), xb, yb, FT_STEPS, FT_ORDER_SEED)
    print(f"full fine-tuning on train_b ({FT_STEPS} steps): eval_b {accuracy(full, xeb, yeb):.4f}, "
          f"eval_a {accuracy(full, xea, yea):.4f}")

    lora = copy.deepcopy(loaded)
    torch.manual_seed(LORA_SEED)
    for name in ("fc1", "fc2", "head"):
        setattr(lora, name, LoRALinear(getattr(lora, name), RANK, ALPHA))
    n_lora = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    train(lora, xb, yb, FT_STEPS, FT_ORDER_SEED)
    print(f"rank-{RANK} LoRA on fc1, fc2, head ({n_lora} parameters, {FT_STEPS} steps): "
          f"eval_b {accuracy(lora, xeb, yeb):.4f}, eval_a {accuracy(lora, xea, yea):.4f}")

    torch.manual_seed(MODEL_SEED)
    scratch = train(MLP(), xb, yb, SCRATCH_STEPS, SCRATCH_SEED)
    print(f"fresh MLP trained on train_b only ({SCRATCH_STEPS} steps): eval_b {accuracy(scratch, xeb, yeb):.4f}")

    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"models/shift: {total} bytes in all")


if __name__ == "__main__":
    main()
