"""Meta-training throughput of mamlkit against peers on the same workload, data and initialisation.

Every implementation runs in its own process (so peak RSS is its own), on the same task
batches and the same initial weights, and first proves it computes the same meta-gradient as
mamlkit (float64, first batch). Peers run only when installed (``pip install -e .[bench]``;
see benchmarks/RESULTS.md for how learn2learn was built here).

    python benchmarks/throughput.py --workload sinusoid --iters 200 --threads 2

Prints a table of meta-iterations/s, tasks/s, peak RSS and the ratio to mamlkit.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
import types

import torch
import torch.nn.functional as F

# Each workload is a preset (its model, episodes, α, inner steps and meta-batch), second order.
WORKLOADS = {
    "sinusoid": "sinusoid",              # MLP 1-40-40-1, K=10, α=0.01, 1 step, meta-batch 25
    "omniglot-5w1s": "omniglot-5w1s",    # Conv4 stride 2, 28×28, α=0.4, 1 step, meta-batch 32
    "omniglot-20w1s": "omniglot-20w1s",  # Conv4 stride 2, 28×28, α=0.1, 5 steps, meta-batch 16
}


def workload(name: str) -> dict:
    from mamlkit.presets import preset_config

    cfg = preset_config(WORKLOADS[name], {"data_root": os.environ.get("MAMLKIT_BENCH_DATA", "")})
    loss = F.mse_loss if cfg.loss == "mse" else F.cross_entropy
    return dict(cfg=cfg, meta_batch=cfg.meta_batch, inner_lr=cfg.inner_lr, steps=cfg.inner_steps, loss=loss)


def workload_data(name: str, n: int, dtype=torch.float32):
    from mamlkit.tasks import get_family, task_generator

    cfg = workload(name)["cfg"]
    dist = get_family(cfg.task).build(cfg, "train")
    return [dist.sample(cfg.meta_batch, task_generator(0, "bench", i)).to(dtype=dtype) for i in range(n)]


def workload_model(name: str, dtype=torch.float32):
    from mamlkit.models import build_model
    from mamlkit.tasks import get_family

    cfg = workload(name)["cfg"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_model(get_family(cfg.task).model_spec(cfg)).to(dtype)


# --- implementations: step(model, batch, alpha, steps) accumulates the mean meta-gradient in .grad --------

def make_mamlkit(strategy):
    def setup(model, w):
        import mamlkit

        learner = mamlkit.MAML(model, inner_lr=w["inner_lr"], inner_steps=w["steps"], loss_fn=w["loss"],
                               kind="classification" if w["loss"] is F.cross_entropy else "regression",
                               strategy=strategy)
        return lambda batch: learner.meta_backward(batch)
    return setup


def setup_torchfunc(model, w):
    """Hand-written torch.func reference: vmap over tasks of a per-task function, outer torch.func.grad."""
    from torch.func import functional_call, grad, vmap

    names = [n for n, _ in model.named_parameters()]

    def inner_loss(p, x, y):
        return w["loss"](functional_call(model, p, (x,)), y)

    def task(p, sx, sy, qx, qy):
        for _ in range(w["steps"]):
            g = grad(inner_loss)(p, sx, sy)
            p = {k: p[k] - w["inner_lr"] * g[k] for k in p}
        return inner_loss(p, qx, qy)

    def meta(p, b):
        return vmap(task, in_dims=(None, 0, 0, 0, 0))(p, b.support_x, b.support_y, b.query_x, b.query_y).mean()

    meta_grad = grad(meta)

    def step(batch):
        params = {n: p.detach() for n, p in model.named_parameters()}
        g = meta_grad(params, batch)
        for n, p in zip(names, model.parameters()):
            p.grad = g[n] if p.grad is None else p.grad + g[n]
    return step


def setup_loop(model, w):
    """A plain per-task loop with torch.autograd.grad(create_graph=True)."""
    def step(batch):
        params = list(model.parameters())
        names = [n for n, _ in model.named_parameters()]
        total = 0.0
        for t in range(batch.num_tasks):
            fast = params
            for _ in range(w["steps"]):
                loss = w["loss"](torch.func.functional_call(model, dict(zip(names, fast)),
                                                            (batch.support_x[t],)), batch.support_y[t])
                gs = torch.autograd.grad(loss, fast, create_graph=True)
                fast = [p - w["inner_lr"] * g for p, g in zip(fast, gs)]
            total = total + w["loss"](torch.func.functional_call(model, dict(zip(names, fast)),
                                                                 (batch.query_x[t],)), batch.query_y[t])
        (total / batch.num_tasks).backward()
    return step


def setup_higher(model, w):
    import higher

    opt = torch.optim.SGD(model.parameters(), lr=w["inner_lr"])

    def step(batch):
        for t in range(batch.num_tasks):
            with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(w["steps"]):
                    diffopt.step(w["loss"](fmodel(batch.support_x[t]), batch.support_y[t]))
                (w["loss"](fmodel(batch.query_x[t]), batch.query_y[t]) / batch.num_tasks).backward()
    return step


def _import_l2l_maml():
    # learn2learn's top-level import needs torchvision and more; its MAML module needs only torch.
    if "learn2learn.algorithms.maml" in sys.modules:
        return sys.modules["learn2learn.algorithms.maml"].MAML
    spec = importlib.util.find_spec("learn2learn")
    if spec is None:
        raise ImportError("learn2learn is not installed")
    root = os.path.dirname(spec.origin)
    for name, path in (("learn2learn", root), ("learn2learn.algorithms", os.path.join(root, "algorithms"))):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [path]
            sys.modules[name] = mod
    import learn2learn.algorithms.maml as l2l_maml
    return l2l_maml.MAML


def setup_learn2learn(model, w):
    MAML = _import_l2l_maml()
    maml = MAML(model, lr=w["inner_lr"], first_order=False)

    def step(batch):
        for t in range(batch.num_tasks):
            learner = maml.clone()
            for _ in range(w["steps"]):
                learner.adapt(w["loss"](learner(batch.support_x[t]), batch.support_y[t]))
            (w["loss"](learner(batch.query_x[t]), batch.query_y[t]) / batch.num_tasks).backward()
    return step


IMPLS = {"mamlkit": make_mamlkit("auto"), "mamlkit-vmap": make_mamlkit("vmap"),
         "mamlkit-loop": make_mamlkit("loop"), "torch.func": setup_torchfunc,
         "loop": setup_loop, "higher": setup_higher, "learn2learn": setup_learn2learn}


def run_one(impl: str, name: str, iters: int, warmup: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    w = workload(name)
    # 1) exactness: the first meta-gradient in float64
    model64 = workload_model(name, torch.float64)
    IMPLS[impl](model64, w)(workload_data(name, 1, torch.float64)[0])
    grad64 = torch.cat([p.grad.reshape(-1) for p in model64.parameters()]).tolist()
    # 2) throughput in float32, with an Adam step as in training
    model = workload_model(name)
    step = IMPLS[impl](model, w)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = workload_data(name, min(iters, 50))
    for i in range(warmup):
        opt.zero_grad(set_to_none=True)
        step(data[i % len(data)])
        opt.step()
    start = time.perf_counter()
    for i in range(iters):
        opt.zero_grad(set_to_none=True)
        step(data[i % len(data)])
        opt.step()
    elapsed = time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"impl": impl, "its_per_s": iters / elapsed, "tasks_per_s": iters * w["meta_batch"] / elapsed,
            "peak_rss_mb": rss_mb, "grad64": grad64}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="sinusoid", choices=sorted(WORKLOADS))
    ap.add_argument("--impls", nargs="+", default=list(IMPLS))
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-root", default="", help="dataset root for image workloads (sets MAMLKIT_BENCH_DATA)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.workload, args.iters, args.warmup, args.threads)))
        return
    if args.data_root:
        os.environ["MAMLKIT_BENCH_DATA"] = args.data_root  # children inherit it
    results = []
    for impl in args.impls:
        cmd = [sys.executable, __file__, "--child", impl, "--workload", args.workload, "--iters", str(args.iters),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"# {impl}: skipped ({last})")
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ref = next((r for r in results if r["impl"] == "mamlkit"), results[0])
    g_ref = torch.tensor(ref["grad64"], dtype=torch.float64)
    print(f"workload {args.workload}, {args.iters} meta-iterations, {args.threads} thread(s), torch "
          f"{torch.__version__}, second order")
    print("| implementation | meta-its/s | tasks/s | peak RSS (MB) | × mamlkit | max rel. grad diff vs mamlkit |")
    print("|---|---|---|---|---|---|")
    for r in results:
        g = torch.tensor(r["grad64"], dtype=torch.float64)
        diff = ((g - g_ref).abs().max() / g_ref.abs().max()).item()
        print(f"| {r['impl']} | {r['its_per_s']:.1f} | {r['tasks_per_s']:.0f} | {r['peak_rss_mb']:.0f} | "
              f"{r['tasks_per_s'] / ref['tasks_per_s']:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
