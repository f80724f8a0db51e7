"""Execution strategies: compile, checkpointed inner loop, the measured ``auto`` choice and
the memory estimate. Every strategy must give the reference loop's meta-gradient (float64, 1e-10)."""

import inspect
import logging
import re
import subprocess
import sys

import pytest
import torch
from helpers import flat
from torch import nn
from torch._dynamo.utils import counters

import mamlkit
from mamlkit.engine.inner import make_task_fn
from mamlkit.engine.rules import sgd
from mamlkit.exec import memory, strategies, tuning
from mamlkit.exec.executor import Executor
from mamlkit.exec.memory import ProbeStopped, peak_tensor_bytes
from mamlkit.loop import train
from mamlkit.models import conv4
from mamlkit.presets import preset_config
from mamlkit.tasks import TaskBatch


def image_batch(tasks=3, ways=3, shots=2, queries=4, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(ways)
    return TaskBatch(torch.rand(tasks, ways * shots, 1, size, size, generator=g, dtype=torch.float64),
                     y.repeat_interleave(shots).repeat(tasks, 1),
                     torch.rand(tasks, ways * queries, 1, size, size, generator=g, dtype=torch.float64),
                     y.repeat_interleave(queries).repeat(tasks, 1))


def conv_model(size=12, hidden=6):
    torch.manual_seed(0)
    return conv4(1, 3, hidden, size).double()


def meta_grad(learner, batch):
    for p in learner.meta_parameters().values():
        p.grad = None
    learner.meta_backward(batch)
    return flat(p.grad for p in learner.meta_parameters().values())


def candidates(learner, iterations=10):
    """``auto``'s candidates for the learner's executor and work."""
    return tuning._candidates(learner.executor, learner.work(), iterations)


def estimate(learner, batch, strategy, enough=None):
    """The memory estimate of the learner's work under ``strategy`` (its executor's backward)."""
    return tuning.estimate(learner.executor, learner.work(), batch, strategy, enough)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_compiled_meta_gradient_equals_the_loop_with_layer_norm():
    """torch.compile of grad(vmap(task)), with ExactNorms traced inside: exact at second order."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 1)).double()
    g = torch.Generator().manual_seed(1)
    batch = TaskBatch(*(torch.randn(4, 6, *s, generator=g, dtype=torch.float64) for s in ((2,), (1,), (2,), (1,))))
    kw = dict(inner_lr=0.1, inner_steps=2, loss_fn="mse")
    ref = meta_grad(mamlkit.MAML(model, strategy="loop", **kw), batch)
    compiled = mamlkit.MAML(model, strategy="compile", **kw)
    counters.clear()
    assert rel(meta_grad(compiled, batch), ref) < 1e-10
    # one graph: a graph break inside the grad transform made the compiled step ~9× slower once
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert rel(meta_grad(compiled, batch), ref) < 1e-10  # the second call reuses the compiled function
    assert len(compiled.executor.strategy.cache) == 1
    # and the native (inexact under vmap) layer norm really is on the path being tested
    assert rel(meta_grad(mamlkit.MAML(model, strategy="vmap", **kw), batch), ref) < 1e-10


@pytest.mark.parametrize("first_order", [False, True])
def test_checkpointed_inner_loop_gives_the_same_meta_gradient(first_order):
    model, batch = conv_model(), image_batch()
    kw = dict(inner_lr=0.3, inner_steps=3, loss_fn="cross_entropy", first_order=first_order, strategy="loop")
    ref = meta_grad(mamlkit.MAML(model, **kw), batch)
    got = meta_grad(mamlkit.MAML(model, checkpoint_inner=True, **kw), batch)
    assert rel(got, ref) < 1e-12


def test_checkpointed_inner_loop_memory_does_not_grow_with_steps():
    model, batch = conv_model(size=24, hidden=16), image_batch(tasks=1, shots=4, size=24)

    def peak(steps, ckpt):
        learner = mamlkit.MAML(model, inner_lr=0.1, inner_steps=steps, loss_fn="cross_entropy", strategy="loop",
                               checkpoint_inner=ckpt)
        return tuning.backward_peak(learner.executor, learner.work(), batch, learner.executor.strategy)

    plain = [peak(s, False) for s in (1, 4, 8)]
    ckpt = [peak(s, True) for s in (1, 4, 8)]
    assert plain[2] > 2.5 * plain[0]             # second order keeps every step's graph
    assert ckpt[2] < 1.35 * ckpt[0]              # checkpointed: one step's graph plus θ_k copies
    assert ckpt[2] < 0.5 * plain[2]


def test_memory_estimate_predicts_the_vmap_peak():
    model, batch = conv_model(), image_batch(tasks=6)
    learner = mamlkit.MAML(model, inner_lr=0.3, inner_steps=2, loss_fn="cross_entropy", strategy="vmap")
    fixed, per_task, exact = estimate(learner, batch, learner.executor.strategy)
    assert per_task > 0 and exact
    measured = tuning.backward_peak(learner.executor, learner.work(), batch, learner.executor.strategy)
    assert abs(fixed + 6 * per_task - measured) < 0.15 * measured


def test_memory_budget_chunks_vmap_and_keeps_the_gradient():
    model, batch = conv_model(), image_batch(tasks=6)
    learner = mamlkit.MAML(model, inner_lr=0.3, inner_steps=2, loss_fn="cross_entropy", strategy="vmap")
    ref = meta_grad(learner, batch)
    fixed, per_task, _ = estimate(learner, batch, learner.executor.strategy)
    budget_mb = (fixed + 2.5 * per_task) / 2**20
    said = []
    chosen = learner.executor.settle(learner.work(), batch, iterations=10, memory_budget_mb=budget_mb,
                                     say=said.append)
    assert chosen.vectorize and chosen.chunk_size == 2
    assert "chunked to 2 tasks" in " ".join(said)
    assert rel(meta_grad(learner, batch), ref) < 1e-10
    with pytest.raises(mamlkit.base.errors.UserError, match="no execution strategy fits"):
        learner.executor.settle(learner.work(), batch, iterations=10, memory_budget_mb=fixed / 2**21)


def test_auto_times_only_exact_candidates_and_leaves_no_trace():
    model, batch = conv_model(), image_batch(tasks=8)
    learner = mamlkit.MAML(model, inner_lr=0.3, inner_steps=2, loss_fn="cross_entropy")
    assert learner.executor.strategy.auto and not learner.executor.strategy.vectorize  # conv on CPU starts as the loop
    ref = meta_grad(mamlkit.MAML(model, inner_lr=0.3, inner_steps=2, loss_fn="cross_entropy", strategy="loop"), batch)
    for p in learner.meta_parameters().values():
        p.grad = None
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    said = []
    chosen = learner.executor.settle(learner.work(), batch, iterations=10, say=said.append)
    assert torch.equal(torch.rand(2), expected)                       # global RNG untouched
    assert all(p.grad is None for p in learner.meta_parameters().values())
    assert chosen.name in ("loop", "threads", "vmap", "vmap(chunk=2)") and not chosen.auto
    # vmap in quarters is a candidate too: it often runs as fast with a fraction of the memory; and
    # with several torch threads, whole tasks on threads
    assert "strategy timing" in said[-1] and all(n in said[-1] for n in ("loop ", "vmap ", "vmap(chunk=2) "))
    assert ("threads " in said[-1]) == (torch.get_num_threads() > 1)
    assert rel(meta_grad(learner, batch), ref) < 1e-10
    # a long run of a model without convolutions also tries the compiled meta-gradient; a short one does not
    mlp_learner = mamlkit.MAML(mamlkit.models.mlp(1, (8,), 1), inner_lr=0.1)
    names = [c.name for c in candidates(mlp_learner, tuning.COMPILE_MIN_ITERATIONS)]
    assert names == ["vmap", "compile"]  # (one task worker in the tests: no threads)
    assert [c.name for c in candidates(mlp_learner, 10)] == ["vmap"]
    # models whose compile could take minutes (attention) are left to vmap
    attention = mamlkit.MAML(nn.Sequential(nn.TransformerEncoderLayer(8, 2), nn.Linear(8, 1)), inner_lr=0.1)
    assert [c.name for c in candidates(attention, 10**6)] == ["vmap"]


def tiny_transformer():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), nn.Flatten(), nn.Linear(24, 1))


def test_auto_times_threads_for_a_transformer_and_keeps_the_fastest(monkeypatch):
    """Whole tasks on threads are a candidate for any model on more than one core, not only for Conv
    nets (they won on a small transformer, benchmarks/RESULTS.md); the choice is the fastest timed."""
    model = tiny_transformer().double()
    g = torch.Generator().manual_seed(0)
    batch = TaskBatch(*(torch.randn(8, 5, *s, generator=g, dtype=torch.float64) for s in ((3, 8), (1,), (3, 8), (1,))))
    learner = mamlkit.MAML(model, inner_lr=0.1, loss_fn="mse")
    monkeypatch.setattr(tuning.threads, "cores", lambda: 2)
    monkeypatch.setattr(tuning.threads, "_task_workers", 1)
    assert "threads" not in [c.name for c in candidates(learner)]  # one worker: nothing to share
    monkeypatch.setattr(tuning.threads, "_task_workers", 2)
    assert [c.name for c in candidates(learner)] == ["threads", "vmap"]
    monkeypatch.setattr(tuning.threads, "cores", lambda: 1)
    assert "threads" not in [c.name for c in candidates(learner)]  # two workers, one core
    monkeypatch.setattr(tuning.threads, "cores", lambda: 2)
    dropout = mamlkit.MAML(nn.Sequential(tiny_transformer(), nn.Dropout(0.1)).double(), inner_lr=0.1, loss_fn="mse")
    assert "threads" in [c.name for c in candidates(dropout)]  # dropout is found by what runs:
    tuning._loop_reference(dropout.executor, dropout.work(), batch)  # once the model ran, its draws are known
    assert "threads" not in [c.name for c in candidates(dropout)]

    ref = meta_grad(mamlkit.MAML(model, inner_lr=0.1, loss_fn="mse", strategy="loop"), batch)
    for fastest in ("threads", "vmap(chunk=2)", "vmap"):
        timed = []

        def time_all(executor, work, batch, options, rounds, say, fastest=fastest, timed=timed):
            timed.append([c.name for c in options])
            return [0.01 if c.name == fastest else 0.05 for c in options]

        monkeypatch.setattr(tuning, "_time_all", time_all)
        monkeypatch.setattr(tuning, "MEMORY_SKIP_FLOOR", 10**12)  # time them all, whatever their memory
        learner = mamlkit.MAML(model, inner_lr=0.1, loss_fn="mse")
        said = []
        chosen = learner.executor.settle(learner.work(), batch, iterations=10, say=said.append)
        assert timed == [["threads", "vmap", "vmap(chunk=2)"]]
        assert chosen.name == fastest and learner.executor.strategy is chosen
        assert f"{fastest} 0.0100" in said[-1]
        assert rel(meta_grad(learner, batch), ref) < 1e-10


def test_strategy_names_round_trip_and_bad_combinations_fail():
    for s in (strategies.Strategy(True), strategies.Strategy(False, 4), strategies.Strategy(True, 8, compiled=True),
              strategies.Strategy(False, workers=-1), strategies.Strategy(False, workers=3)):
        assert strategies.Strategy.from_name(s.name) == s
    with pytest.raises(ValueError, match="checkpoint_inner runs only with strategy loop"):
        mamlkit.MAML(conv_model(), strategy="vmap", checkpoint_inner=True)


def test_resume_keeps_the_measured_strategy(tmp_path):
    cfg = preset_config("sinusoid", dict(iterations=4, log_every=2, val_every=100, val_tasks=0, progress=False,
                                         tensorboard=False, hidden_sizes=(8,), meta_batch=3, out_dir=str(tmp_path),
                                         checkpoint_every=2, compare_pretrained=False))
    trainer = train.fit(train.new_trainer(cfg, tmp_path / "r"), stop_at=2)
    measured = trainer.learner.executor.strategy.name
    assert measured in ("threads", "vmap")
    train.save_checkpoint(trainer, tmp_path / "r" / "checkpoint.safetensors")
    resumed = train.load_trainer(tmp_path / "r")
    assert resumed.learner.executor.strategy.name == measured and not resumed.learner.executor.strategy.auto


@pytest.mark.parametrize("args, message", [
    (["--strategy", "vmap", "--checkpoint-inner"], "checkpoint_inner works with"),
    (["--algo", "reptile", "--checkpoint-inner"], "--checkpoint-inner works with --algo maml"),
    (["--strategy", "compile", "--algo", "reptile"], "--strategy compile is not available for --algo reptile"),
    (["--memory-budget", "-1"], "memory_budget must be >= 0"),
    (["--strategy", "pmap"], "strategy must be auto, vmap, loop, threads or compile"),
    (["--memory-budget", "0.0001", "--hidden-sizes", "8"], "no execution strategy fits --memory-budget"),
])
def test_cli_strategy_errors_exit_2(cli, tmp_path, args, message):
    code, _, err = cli("train", "sinusoid", "--out-dir", tmp_path, "--iterations", "2", "--no-progress",
                       "--no-compare-pretrained", *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_cli_prints_the_memory_estimate_before_training(cli, tmp_path):
    code, out, err = cli("train", "sinusoid", "--out-dir", tmp_path, "--iterations", "2", "--no-progress",
                         "--no-compare-pretrained", "--hidden-sizes", "8", "--val-tasks", "0", "--eval-tasks", "5")
    assert code == 0
    assert "memory estimate, vmap" in out + err


# --- threads: whole tasks on worker threads ------------------------------------------------------


@pytest.mark.parametrize("first_order, checkpoint_inner", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("workers", [2, 3])
def test_threads_equal_the_loop_bitwise(workers, first_order, checkpoint_inner):
    """Tasks on threads give exactly the loop's meta-gradient: per-task gradients are summed in task
    order. Without per-thread module replicas, two threads swap one module's tensors under each other
    and this fails (wrong gradients or "backward through the graph a second time")."""
    model, batch = conv_model(), image_batch(tasks=7)
    kw = dict(inner_lr=0.3, inner_steps=2, loss_fn="cross_entropy", first_order=first_order,
              checkpoint_inner=checkpoint_inner)
    ref = meta_grad(mamlkit.MAML(model, strategy="loop", **kw), batch)
    learner = mamlkit.MAML(model, **kw)
    learner.executor.strategy = strategies.Strategy(False, workers=workers)
    assert learner.executor.strategy.name == f"threads(workers={workers})"
    for _ in range(2):  # and deterministic
        assert torch.equal(meta_grad(learner, batch), ref)
    # evaluation runs through the same threads, under the caller's no_grad
    with torch.no_grad():
        losses, accs = learner.adapted_losses(batch, 2)
    ref_losses, ref_accs = mamlkit.MAML(model, strategy="loop", **kw).adapted_losses(batch, 2)
    assert torch.equal(losses, ref_losses) and torch.equal(accs, ref_accs)


def test_threads_keep_the_callers_thread_count_and_refuse_dropout():
    model, batch = conv_model(), image_batch(tasks=4)
    before = torch.get_num_threads()
    learner = mamlkit.MAML(model, inner_lr=0.3, loss_fn="cross_entropy", strategy="threads")
    assert learner.executor.strategy.name == "threads" and learner.executor.strategy.num_workers() == before
    learner.meta_backward(batch)
    assert torch.get_num_threads() == before  # workers run one intra-op thread each, the caller keeps its own
    dropout = nn.Sequential(conv_model(), nn.Dropout(0.1))
    threaded = mamlkit.MAML(dropout, inner_lr=0.3, loss_fn="cross_entropy", strategy="threads")
    with pytest.raises(mamlkit.base.errors.UserError, match=r"draws random numbers \(aten::bernoulli_\)"):
        threaded.meta_backward(batch)  # refused when the model runs, by what it runs
    torch.set_num_threads(2)
    try:
        auto = mamlkit.MAML(dropout, inner_lr=0.3, loss_fn="cross_entropy")
        tuning._loop_reference(auto.executor, auto.work(), batch)
        names = [c.name for c in candidates(auto, 10)]
        assert "threads" not in names and "threads" in \
            [c.name for c in candidates(mamlkit.MAML(conv_model(), inner_lr=0.3), 10)]
    finally:
        torch.set_num_threads(before)


def test_training_with_threads_equals_the_loop_and_resumes_as_threads(tmp_path):
    def cfg(strategy):
        return preset_config("sinusoid", dict(iterations=4, log_every=2, val_every=100, val_tasks=0, progress=False,
                                              tensorboard=False, hidden_sizes=(8,), meta_batch=5, out_dir=str(tmp_path),
                                              checkpoint_every=2, compare_pretrained=False, strategy=strategy,
                                              dtype="float64"))

    loop = train.fit(train.new_trainer(cfg("loop"), tmp_path / "loop"))
    first = train.fit(train.new_trainer(cfg("threads"), tmp_path / "t"), stop_at=2)
    assert first.learner.executor.strategy.name == "threads"
    train.save_checkpoint(first, tmp_path / "t" / "checkpoint.safetensors")
    resumed = train.load_trainer(tmp_path / "t")
    assert resumed.learner.executor.strategy.name == "threads"
    train.fit(resumed)
    for k, p in loop.learner.meta_parameters().items():
        assert torch.equal(p, resumed.learner.meta_parameters()[k]), k


def test_auto_does_not_time_a_candidate_far_above_the_leanest_in_memory(monkeypatch):
    model, batch = conv_model(), image_batch(tasks=8)
    learner = mamlkit.MAML(model, inner_lr=0.3, inner_steps=2, loss_fn="cross_entropy")
    needs = {}
    for cand in candidates(learner):
        fixed, per_task, _ = estimate(learner, batch, cand)
        needs[cand.name] = fixed + per_task * tuning._together(cand, batch.num_tasks)
    assert needs["vmap"] > 2 * needs["loop"]
    # a skip ratio below vmap's: its trial would set the run's peak, so it is not timed
    monkeypatch.setattr(tuning, "MEMORY_SKIP_RATIO", 0.5 * needs["vmap"] / min(needs.values()))
    monkeypatch.setattr(tuning, "MEMORY_SKIP_FLOOR", 0)
    said = []
    chosen = learner.executor.settle(learner.work(), batch, iterations=10, say=said.append)
    skipped = next(s for s in said if "not timing" in s)
    assert "vmap" in skipped and chosen.name != "vmap"
    timing = " ".join(s for s in said if "strategy timing" in s)
    assert not re.search(r"\bvmap \d", timing)  # timed: the leaner ones only


def test_auto_times_candidates_interleaved_and_skips_one_that_fails(monkeypatch):
    model, batch = conv_model(), image_batch(tasks=8)  # candidates: loop, [threads], vmap, vmap in quarters
    learner = mamlkit.MAML(model, inner_lr=0.3, inner_steps=1, loss_fn="cross_entropy")
    order, real, real_time_all, timing = [], type(learner.executor).trial_backward, tuning._time_all, []

    def spy(self, work, b, strategy):
        if timing:  # the memory estimate runs the backward too: only the timed trial is watched
            order.append(strategy.name)
            if strategy.vectorize and not strategy.chunk_size:
                raise RuntimeError("pretend vmap cannot batch an operation")
        return real(self, work, b, strategy)

    def time_all(*args, **kwargs):
        timing.append(True)
        return real_time_all(*args, **kwargs)

    monkeypatch.setattr(type(learner.executor), "trial_backward", spy)
    monkeypatch.setattr(tuning, "_time_all", time_all)
    monkeypatch.setattr(tuning, "MEMORY_SKIP_FLOOR", 10**12)
    said = []
    chosen = learner.executor.settle(learner.work(), batch, iterations=10, say=said.append)
    names = list(dict.fromkeys(order))  # the candidates in trial order
    assert len(names) >= 3 and "vmap" in names
    rest = [n for n in names if n != "vmap"]
    # one warm-up round, then TRIAL_ROUNDS rounds over every candidate in the same order, each run twice
    # (untimed on a trimmed heap, then timed); vmap dropped
    assert order == names + [n for n in rest for _ in range(2)] * tuning.TRIAL_ROUNDS
    assert any("strategy vmap unavailable here (RuntimeError: pretend vmap" in s for s in said)
    assert chosen.name in rest
    assert all(p.grad is None for p in model.parameters())  # the trial leaves no gradients behind


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc")
def test_tune_malloc_keeps_freed_memory_for_reuse():
    # In a fresh process a freed 16 MB tensor goes back to the OS under glibc's defaults (mmapped, 128 kB
    # threshold) and stays resident for reuse after tune_malloc (heap, 32 MB threshold, 1 GB trim).
    script = ("import os, sys, torch\nfrom mamlkit.exec.tuning import tune_malloc\n"
              "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
              "tuned = sys.argv[1] == '1' and tune_malloc()\n"
              "before = rss(); x = torch.ones(4 * 2**20); del x\n"
              "print(tuned, (rss() - before) / 2**20)\n")
    kept = {}
    for arg in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", script, arg], capture_output=True, text=True, check=True)
        tuned, mb = out.stdout.split()
        kept[arg] = (tuned, float(mb))
    assert kept["1"][0] == "True" and kept["1"][1] > 14  # the 16 MB stayed
    assert kept["0"][1] < 8  # the default returned it


def test_trainer_tunes_malloc_unless_asked_not_to(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(tuning, "tune_malloc", lambda: calls.append(True) or True)
    cfg = preset_config("sinusoid", {"iterations": 2, "meta_batch": 2, "progress": False, "tensorboard": False,
                                     "compare_pretrained": False, "eval_tasks": 2, "strategy": "vmap"})
    train.fit(train.new_trainer(cfg, tmp_path / "tuned"))
    assert calls == [True]
    train.fit(train.new_trainer(cfg.replace(tune_malloc=False), tmp_path / "untuned"))
    assert calls == [True]


def test_estimate_stops_at_one_task_when_that_already_rules_a_candidate_out(monkeypatch):
    model, batch = conv_model(), image_batch(tasks=8)
    learner = mamlkit.MAML(model, inner_lr=0.3, inner_steps=1, loss_fn="cross_entropy", strategy="vmap")
    sizes, real = [], tuning.backward_peak

    def spy(executor, work, b, strategy, limit=None):
        sizes.append(b.num_tasks)
        return real(executor, work, b, strategy, limit)

    monkeypatch.setattr(tuning, "backward_peak", spy)
    fixed, per_task, exact = estimate(learner, batch, learner.executor.strategy)
    assert sizes == [1, 2] and fixed > 0 and exact
    sizes.clear()
    one = fixed + per_task
    # 8 tasks of one task's memory exceed the limit: the one-task probe stops once it holds more than
    # limit / 8 (a lower bound, and no higher process peak), and two tasks are not measured
    got_fixed, got_per_task, exact = estimate(learner, batch, learner.executor.strategy, enough=4 * one)
    assert got_fixed == 0 and not exact and one / 2 < got_per_task <= one
    assert sizes == [1]
    sizes.clear()
    assert estimate(learner, batch, learner.executor.strategy, enough=9 * one) == (fixed, per_task, True)
    assert sizes == [1, 2]
    sizes.clear()
    # a budget below one task: nothing fits, and finding that out takes one task's measurement only
    with pytest.raises(mamlkit.base.errors.UserError, match="no execution strategy fits"):
        learner.executor.settle(learner.work(), batch, iterations=10, memory_budget_mb=0.9 * one / 2**20,
                                say=lambda m: None)
    assert sizes == [1]


def test_a_probe_with_a_limit_stops_as_soon_as_it_holds_more():
    held = []

    def grow():
        for _ in range(10):
            held.append(torch.empty(1000))  # 4,000 bytes each

    with pytest.raises(ProbeStopped) as stop:
        peak_tensor_bytes(grow, limit=10_000)
    assert stop.value.nbytes == 12_000 and len(held) == 2  # the third allocation is not returned to grow
    held.clear()
    assert peak_tensor_bytes(grow, limit=None) == 40_000


# --- the executor: auto's trial in the Python API, candidates that cannot run ---------------------


def test_auto_measures_on_the_first_call_of_the_python_api_and_stays_exact(caplog):
    model, batch = conv_model(), image_batch(tasks=8)
    kw = dict(inner_lr=0.3, inner_steps=2, loss_fn="cross_entropy")
    ref = meta_grad(mamlkit.MAML(model, strategy="loop", **kw), batch)
    learner = mamlkit.MAML(model, **kw)
    assert not learner.executor.settled
    with caplog.at_level(logging.INFO, logger="mamlkit"):
        got = meta_grad(learner, batch)  # the trial runs first, then this call's own meta-gradient
    assert learner.executor.settled and "strategy timing" in caplog.text
    assert rel(got, ref) < 1e-10  # the trial left no gradient behind
    loss, _ = learner.meta_loss(batch)  # settled: no second trial
    assert caplog.text.count("strategy timing") == 1
    other = mamlkit.MAML(model, **kw)
    assert other.tune(batch) == other.executor.strategy.name and other.executor.settled


class _ItemScale(nn.Module):
    """Reads a tensor's value in Python, which vmap cannot batch (the loop can)."""

    def forward(self, x):
        return x * (1.0 + 0.0 * x.detach().abs().max().item())


def test_auto_drops_a_candidate_that_raises_and_an_explicit_one_fails_clearly(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), _ItemScale(), nn.Tanh(), nn.Linear(8, 1)).double()
    g = torch.Generator().manual_seed(1)
    batch = TaskBatch(*(torch.randn(3, 5, 1, generator=g, dtype=torch.float64) for _ in range(4)))
    kw = dict(inner_lr=0.1, inner_steps=2, loss_fn="mse")
    ref = meta_grad(mamlkit.MAML(model, strategy="loop", **kw), batch)
    learner = mamlkit.MAML(model, **kw)  # auto: vmap for a model without convolutions, which raises here
    with caplog.at_level(logging.INFO, logger="mamlkit"):
        got = meta_grad(learner, batch)
    assert "strategy vmap unavailable for this model" in caplog.text and ".item()" in caplog.text
    assert learner.executor.strategy.name == "loop"
    assert torch.equal(got, ref)
    with pytest.raises(mamlkit.UserError, match="strategy vmap cannot run this model"):
        explicit = mamlkit.MAML(model, strategy="vmap", **kw)
        explicit.executor.settle(explicit.work(), batch, iterations=10, say=lambda m: None)


