"""Meta-training throughput of mamlkit against peers on the same workload, data and initialisation.

Every implementation runs in its own process (so peak RSS is its own), on the same task
batches and the same initial weights, and proves it computes the same meta-gradient as
mamlkit (float64, first batch; checked after the timed float32 run, so that peak RSS is float32
training's). Peers run only when installed (``pip install -e .[bench]``;
see benchmarks/RESULTS.md for how learn2learn was built here).

    python benchmarks/throughput.py --workload sinusoid --iters 200 --threads 2

Prints a table of meta-iterations/s, tasks/s, peak RSS, the ratio to mamlkit and the achieved
GFLOP/s: the FLOPs of one meta-iteration are counted once (torch.utils.flop_counter on the plain
loop, forward, backward and second-order terms included) and divided by each implementation's time.
The mamlkit rows apply the trainer's glibc malloc settings (``mamlkit.exec.tuning.tune_malloc``), as
``mamlkit train`` does; ``--no-tune-malloc`` leaves them out, and ``GLIBC_TUNABLES`` gives them to every row.
They also run mamlkit's compiled NCHW max-pool and batch-norm forward kernels (``mamlkit.exec.kernels``, on by
default in the loop and threads strategies); ``--no-fast-kernels`` gives them torch's, as the peers have.
``--first-order`` runs every implementation first order (FOMAML) instead. ``--device cuda`` runs every
implementation on the GPU (JAX stays on the CPU and is skipped there), synchronising around the timed
loop and reporting peak GPU memory (``torch.cuda.max_memory_allocated``) instead of peak RSS.
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

# Each workload is a preset (its model, episodes, α, inner steps and meta-batch) plus overrides.
WORKLOADS = {
    "sinusoid": ("sinusoid", {}),                # MLP 1-40-40-1, K=10, α=0.01, 1 step, meta-batch 25
    "omniglot-5w1s": ("omniglot-5w1s", {}),      # Conv4 stride 2, 28×28, α=0.4, 1 step, meta-batch 32, 1 query/class
    "omniglot-5w1s-mb8": ("omniglot-5w1s", dict(meta_batch=8)),  # the same with 8 tasks per meta-iteration
    # Conv4 with max-pool and 15 queries per class, where the pooling and batch-norm passes are a third of the time
    "omniglot-5w1s-q15": ("omniglot-5w1s", dict(pool=True, k_query=15)),
    "omniglot-20w1s": ("omniglot-20w1s", {}),    # Conv4 stride 2, 28×28, α=0.1, 5 steps, meta-batch 16
    # Conv4-32 max-pool on 84×84, 5 steps, 15 queries/class, meta-batch 4; random pixels (speed does not
    # depend on them, and the data set is not on this machine)
    "miniimagenet-5w1s": ("miniimagenet-5w1s", {}),
}
SYNTHETIC = {"miniimagenet-5w1s"}


def workload(name: str) -> dict:
    from mamlkit.presets import preset_config

    preset, overrides = WORKLOADS[name]
    cfg = preset_config(preset, {"data_root": os.environ.get("MAMLKIT_BENCH_DATA", ""), **overrides},
                        loose={"data_root"})
    loss = F.mse_loss if cfg.loss == "mse" else F.cross_entropy
    return dict(cfg=cfg, meta_batch=cfg.meta_batch, inner_lr=cfg.inner_lr, steps=cfg.inner_steps, loss=loss,
                first_order=os.environ.get("MAMLKIT_BENCH_FIRST_ORDER") == "1")


def workload_data(name: str, n: int, dtype=torch.float32):
    from mamlkit.tasks import TaskBatch, get_family, task_generator

    cfg = workload(name)["cfg"]
    if name in SYNTHETIC:
        out = []
        for i in range(n):
            g = task_generator(0, "bench", i)
            shape = (cfg.meta_batch, 3, cfg.image_size, cfg.image_size)
            y = torch.arange(cfg.n_way)
            out.append(TaskBatch(
                torch.rand(shape[0], cfg.n_way * cfg.k_shot, *shape[1:], generator=g, dtype=dtype),
                y.repeat_interleave(cfg.k_shot).repeat(shape[0], 1),
                torch.rand(shape[0], cfg.n_way * cfg.k_query, *shape[1:], generator=g, dtype=dtype),
                y.repeat_interleave(cfg.k_query).repeat(shape[0], 1)))
        return out
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

CHOSEN: dict[str, str] = {}  # what `auto` settled on in this process

def make_mamlkit(strategy, fast_kernels=True, api=False, **kw):
    def setup(model, w):
        import mamlkit
        from mamlkit.exec import kernels
        from mamlkit.exec.tuning import tune_malloc

        if not fast_kernels:
            kernels.set_enabled(False)  # torch's max-pool and batch-norm kernels, as the peers run

        if os.environ.get("MAMLKIT_BENCH_TUNE_MALLOC", "1") == "1":
            tune_malloc()  # as `mamlkit train` does (unless --no-tune-malloc)
        learner = mamlkit.MAML(model, inner_lr=w["inner_lr"], inner_steps=w["steps"], loss_fn=w["loss"],
                               kind="classification" if w["loss"] is F.cross_entropy else "regression",
                               strategy=strategy, first_order=w["first_order"], **kw)
        if strategy == "auto" and not api:  # settle it as the trainer does, on the first batch
            p0 = next(model.parameters())
            first = w["first_batch"] if "first_batch" in w else workload_data(w["name"], 1, p0.dtype)[0].to(p0.device)
            learner.executor.settle(learner.work(), first, iterations=10**6, say=lambda m: print(m, file=sys.stderr))
            if "strategy" not in CHOSEN:  # the float32 run's choice and the trial's own peak, for the table
                CHOSEN.update(strategy=learner.executor.strategy.name, trial_mb=f"{peak_rss_mb():.0f}")
                reset_peak_rss()  # so that the table's peak RSS is training's, after the one-off trial
        # api: as a user of the Python API runs it; auto's trial runs on the first call (in the warm-up)
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
            if w["first_order"]:
                g = {k: v.detach() for k, v in g.items()}
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
                gs = torch.autograd.grad(loss, fast, create_graph=not w["first_order"])
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
            with higher.innerloop_ctx(model, opt, copy_initial_weights=False,
                                      track_higher_grads=not w["first_order"]) as (fmodel, diffopt):
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
    maml = MAML(model, lr=w["inner_lr"], first_order=w["first_order"])

    def step(batch):
        for t in range(batch.num_tasks):
            learner = maml.clone()
            for _ in range(w["steps"]):
                learner.adapt(w["loss"](learner(batch.support_x[t]), batch.support_y[t]))
            (w["loss"](learner(batch.query_x[t]), batch.query_y[t]) / batch.num_tasks).backward()
    return step


def setup_jax(model, w):
    """Hand-written JAX reference (MLP workloads): jit of grad of vmap over tasks, with Adam, in one
    compiled update; the same initial weights and batches. Float64 only for the gradient check."""
    import jax
    import jax.numpy as jnp

    f64 = next(model.parameters()).dtype == torch.float64
    jax.config.update("jax_enable_x64", f64)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if len(linears) != len([m for m in model.modules() if len(list(m.children())) == 0 and
                            not isinstance(m, torch.nn.ReLU)]):
        raise NotImplementedError("the JAX reference covers ReLU MLPs only")
    params = [(jnp.asarray(m.weight.detach().numpy()), jnp.asarray(m.bias.detach().numpy())) for m in linears]

    def forward(p, x):
        for i, (wt, b) in enumerate(p):
            x = x @ wt.T + b
            if i < len(p) - 1:
                x = jax.nn.relu(x)
        return x

    def loss(p, x, y):
        return jnp.mean((forward(p, x) - y) ** 2)

    def task(p, sx, sy, qx, qy):
        for _ in range(w["steps"]):
            g = jax.grad(loss)(p, sx, sy)
            if w["first_order"]:
                g = jax.lax.stop_gradient(g)
            p = jax.tree_util.tree_map(lambda a, b: a - w["inner_lr"] * b, p, g)
        return loss(p, qx, qy)

    def meta(p, sx, sy, qx, qy):
        return jnp.mean(jax.vmap(task, in_axes=(None, 0, 0, 0, 0))(p, sx, sy, qx, qy))

    @jax.jit
    def update(p, m, v, t, sx, sy, qx, qy):  # Adam(1e-3), as the torch implementations use
        g = jax.grad(meta)(p, sx, sy, qx, qy)
        m = jax.tree_util.tree_map(lambda a, b: 0.9 * a + 0.1 * b, m, g)
        v = jax.tree_util.tree_map(lambda a, b: 0.999 * a + 0.001 * b * b, v, g)
        p = jax.tree_util.tree_map(lambda a, b, c: a - 1e-3 * (b / (1 - 0.9 ** t)) / (jnp.sqrt(c / (1 - 0.999 ** t))
                                                                                        + 1e-8), p, m, v)
        return p, m, v, g

    state = {"p": params, "m": jax.tree_util.tree_map(jnp.zeros_like, params),
             "v": jax.tree_util.tree_map(jnp.zeros_like, params), "t": 0}

    def step(batch):
        state["t"] += 1
        arrays = [jnp.asarray(t.numpy()) for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)]
        state["p"], state["m"], state["v"], g = update(state["p"], state["m"], state["v"], state["t"], *arrays)
        jax.block_until_ready(state["p"])
        if f64:  # hand the first meta-gradient to the exactness check
            for m, (gw, gb) in zip(linears, g):
                m.weight.grad = torch.from_numpy(jax.device_get(gw).copy())
                m.bias.grad = torch.from_numpy(jax.device_get(gb).copy())
    return step


IMPLS = {"mamlkit": make_mamlkit("auto"), "mamlkit-api": make_mamlkit("auto", api=True),
         "mamlkit-vmap": make_mamlkit("vmap"),
         "mamlkit-loop": make_mamlkit("loop"), "mamlkit-threads": make_mamlkit("threads"),
         "mamlkit-compile": make_mamlkit("compile"),
         # "-tk": on torch's kernels (mamlkit.exec.kernels off), to measure what the compiled kernels give in one run
         "mamlkit-loop-tk": make_mamlkit("loop", fast_kernels=False),
         "mamlkit-threads-tk": make_mamlkit("threads", fast_kernels=False),
         "mamlkit-loop-ckpt": make_mamlkit("loop", checkpoint_inner=True),
         "mamlkit-vmap-c4": make_mamlkit("vmap", chunk_size=4), "mamlkit-vmap-c8": make_mamlkit("vmap", chunk_size=8),
         "torch.func": setup_torchfunc, "jax": setup_jax,
         "loop": setup_loop, "higher": setup_higher, "learn2learn": setup_learn2learn}


def peak_rss_mb() -> float:
    """This process's peak resident memory. On Linux it is VmHWM, the high-water mark of this
    process's own address space: ``getrusage``'s ru_maxrss would also carry the parent's peak across
    fork and exec, so every child would report at least the parent's (which loaded the data to count
    FLOPs)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Restart VmHWM from the current RSS (Linux; elsewhere the peak keeps counting from the start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run_one(impl: str, name: str, iters: int, warmup: int, threads: int, device: str = "cpu") -> dict:
    torch.set_num_threads(threads)
    w = workload(name) | {"name": name}
    if impl == "jax" and device != "cpu":
        raise NotImplementedError("the JAX reference runs on the CPU only")
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # 1) throughput in float32, with an Adam step as in training
    model = workload_model(name).to(device)
    # the data first, as in training (the trainer loads the data set before choosing a strategy), so that
    # loading it, which peaks above its resting memory, happens before any implementation's own work
    data = [b.to(device) for b in workload_data(name, min(iters, 50))]
    step = IMPLS[impl](model, w | {"first_batch": data[0]})
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for i in range(warmup):
        opt.zero_grad(set_to_none=True)
        step(data[i % len(data)])
        opt.step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for i in range(iters):
        opt.zero_grad(set_to_none=True)
        step(data[i % len(data)])
        opt.step()
    sync()
    elapsed = time.perf_counter() - start
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
    # 2) exactness: the first meta-gradient in float64, after the memory reading so that the float64
    # copy (twice the bytes) does not set the peak reported for float32 training
    del step, opt, data
    model64 = workload_model(name, torch.float64).to(device)
    IMPLS[impl](model64, w)(workload_data(name, 1, torch.float64)[0].to(device))
    grad64 = torch.cat([p.grad.reshape(-1) for p in model64.parameters()]).tolist()
    label = impl + (f" (auto: {CHOSEN['strategy']}; peak RSS {CHOSEN['trial_mb']} MB while choosing)"
                    if "strategy" in CHOSEN else "")
    return {"impl": label, "its_per_s": iters / elapsed, "tasks_per_s": iters * w["meta_batch"] / elapsed,
            "peak_rss_mb": peak_mb, "grad64": grad64}


def matmul_peak(device: str = "cpu") -> float:
    """GFLOP/s of a float32 matmul (2048² on the CPU at the current thread count, 8192² on a GPU, TF32
    off): the machine's practical peak."""
    n = 8192 if device.startswith("cuda") else 2048
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    sync()
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def count_flops(name: str) -> int:
    """FLOPs of one meta-iteration (the plain loop's: the same mathematics every implementation does)."""
    from torch.utils.flop_counter import FlopCounterMode

    w = workload(name) | {"name": name}
    model = workload_model(name)
    step = setup_loop(model, w)
    batch = workload_data(name, 1)[0]
    with FlopCounterMode(display=False) as counter:
        step(batch)
    return counter.get_total_flops()


def _summary(rs: list[dict]) -> dict:
    """One row from an implementation's rounds: the median speed, its range, the largest peak memory."""
    mid = sorted(rs, key=lambda r: r["its_per_s"])[(len(rs) - 1) // 2]  # the lower median: a real run
    return mid | {"peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                  "tasks_min": min(r["tasks_per_s"] for r in rs), "tasks_max": max(r["tasks_per_s"] for r in rs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="sinusoid", choices=sorted(WORKLOADS))
    ap.add_argument("--impls", nargs="+", default=list(IMPLS))
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the implementations this many times, round-robin, each in a fresh process, and "
                         "report the median speed (and its range) and the largest peak memory: on a shared VM, "
                         "speed drifts by ±15%% over minutes, so one pass can favour whichever ran at a quiet moment")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-root", default="", help="dataset root for image workloads (sets MAMLKIT_BENCH_DATA)")
    ap.add_argument("--first-order", action="store_true", help="every implementation first order (FOMAML)")
    ap.add_argument("--no-tune-malloc", action="store_true",
                    help="mamlkit rows without the trainer's glibc malloc settings (mamlkit.exec.tuning.tune_malloc); "
                         "give every row them instead with GLIBC_TUNABLES (see RESULTS.md)")
    ap.add_argument("--no-fast-kernels", action="store_true",
                    help="mamlkit rows with torch's own max-pool and batch-norm kernels (mamlkit.exec.kernels off)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where every implementation runs")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.data_root:
        os.environ["MAMLKIT_BENCH_DATA"] = args.data_root  # children inherit it
    if args.first_order:
        os.environ["MAMLKIT_BENCH_FIRST_ORDER"] = "1"
    if args.no_tune_malloc:
        os.environ["MAMLKIT_BENCH_TUNE_MALLOC"] = "0"
    if args.no_fast_kernels:
        os.environ["MAMLKIT_FAST_KERNELS"] = "0"  # read by mamlkit.exec.kernels in each row's process
    if args.child:
        print(json.dumps(run_one(args.child, args.workload, args.iters, args.warmup, args.threads, args.device)))
        return
    torch.set_num_threads(args.threads)
    flops = count_flops(args.workload)
    peak = matmul_peak(args.device)
    runs: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for impl in args.impls:
            cmd = [sys.executable, __file__, "--child", impl, "--workload", args.workload, "--iters", str(args.iters),
                   "--warmup", str(args.warmup), "--threads", str(args.threads), "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            for line in proc.stderr.splitlines():  # what `auto` measured and chose, as the trainer prints it
                if line.startswith("mamlkit:"):
                    print(f"# {line}")
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"# {impl}: skipped ({last})")
                continue
            runs.setdefault(impl, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
    results = [_summary(rs) for rs in runs.values()]
    ref = next((r for r in results if r["impl"].split(" ")[0] == "mamlkit"), results[0])
    g_ref = torch.tensor(ref["grad64"], dtype=torch.float64)
    memory = "peak GPU memory (MB)" if args.device.startswith("cuda") else "peak RSS (MB)"
    rounds = f", median of {args.rounds} rounds (range in brackets), largest peak" if args.rounds > 1 else ""
    print(f"workload {args.workload} on {args.device}, {args.iters} meta-iterations{rounds}, {args.threads} "
          f"thread(s), torch {torch.__version__}, {'first' if args.first_order else 'second'} order, "
          f"{flops / 1e9:.2f} GFLOP per meta-iteration (counted), float32 matmul peak {peak:.0f} GFLOP/s")
    print(f"| implementation | meta-its/s | tasks/s | GFLOP/s (% of peak) | {memory} | × mamlkit "
          "| max rel. grad diff vs mamlkit |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        g = torch.tensor(r["grad64"], dtype=torch.float64)
        diff = ((g - g_ref).abs().max() / g_ref.abs().max()).item()
        gflops = r["its_per_s"] * flops / 1e9
        spread = f" ({r['tasks_min']:.0f}-{r['tasks_max']:.0f})" if args.rounds > 1 else ""
        print(f"| {r['impl']} | {r['its_per_s']:.1f} | {r['tasks_per_s']:.0f}{spread} | "
              f"{gflops:.1f} ({100 * gflops / peak:.0f}%) | {r['peak_rss_mb']:.0f} | "
              f"{r['tasks_per_s'] / ref['tasks_per_s']:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
