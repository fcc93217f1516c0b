"""Checks `dorac train --eval-data` against PEFT: for each training run folder on models/shift
(made by scripts/reproduce-paper.sh, named <method>-seed<N>), loads what the run saved (the PEFT
adapter with PeftModel.from_pretrained, or trained_weights.safetensors for --method full) onto a
torch copy of models/shift/base.onnx, computes the cross-entropy loss and the correct count on
models/shift/eval_b.safetensors in float64, and prints them next to the last evaluation dorac
logged in the run's metrics.jsonl.

Usage (from the repository root):
    scripts/reproduce-paper.sh /tmp/repro
    /work/pyenv/bin/python models/verify_train_eval.py /tmp/repro/*-seed0
"""
import json, sys
import numpy as np, onnx, onnx.numpy_helper as nh, torch
from peft import PeftModel
from safetensors.numpy import load_file
torch.set_num_threads(1)
m = onnx.load("models/shift/base.onnx")
W = {t.name: nh.to_array(t).copy() for t in m.graph.initializer}
class MLP(torch.nn.Module):
    def __init__(s):
        super().__init__()
        s.fc1 = torch.nn.Linear(32, 64); s.fc2 = torch.nn.Linear(64, 64); s.head = torch.nn.Linear(64, 8)
    def forward(s, x):
        return s.head(torch.relu(s.fc2(torch.relu(s.fc1(x)))))
for run in sys.argv[1:]:
    base = MLP()
    with torch.no_grad():
        for n, p in base.named_parameters():
            p.copy_(torch.from_numpy(W[n]))
    method = run.rsplit("/", 1)[-1].split("-")[0]
    if method == "full":
        tw = load_file(f"{run}/trained_weights.safetensors")
        with torch.no_grad():
            for n, p in base.named_parameters():
                if n in tw: p.copy_(torch.from_numpy(tw[n]))
        model = base
    else:
        model = PeftModel.from_pretrained(base, run)
    model = model.double().eval()
    d = load_file("models/shift/eval_b.safetensors")
    with torch.no_grad():
        z = model(torch.from_numpy(d["x"]).double()).numpy()
    y = d["labels"]
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    loss = float(np.mean(lse - z[np.arange(len(y)), y]))
    correct = int((z.argmax(1) == y).sum())
    last = [json.loads(l) for l in open(f"{run}/metrics.jsonl")][-1]
    print(f"{run}: python loss {loss:.10f} correct {correct}/{len(y)}; dorac loss {last['eval_loss']:.10f} acc {last['eval_accuracy']*len(y):.0f}; rel {abs(loss-last['eval_loss'])/loss:.2e}")
