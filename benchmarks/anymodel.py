"""Second-order MAML on a tiny transformer: mamlkit's strategies against learn2learn, higher and a plain
autograd loop.

The workload: a 2-layer pre-norm ``nn.TransformerEncoder`` (d=32, 4 heads, feed-forward 64, dropout 0) over
sequences of 8 tokens of 4 features, mean-pooled into a linear regression head; tasks of 10 support and 10
query sequences, meta-batch 8, 1 inner SGD step at α=0.01, exact second order. Every implementation runs
in its own process (so peak RSS is its own) on the same batches and initial weights, and proves it computes
mamlkit's meta-gradient (float64, first batch). The peers need torch's math attention kernel to run at all
(the fused kernels have no double backward), which they get here by hand; mamlkit picks it by itself.

    python benchmarks/anymodel.py --iters 20 --threads 2

Prints meta-iterations/s, tasks/s, peak RSS and each row's ratio to mamlkit's ``auto``. A peer that is not
installed gives a failed row (benchmarks/RESULTS.md says how learn2learn was built here).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

TASKS, SHOTS, LEN, FEATURES, ALPHA, STEPS = 8, 10, 8, 4, 0.01, 1
IMPLEMENTATIONS = ("mamlkit-auto", "mamlkit-vmap", "mamlkit-loop", "mamlkit-threads", "learn2learn", "higher",
                   "torch-loop")


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(FEATURES, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 1)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def batches(n: int, dtype: torch.dtype):
    from mamlkit.tasks import TaskBatch

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        w = torch.randn(TASKS, 1, FEATURES, 1, generator=g)
        xs = [torch.randn(TASKS, SHOTS, LEN, FEATURES, generator=g) for _ in range(2)]
        ys = [torch.tanh(x.mean(2, keepdim=True) @ w).squeeze(-1) for x in xs]
        out.append(TaskBatch(xs[0], ys[0], xs[1], ys[1]).to(dtype=dtype))
    return out


def model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return Encoder().to(dtype)


def mamlkit_step(name: str, net: nn.Module, first):
    import mamlkit
    learner = mamlkit.MAML(net, inner_lr=ALPHA, inner_steps=STEPS, loss_fn="mse", strategy=name.split("-")[1])
    if learner.executor.strategy.auto:
        learner.executor.settle(learner.work(), first, iterations=1000, say=lambda msg: print(msg, file=sys.stderr))
    return lambda batch: learner.meta_backward(batch)


def higher_step(net: nn.Module, _first):
    import higher

    inner = torch.optim.SGD(net.parameters(), lr=ALPHA)

    def step(batch):
        with sdpa_kernel([SDPBackend.MATH]):
            for t in range(batch.num_tasks):
                with higher.innerloop_ctx(net, inner, copy_initial_weights=False) as (fnet, diffopt):
                    for _ in range(STEPS):
                        diffopt.step(F.mse_loss(fnet(batch.support_x[t]), batch.support_y[t]))
                    (F.mse_loss(fnet(batch.query_x[t]), batch.query_y[t]) / batch.num_tasks).backward()
    return step


def learn2learn_step(net: nn.Module, _first):
    from throughput import _import_l2l_maml  # its MAML module alone: the package's __init__ needs torchvision

    maml = _import_l2l_maml()(net, lr=ALPHA)

    def step(batch):
        with sdpa_kernel([SDPBackend.MATH]):
            for t in range(batch.num_tasks):
                learner = maml.clone()
                for _ in range(STEPS):
                    learner.adapt(F.mse_loss(learner(batch.support_x[t]), batch.support_y[t]))
                (F.mse_loss(learner(batch.query_x[t]), batch.query_y[t]) / batch.num_tasks).backward()
    return step


def torch_step(net: nn.Module, _first):
    params = dict(net.named_parameters())

    def step(batch):
        with sdpa_kernel([SDPBackend.MATH]):
            for t in range(batch.num_tasks):
                fast = dict(params)
                for _ in range(STEPS):
                    loss = F.mse_loss(torch.func.functional_call(net, fast, (batch.support_x[t],)), batch.support_y[t])
                    grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
                    fast = {k: v - ALPHA * g for (k, v), g in zip(fast.items(), grads)}
                q = F.mse_loss(torch.func.functional_call(net, fast, (batch.query_x[t],)), batch.query_y[t])
                (q / batch.num_tasks).backward()
    return step


def build(name: str, net: nn.Module, first):
    if name.startswith("mamlkit"):
        return mamlkit_step(name, net, first)
    peers = {"learn2learn": learn2learn_step, "higher": higher_step, "torch-loop": torch_step}
    return peers[name](net, first)


def run_one(name: str, iters: int, warmup: int) -> dict:
    """Time ``name`` in float32, then its float64 meta-gradient on the first batch (for the check)."""
    data = batches(warmup + iters, torch.float32)
    net = model(torch.float32)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    step = build(name, net, data[0])
    for i, batch in enumerate(data):
        if i == warmup:
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        step(batch)
        opt.step()
    seconds = (time.perf_counter() - start) / iters
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    net64 = model(torch.float64)
    build(name, net64, batches(1, torch.float64)[0])(batches(1, torch.float64)[0])
    grad = torch.cat([p.grad.reshape(-1) for p in net64.parameters()]).tolist()
    return {"name": name, "seconds": seconds, "rss_mb": rss, "grad": grad}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(args.one, args.iters, args.warmup)))
        return
    rows = []
    for name in IMPLEMENTATIONS:
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--iters", str(args.iters), "--warmup",
                               str(args.warmup), "--threads", str(args.threads)], capture_output=True, text=True)
        if proc.returncode:
            err = proc.stderr.strip().splitlines()
            rows.append({"name": name, "error": err[-1] if err else f"exit {proc.returncode}"})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    # the reference row is mamlkit's auto, or the first row that ran when that one failed
    ok = [r for r in rows if "error" not in r]
    if not ok:
        raise SystemExit("every row failed:\n" + "\n".join(f"{r['name']}: {r['error']}" for r in rows))
    reference = next((r for r in ok if r["name"] == "mamlkit-auto"), ok[0])
    ref = torch.tensor(reference["grad"], dtype=torch.float64)
    base = reference["seconds"]
    print(f"tiny transformer, second-order MAML, meta-batch {TASKS}, {args.iters} timed iterations, "
          f"{args.threads} threads")
    print(f"| implementation | it/s | tasks/s | peak RSS (MB) | speed vs {reference['name']} "
          "| max rel. diff of meta-grad |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | failed: {r['error'][:100]} | | | | |")
            continue
        g = torch.tensor(r["grad"], dtype=torch.float64)
        diff = ((g - ref).abs().max() / ref.abs().max()).item()
        print(f"| {r['name']} | {1 / r['seconds']:.2f} | {TASKS / r['seconds']:.1f} | {r['rss_mb']:.0f} | "
              f"{base / r['seconds']:.2f}× | {diff:.1e} |")


if __name__ == "__main__":
    main()
