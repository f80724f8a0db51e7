"""CLINC150 finetune mode before any meta-training: query accuracy after adapting the pretrained last
MiniLM layer and a fresh head, against the layer's inner rate (the head's stays at α=5).

Each task adapts every parameter with plain SGD, a rate per group (``mamlkit.engine.rules.per_parameter_sgd``),
10 steps; accuracy after 1, 5 and 10 steps on the same fixed test episodes for every rate. It shows
whether one α for the layer and the head can work at all. Needs the finetune cache (built on first use).

    MAMLKIT_CACHE=... .venv/bin/python benchmarks/text_layer_rate.py --shots 1 --episodes 40
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--text-per-intent", type=int, default=40)
    parser.add_argument("--layer-rates", type=float, nargs="+", default=[0.0, 0.01, 0.1, 1.0, 5.0])
    parser.add_argument("--head-rate", type=float, default=5.0)
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
                                                   / "clinc150"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    from mamlkit.base.batch import TaskBatch
    from mamlkit.engine.functional import call, named_params
    from mamlkit.engine.inner import adapt_path
    from mamlkit.engine.rules import per_parameter_sgd
    from mamlkit.loop import train
    from mamlkit.presets import preset_config
    from mamlkit.tasks import task_generator, text

    cfg = preset_config(f"clinc-5w{args.shots}s", {"data_root": args.data_root, "encoder_mode": "finetune",
                                                   "text_per_intent": args.text_per_intent, "progress": False})
    model = train.build(cfg)[0].model
    dist = text.build(cfg, "test")
    batch = TaskBatch.cat([dist.sample(1, task_generator(cfg.seed + 1000, "test", k)) for k in range(args.episodes)])
    params = {k: v.detach() for k, v in named_params(model).items()}

    def loss(p, x, y):
        return F.cross_entropy(call(model, p, {}, x), y)

    start = time.perf_counter()
    for rate in args.layer_rates:
        rates = {k: torch.tensor(rate if k.startswith("body.") else args.head_rate) for k in params}
        accs: dict[int, list[float]] = {1: [], 5: [], 10: []}
        for t in range(args.episodes):
            path = adapt_path(loss, params, batch.support_x[t], batch.support_y[t], rule=per_parameter_sgd(rates),
                              steps=10, first_order=True)
            with torch.no_grad():
                for s in accs:
                    accs[s].append((call(model, path[s], {}, batch.query_x[t]).argmax(-1) == batch.query_y[t])
                                   .float().mean().item())
        print(f"5w{args.shots}s layer α={rate:<5} head α={args.head_rate}: "
              + ", ".join(f"{s} steps {100 * sum(v) / len(v):.1f}%" for s, v in accs.items())
              + f" ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
