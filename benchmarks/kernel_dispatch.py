"""What calling the compiled CPU kernels through the dispatcher costs against calling them through ctypes.

mamlkit.exec.kernels registers each kernel as an operator (``torch.ops.mamlkit.*``) whose CPU
implementation allocates the outputs and calls the compiled function through ctypes, so that the
dispatcher (profiler, tracing) sees each call. This times, on the real shapes of Conv4's first block
and interleaved, the same implementation called three ways, and prints each op's time per call and the
ratios to the direct call:

    python benchmarks/kernel_dispatch.py --threads 2 --rounds 11 --stat min

* ``ctypes``: the implementation called from Python (no dispatcher: what a plain ctypes call costs);
* ``Library``: ``torch.ops.mamlkit.<op>``, as the kernels run (``torch.library.Library.define/impl``);
* ``custom_op``: the same implementation under ``torch.library.custom_op``.

The shapes: ``[75, 64, 28, 28]`` (the first block with 15 queries per class), ``[6, 64, 28, 28]`` (about
the smallest tensor the kernels take, ``MIN_ELEMENTS``) and ``[1, 1, 2, 2]`` (all call overhead).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mamlkit.exec import kernels

K, S = [2, 2], [2, 2]


def arguments(shape: tuple[int, ...]) -> dict[str, tuple]:
    """Each op's arguments on a batch-norm input of ``shape``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    c = shape[1]
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    _, mean, invstd = torch.ops.mamlkit.batch_norm(x, w, b, None, None, 0.1, 1e-5, False)
    out, off = torch.ops.mamlkit.batch_norm_relu_max_pool(x, w, b, mean, invstd, K, S)
    return {"max_pool2d": (x, K, S),
            "batch_norm": (x, w, b, None, None, 0.1, 1e-5, True),
            "batch_norm_backward": (torch.randn_like(x), x, w, mean, invstd, True),
            "batch_norm_relu_max_pool": (x, w, b, mean, invstd, K, S),
            "batch_norm_relu_max_pool_backward": (torch.randn_like(out), x, out, off, w, mean, invstd, K, S, True)}


def mutated(schema: str) -> tuple[str, ...]:
    """The arguments a schema marks as written (``Tensor(a!)? running_mean``)."""
    return tuple(arg.split()[-1] for arg in schema.split("->")[0].strip("()").split(", ") if "!" in arg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=11, help="interleaved rounds")
    ap.add_argument("--calls", type=int, default=20, help="calls per op, variant and round")
    ap.add_argument("--stat", choices=("median", "min"), default="min",
                    help="the round reported: min is steadier on a machine others are using")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit("the compiled kernels are unavailable on this machine")
    names = list(arguments((1, 1, 2, 2)))
    variants = {"ctypes": {n: kernels._IMPLS[n][1] for n in names},
                "Library": {n: getattr(torch.ops.mamlkit, n) for n in names},
                "custom_op": {n: torch.library.custom_op(f"mamlkit_bench::{n}", kernels._IMPLS[n][1],
                                                         mutates_args=mutated(kernels._IMPLS[n][0]),
                                                         schema=kernels._IMPLS[n][0])
                              for n in names}}
    print(f"torch {torch.__version__}, {args.threads} threads, {args.stat} of {args.rounds} interleaved rounds "
          f"of {args.calls} calls; ms per call")
    print(f"{'shape':>17} {'op':>34} " + " ".join(f"{v:>9}" for v in variants) + "  Library/ctypes custom/ctypes")
    for shape in ((75, 64, 28, 28), (6, 64, 28, 28), (1, 1, 2, 2)):
        args_of = arguments(shape)
        for name in names:
            times = {v: [] for v in variants}
            for fns in variants.values():  # warm-up
                fns[name](*args_of[name])
            for _ in range(args.rounds):
                for v, fns in variants.items():
                    t0 = time.perf_counter()
                    for _ in range(args.calls):
                        fns[name](*args_of[name])
                    times[v].append((time.perf_counter() - t0) / args.calls * 1e3)
            stat = statistics.median if args.stat == "median" else min
            t = {v: stat(ts) for v, ts in times.items()}
            print(f"{str(list(shape)):>17} {name:>34} " + " ".join(f"{t[v]:9.4f}" for v in variants)
                  + f"  {t['Library'] / t['ctypes']:14.3f} {t['custom_op'] / t['ctypes']:13.3f}")


if __name__ == "__main__":
    main()