@pytest.mark.parametrize("call", ["meta_loss", "meta_backward"])
def test_an_explicit_strategy_that_cannot_run_the_model_fails_clearly_from_python(call):
    """Without the trainer's trial, the first call of an explicit strategy names it and the strategies that
    work, with torch's error as the cause; the learner still runs after switching to the loop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), _ItemScale(), nn.Tanh(), nn.Linear(8, 1)).double()
    g = torch.Generator().manual_seed(1)
    batch = TaskBatch(*(torch.randn(3, 5, 1, generator=g, dtype=torch.float64) for _ in range(4)))
    learner = mamlkit.MAML(model, strategy="vmap", inner_lr=0.1, inner_steps=2, loss_fn="mse")
    with pytest.raises(mamlkit.UserError, match=r"strategy vmap cannot run this model \(RuntimeError: vmap: "
                       r".*\.item\(\).*strategy='auto'.*'loop'") as info:
        getattr(learner, call)(batch)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value.__cause__, RuntimeError)
    assert all(p.grad is None for p in model.parameters())
    ref = mamlkit.MAML(model, strategy="loop", inner_lr=0.1, inner_steps=2, loss_fn="mse")
    assert torch.isfinite(ref.meta_loss(batch)[0])


# --- the trial is handed what the executor is: a per-task builder, the meta-parameters, the batch -------


def test_the_trial_runs_from_a_builder_and_parameters_alone_and_keeps_an_exact_strategy():
    """No learner anywhere: the executor's trial (memory estimate, the loop's reference meta-gradient, the
    agreement check and the timing) runs from ``build(params) -> fn``, the meta-parameters and the batch, and the
    strategy it keeps gives the loop's float64 meta-gradient."""
    entry_points = (Executor.settle, Executor.ready, Executor.backward, Executor.trial_backward,
                    tuning.settle_strategy, tuning.estimate, tuning.backward_peak, memory.gradient_peak)
    assert all("learner" not in inspect.signature(f).parameters for f in entry_points)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    g = torch.Generator().manual_seed(3)
    batch = TaskBatch(*(torch.randn(8, 5, 1, generator=g, dtype=torch.float64) for _ in range(4)))
    params = dict(model.named_parameters())

    def build(p):
        return make_task_fn(model, p, {}, loss_fn=torch.nn.functional.mse_loss, rule=sgd(0.1), steps=2,
                            first_order=False)

    def meta_gradient(executor):
        for p in params.values():
            p.grad = None
        losses, _ = executor.backward(strategies.Work(build, params), batch)
        return losses, flat(p.grad for p in params.values())

    ref_losses, ref = meta_gradient(Executor(model, "loop"))
    for p in params.values():
        p.grad = None
    executor, said = Executor(model), []
    assert executor.strategy.auto
    chosen = executor.settle(strategies.Work(build, params), batch, iterations=10, say=said.append)
    assert executor.strategy is chosen and not chosen.auto and executor.settled
    assert any("memory estimate, vmap" in s for s in said), said
    assert any("strategy timing" in s and "vmap(chunk=2)" in s for s in said), said  # both candidates timed
    assert all(p.grad is None for p in params.values())  # the trial leaves no gradient behind
    losses, got = meta_gradient(executor)
    assert rel(got, ref) < 1e-12 and torch.allclose(losses, ref_losses, rtol=1e-13, atol=0)
    assert got.abs().max() > 0
