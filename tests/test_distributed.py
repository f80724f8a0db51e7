"""Distributed meta-training: 2 gloo ranks on the CPU equal 1 rank, exactly resumable, and a crash ends the job.

One 2-process job (torch.multiprocessing, loopback only) runs every 2-rank scenario and writes its
numbers to safetensors files; the tests compare them with 1-rank runs computed here in float64.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from mamlkit import config, runfolder
from mamlkit.algorithms import ALGORITHMS
from mamlkit.base.errors import UserError
from mamlkit.loop import distributed, train
from mamlkit.presets import preset_config
from mamlkit.tasks import get_family

ROOT = Path(__file__).resolve().parents[1]
SEED, STEP, ITERS, STOP = 3, 7, 4, 2
# Learned inner rates (Meta-SGD) are meta-parameters too: their gradients must be reduced as well.
ALGOS = [a for a in ("maml", "metasgd") if a in ALGORITHMS]
SMALL = dict(hidden_sizes=(8, 8), meta_batch=5, inner_steps=2, dtype="float64", seed=SEED, iterations=ITERS,
             log_every=1, val_every=2, val_tasks=4, checkpoint_every=2, progress=False, tensorboard=False,
             compare_pretrained=False, threads=1, dist_timeout=60, meta_lr=1e-2)


def small_cfg(out_dir, **kw) -> config.TrainConfig:
    return preset_config("sinusoid", {**SMALL, "out_dir": str(out_dir), **kw})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, size: int, port: int) -> dict[str, str]:
    """What torchrun sets for each worker."""
    return {"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def meta_grad(world, cfg, algo: str, num_tasks: int) -> dict[str, torch.Tensor]:
    """The meta-gradient of training batch STEP (``num_tasks`` tasks) as computed by ``world``."""
    learner, _ = train.build(cfg.replace(algo=algo))
    world.broadcast_(learner)
    tasks = get_family(cfg.task).build(cfg, "train")
    batch = world.train_batch(tasks, cfg.seed, STEP, num_tasks).to(dtype=torch.float64)
    world.backward_and_reduce(learner, batch, num_tasks)  # (metrics, any rank stopping)
    return {k: p.grad.detach().clone() for k, p in learner.meta_parameters().items()}


def params(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in trainer.learner.meta_parameters().items()}


def _two_rank_job(rank: int, size: int, port: int, out: str) -> None:
    """Every 2-rank scenario, in one process group (starting processes is the slow part on CI)."""
    os.environ.update(torchrun_env(rank, size, port))
    torch.set_num_threads(1)
    out = Path(out)
    cfg = small_cfg(out / "runs")
    with distributed.session(cfg) as world:
        assert (world.rank, world.size, world.active) == (rank, size, True)
        for algo in ALGOS:
            for T in (4, 5):
                save_file(meta_grad(world, cfg, algo, T), out / f"grad-{algo}-{T}-{rank}.safetensors")
        straight = train.fit(train.new_trainer(cfg, out / "straight"))
        save_file(params(straight), out / f"straight-{rank}.safetensors")
        first = train.fit(train.new_trainer(cfg, out / "split"), stop_at=STOP)
        assert first.step == STOP
        if rank == 0:  # kept to resume on 1 rank in the test process
            shutil.copytree(out / "split", out / "split-at-stop")
        resumed = train.fit(train.load_trainer(out / "split"))  # every rank loads rank 0's checkpoint
        save_file(params(resumed), out / f"resumed-{rank}.safetensors")
        assert torch.distributed.is_initialized()  # the fits' inner sessions left the group to its owner
    assert not torch.distributed.is_initialized()  # the outermost session tore it down


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    mp.start_processes(_two_rank_job, args=(2, free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    return out


def load(out: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"{name}.safetensors"))


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> float:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, f"max difference {worst:.3g} > {tol}"
    return worst


# ----- single process: sharding, sampling, configuration -----

@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("num_tasks", [4, 5, 7, 25])
def test_shards_partition_the_meta_batch_evenly(num_tasks, size):
    shards = [list(distributed.World(r, size).shard(num_tasks)) for r in range(size)]
    assert sum(shards, []) == list(range(num_tasks))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_a_rank_without_tasks_is_a_user_error():
    with pytest.raises(UserError, match="meta_batch"):
        distributed.World(2, 3).shard(2)


def test_tasks_of_a_step_do_not_depend_on_the_split():
    tasks = get_family("sinusoid").build(small_cfg("x"), "train")
    whole = distributed.World(0, 1).train_batch(tasks, SEED, STEP, 5)
    parts = [distributed.World(r, 2).train_batch(tasks, SEED, STEP, 5) for r in range(2)]
    assert [p.num_tasks for p in parts] == [2, 3]
    for field in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(whole, field), torch.cat([getattr(p, field) for p in parts]))
    other = distributed.World().train_batch(tasks, SEED, STEP + 1, 5)
    assert not torch.equal(whole.support_x, other.support_x)


def test_backend_config_is_checked():
    assert distributed.resolve_backend("auto", "cpu") == "gloo"
    assert distributed.resolve_backend("auto", "cuda:1") == "nccl"
    assert distributed.resolve_backend("gloo", "cuda") == "gloo"
    with pytest.raises(config.ConfigError, match="backend"):
        small_cfg("x", backend="mpi")
    with pytest.raises(config.ConfigError, match="--device cuda"):
        small_cfg("x", backend="nccl")
    with pytest.raises(config.ConfigError, match="dist_timeout"):
        small_cfg("x", dist_timeout=0)


def test_environment_detection(monkeypatch):
    for var in distributed.LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    assert distributed.env_world() is None
    with distributed.session(small_cfg("x")) as world:  # no torchrun: single process, no group
        assert world == distributed.World() and not world.active
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="MASTER_ADDR"):
        distributed.env_world()
    for k, v in torchrun_env(1, 2, 29500).items():
        monkeypatch.setenv(k, v)
    assert distributed.env_world() == distributed.World(1, 2, 1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(UserError, match="outside"):
        distributed.env_world()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_PORT", "0")  # what `torchrun --master-port 0` hands its workers
    with pytest.raises(UserError, match="--standalone"):
        distributed.env_world()


# ----- 2 ranks (gloo) against 1 rank -----

@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("num_tasks", [4, 5])
def test_two_rank_meta_gradient_equals_one_rank(two_ranks, algo, num_tasks):
    one = meta_grad(distributed.World(), small_cfg(two_ranks), algo, num_tasks)
    r0, r1 = (load(two_ranks, f"grad-{algo}-{num_tasks}-{r}") for r in range(2))
    assert_close(r0, one, 1e-6)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # every rank holds the same reduced gradient
    if algo == "metasgd":
        assert any(k.startswith("inner_lr/") and v.abs().max() > 0 for k, v in r0.items())
    if num_tasks == 5:
        # Averaging the two ranks' own means (2 and 3 tasks) would be wrong: the weights matter.
        cfg, world = small_cfg(two_ranks), distributed.World()
        learner, _ = train.build(cfg.replace(algo=algo))
        tasks = get_family(cfg.task).build(cfg, "train")
        batch = world.train_batch(tasks, cfg.seed, STEP, num_tasks).to(dtype=torch.float64)
        for part in (batch[:2], batch[2:]):
            learner.meta_backward(part, weight=0.5)
        naive = {k: p.grad for k, p in learner.meta_parameters().items()}
        assert max((naive[k] - one[k]).abs().max().item() for k in one) > 1e-4


def test_two_rank_training_equals_one_rank(two_ranks, tmp_path):
    one = train.fit(train.new_trainer(small_cfg(tmp_path), tmp_path / "one"))
    r0, r1 = load(two_ranks, "straight-0"), load(two_ranks, "straight-1")
    assert_close(r0, params(one), 1e-9)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    # Rank 0 alone wrote the log (each step once) and its train losses are those of all 5 tasks.
    logged = [json.loads(x) for x in open(two_ranks / "straight" / "metrics.jsonl")]
    want = [json.loads(x) for x in open(tmp_path / "one" / "metrics.jsonl")]
    assert [(r["step"], r["split"]) for r in logged] == [(r["step"], r["split"]) for r in want]
    assert all(abs(a["loss"] - b["loss"]) < 1e-9 for a, b in zip(logged, want))
    saved = train.load_trainer(two_ranks / "straight")
    assert saved.step == ITERS
    assert_close(params(saved), r0, 0.0)


def test_two_rank_resume_equals_uninterrupted(two_ranks):
    straight, resumed = load(two_ranks, "straight-0"), load(two_ranks, "resumed-0")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert all(torch.equal(resumed[k], load(two_ranks, "resumed-1")[k]) for k in resumed)
    steps = [json.loads(x)["step"] for x in open(two_ranks / "split" / "metrics.jsonl") if '"train"' in x]
    assert steps == list(range(1, ITERS + 1))


def test_a_two_rank_checkpoint_resumes_on_one_rank(two_ranks, tmp_path):
    # The tasks of a step do not depend on the number of ranks, so neither does the continued run.
    resumed = train.load_trainer(two_ranks / "split-at-stop", run_dir=tmp_path)
    assert resumed.step == STOP
    assert_close(params(train.fit(resumed)), load(two_ranks, "straight-0"), 1e-9)


# ----- a crashing rank ends the job -----

def _crashing_job(rank: int, size: int, port: int, out: str) -> None:
    os.environ.update(torchrun_env(rank, size, port))
    torch.set_num_threads(1)
    sys.stderr = open(Path(out) / f"stderr-{rank}.txt", "w", buffering=1)
    cfg = small_cfg(Path(out) / "runs", iterations=1000, checkpoint_every=1000, dist_timeout=20)
    trainer = train.new_trainer(cfg, Path(out) / "crash")
    if rank == 1:
        backward = trainer.learner.meta_backward

        def failing(batch, weight=1.0):
            if trainer.step == 2:
                raise RuntimeError("injected failure")
            return backward(batch, weight)

        trainer.learner.meta_backward = failing
    train.fit(trainer)


def test_a_crashing_rank_ends_the_job_with_a_message(tmp_path):
    ctx = mp.start_processes(_crashing_job, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    start = time.monotonic()
    for p in ctx.processes:  # no torchrun to stop the survivor: it must stop by itself
        p.join(timeout=60)
    assert all(p.exitcode not in (None, 0) for p in ctx.processes), [p.exitcode for p in ctx.processes]
    assert time.monotonic() - start < 60
    crashed = (tmp_path / "stderr-1.txt").read_text()
    survivor = (tmp_path / "stderr-0.txt").read_text()
    assert "rank 1 of 2 crashed (RuntimeError: injected failure)" in crashed
    assert "rank 0 of 2: a collective failed" in survivor and "Another rank has probably crashed" in survivor
    # Nothing finished is lost: rank 0 keeps the 2 steps done since the last checkpoint (none, at
    # checkpoint_every=1000), and says how to resume.
    run = tmp_path / "crash"
    assert train.load_trainer(run).step == 2, survivor[-2000:]
    assert f"checkpoint of step 2 saved to {run / 'checkpoint.safetensors'}" in survivor
    assert f"mamlkit train --resume {run}" in survivor
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "train"] == [1, 2]


def _signalled_job(rank: int, size: int, port: int, out: str) -> None:
    """2 ranks; rank 1 alone gets SIGTERM at step 2, outside the meta-gradient (as it sets the step)."""
    os.environ.update(torchrun_env(rank, size, port))
    torch.set_num_threads(1)
    sys.stderr = sys.stdout = open(Path(out) / f"stderr-{rank}.txt", "w", buffering=1)
    cfg = small_cfg(Path(out) / "runs", iterations=1000, checkpoint_every=1000, val_every=1000, dist_timeout=20)
    trainer = train.new_trainer(cfg, Path(out) / "signalled")
    if rank == 1:
        set_step = trainer.learner.set_step

        def signalled(step: int) -> None:
            if step == 2:
                signal.raise_signal(signal.SIGTERM)
            set_step(step)

        trainer.learner.set_step = signalled
    with runfolder.stop_on_signals():
        try:
            train.fit(trainer)
        except runfolder.Stopped:
            (Path(out) / f"stopped-{rank}.txt").write_text(str(trainer.step))


def test_a_signal_anywhere_in_the_loop_stops_every_rank_at_the_same_step(tmp_path):
    # The signal lands on rank 1 between two meta-gradients: rank 1 must finish the step with the
    # others and stop where they all agree (after step 3), not leave alone at step 2 and make rank 0's
    # next reduction fail without a checkpoint.
    ctx = mp.start_processes(_signalled_job, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    for p in ctx.processes:
        p.join(timeout=60)
    errors = [(tmp_path / f"stderr-{r}.txt").read_text() for r in range(2)]
    assert [p.exitcode for p in ctx.processes] == [0, 0], errors
    assert [(tmp_path / f"stopped-{r}.txt").read_text() for r in range(2)] == ["3", "3"], errors
    assert train.load_trainer(tmp_path / "signalled").step == 3
    assert "stopped by SIGTERM at step 3" in errors[0] and "a collective failed" not in errors[0]


# ----- the command line under torchrun -----

def test_torchrun_cli_trains_and_only_rank_0_reports(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to this python")
    flags = ["--iterations", "3", "--meta-batch", "5", "--hidden-sizes", "8", "8", "--val-tasks", "4",
             "--val-every", "3", "--eval-tasks", "4", "--eval-steps", "0", "1", "--eval-shots", "5",
             "--no-compare-pretrained", "--no-progress", "--no-tensorboard", "--threads", "1",
             "--out-dir", str(tmp_path), "--run-name", "cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master-addr=127.0.0.1",
                           f"--master-port={free_port()}", "-m", "mamlkit", "train", "sinusoid", *flags],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run folder:") == 1 and proc.stdout.count("| K | steps |") == 1
    assert "2 rank(s)" in proc.stdout
    assert train.load_trainer(tmp_path / "cli").step == 3


def test_other_commands_refuse_to_run_on_several_ranks(cli, monkeypatch):
    for k, v in torchrun_env(0, 2, 29500).items():
        monkeypatch.setenv(k, v)
    code, _, err = cli("presets")
    assert code == 2 and "only `mamlkit train` runs distributed" in err
