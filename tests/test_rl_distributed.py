"""`mamlkit rl train` across ranks: 2 gloo ranks on the CPU take the 1-process steps (float64, nav2d), only rank 0
writes, and a SIGTERM to one rank stops both after the same iteration with a checkpoint.

The 2-process jobs run with torch.multiprocessing on the loopback, as tests/test_distributed.py's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from mamlkit import runfolder
from mamlkit.base.batch import task_generator
from mamlkit.cli import main
from mamlkit.loop import distributed
from mamlkit.rl import sampling, train
from mamlkit.rl.config import RLConfig
from mamlkit.rl.envs import Nav2D, sample_tasks
from mamlkit.rl.maml_trpo import MAMLTRPO
from mamlkit.rl.policy import build_policy
from tests.test_distributed import free_port, torchrun_env

ITERS = 3
# 5 tasks split 2 + 3; a Fisher on the first 3 tasks (rank 1 holds one of them) and a fraction of the states
SMALL = dict(env="nav2d", hidden_sizes=(8, 8), meta_batch=5, traj_per_task=4, horizon=15, dtype="float64", seed=4,
             iterations=ITERS, val_every=2, val_tasks=3, checkpoint_every=1, log_every=1, progress=False,
             baselines=False, fisher_tasks=3, fisher_fraction=0.5, threads=1, dist_timeout=60)


def small_cfg(out: Path, **kw) -> RLConfig:
    return RLConfig(**{**SMALL, "out_dir": str(out), **kw})


def params(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in trainer.policy.named_parameters()}


def _two_rank_job(rank: int, size: int, port: int, out: str) -> None:
    os.environ.update(torchrun_env(rank, size, port))
    torch.set_num_threads(1)
    out = Path(out)
    cfg = small_cfg(out)
    with distributed.session(cfg):
        trained = train.fit(train.new_trainer(cfg, out / "two"))
        save_file(params(trained), out / f"two-{rank}.safetensors")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rl-dist")
    mp.start_processes(_two_rank_job, args=(2, free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    return out


def rows(run: Path, split: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def test_two_ranks_take_the_one_process_steps(two_ranks, tmp_path):
    one = train.fit(train.new_trainer(small_cfg(tmp_path), tmp_path / "one"))
    r0, r1 = (load_file(str(two_ranks / f"two-{r}.safetensors")) for r in range(2))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # every rank took the same step
    start = params(train.new_trainer(small_cfg(tmp_path), tmp_path / "unused"))
    assert max((params(one)[k] - start[k]).abs().max().item() for k in start) > 1e-3  # training moved them
    worst = max((r0[k] - v).abs().max().item() for k, v in params(one).items())
    print("max |2 ranks - 1 process| of the parameters:", worst)
    assert worst == 0.0  # bit for bit: the ranks add the tasks' rows in one process's order
    # rank 0 alone wrote the log, once per step; its returns and TRPO numbers are the whole meta-batch's
    two, mine = rows(two_ranks / "two", "train"), rows(tmp_path / "one", "train")
    assert [r["step"] for r in two] == [r["step"] for r in mine] == list(range(1, ITERS + 1))
    for a, b in zip(two, mine):
        for key in ("return_pre", "return_post", "clip_frac_pre", "loss_before", "grad_norm", "loss", "kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key
        assert a["backtracks"] == b["backtracks"]
    val, val_one = rows(two_ranks / "two", "val"), rows(tmp_path / "one", "val")  # rank 0 validated
    assert [r["step"] for r in val] == [r["step"] for r in val_one] == [2]
    assert val[0]["return_post"] == pytest.approx(val_one[0]["return_post"], rel=1e-9)
    assert train.load_trainer(two_ranks / "two").step == ITERS


def test_a_rank_samples_its_rows_of_the_one_process_rollout():
    # Goals within reach and a loose tolerance: the episodes of some tasks end early, and at different steps
    # in the two blocks, so the block that ends first must still draw the noise of the other's steps.
    gen = torch.Generator().manual_seed(0)
    goals = 0.5 * sample_tasks("nav2d", 5, gen)
    policy = build_policy(2, 2, (8,), 1.0, 0, torch.float64)
    fn = sampling.policy_fn(policy, dict(policy.named_parameters()), per_task=False)

    def run(rows: range | None, longest=None) -> tuple[sampling.Episodes, torch.Generator]:
        g = torch.Generator().manual_seed(7)
        env = Nav2D(goals if rows is None else goals[rows.start:rows.stop], 3, horizon=80, goal_tol=0.2,
                    action_scale=10)
        share = None if rows is None else sampling.Share(rows, 5, longest)
        return sampling.rollout(env, fn, g, torch.float64, share=share), g

    whole, g_whole = run(None)
    ran = int(whole.mask.any((0, 1)).sum()) + 1  # the steps one process ran: all done, then one more
    assert whole.mask.sum(-1).amax(1).tolist() == [2, 1, 6, 1, 1] and ran == 7  # block [0, 2) ends first
    for rows in (range(0, 2), range(2, 5)):
        part, g_part = run(rows, lambda n: ran)
        mask = part.mask
        assert torch.equal(mask, whole.mask[rows.start:rows.stop])
        for name in ("obs", "actions", "dist"):
            a, b = getattr(part, name), getattr(whole, name)[rows.start:rows.stop]
            assert torch.equal(a[mask], b[mask]), name
        assert torch.equal(part.rewards, whole.rewards[rows.start:rows.stop])
        assert torch.equal(torch.rand(4, generator=g_part), torch.rand(4, generator=g_whole.clone_state()))
        # sampling the next batch from the same state: the advantages the inner step sees are the same
        adv = sampling.advantages(part, 0.99, 1.0)
        assert torch.allclose(adv, sampling.advantages(whole, 0.99, 1.0)[rows.start:rows.stop], atol=1e-12)


def test_one_process_collect_is_unchanged_by_the_share_machinery(tmp_path):
    # The single-process path draws, adapts and logs as before: a 1-rank world and no world agree bitwise.
    cfg = small_cfg(tmp_path)
    policy = build_policy(2, 2, (8, 8), 1.0, 0, torch.float64)
    out = []
    for world in (None, distributed.World()):
        gen = task_generator(cfg.seed, "train", 0)
        batch, stats = MAMLTRPO(policy, cfg, world).collect(sample_tasks("nav2d", 5, gen), gen)
        out.append((batch, stats, torch.rand(3, generator=gen)))
    assert all(torch.equal(getattr(out[0][0], f), getattr(out[1][0], f))
               for f in ("support_x", "support_y", "query_x", "query_y"))
    assert out[0][1].keys() == out[1][1].keys() and torch.equal(out[0][2], out[1][2])


def _signalled_job(rank: int, size: int, port: int, out: str) -> None:
    """2 ranks of a long run; the test sends SIGTERM to rank 1 alone."""
    os.environ.update(torchrun_env(rank, size, port))
    torch.set_num_threads(1)
    sys.stderr = sys.stdout = open(Path(out) / f"out-{rank}.txt", "w", buffering=1)
    cfg = small_cfg(Path(out), iterations=10_000, checkpoint_every=10_000, val_every=0, dist_timeout=30)
    trainer = train.new_trainer(cfg, Path(out) / "signalled")
    with runfolder.stop_on_signals():
        try:
            train.fit(trainer)
        except runfolder.Stopped as e:
            (Path(out) / f"stopped-{rank}.txt").write_text(f"{trainer.step} {e.signum}")


def start_two(job, out: Path) -> mp.ProcessContext:
    return mp.start_processes(job, args=(2, free_port(), str(out)), nprocs=2, join=False, start_method="spawn")


def exit_codes(ctx: mp.ProcessContext, within: float) -> list[int | None]:
    """The ranks' exit codes once they ended (None: still running after ``within`` seconds in all). No
    torchrun stops the other rank here: it must stop by itself."""
    deadline = time.monotonic() + within
    for p in ctx.processes:
        p.join(timeout=max(0.1, deadline - time.monotonic()))
    return [p.exitcode for p in ctx.processes]


def test_a_sigterm_to_one_rank_stops_both_with_a_checkpoint(tmp_path):
    ctx = start_two(_signalled_job, tmp_path)
    log, deadline = tmp_path / "signalled" / "metrics.jsonl", time.monotonic() + 90
    while time.monotonic() < deadline and not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.05)
    os.kill(ctx.processes[1].pid, signal.SIGTERM)
    codes = exit_codes(ctx, 90)
    outs = [(tmp_path / f"out-{r}.txt").read_text() for r in range(2)]
    assert codes == [0, 0], outs
    stopped = [(tmp_path / f"stopped-{r}.txt").read_text().split() for r in range(2)]
    assert stopped[0] == stopped[1], stopped  # the same step on both ranks
    step = int(stopped[0][0])
    assert step >= 2 and int(stopped[0][1]) == signal.SIGTERM
    saved = train.load_trainer(tmp_path / "signalled")
    assert saved.step == step  # rank 0 wrote the checkpoint of the step they stopped at
    assert [r["step"] for r in rows(tmp_path / "signalled", "train")] == list(range(1, step + 1))
    assert "Resume with `mamlkit rl train --resume" in outs[0] and "collective failed" not in outs[0] + outs[1]
    # the checkpoint resumes in one process (a step's tasks and noise do not depend on the ranks) and continues
    # the run as one uninterrupted process runs it, bit for bit
    resumed = train.fit(saved, stop_at=step + 1)
    cfg = small_cfg(tmp_path / "one", iterations=10_000, checkpoint_every=10_000, val_every=0, dist_timeout=30)
    straight = train.fit(train.new_trainer(cfg, tmp_path / "straight"), stop_at=step + 1)
    assert all(torch.equal(v, params(straight)[k]) for k, v in params(resumed).items())


def _crashing_job(rank: int, size: int, port: int, out: str) -> None:
    """2 ranks; rank 1 fails in its third meta-iteration."""
    os.environ.update(torchrun_env(rank, size, port))
    torch.set_num_threads(1)
    sys.stderr = sys.stdout = open(Path(out) / f"out-{rank}.txt", "w", buffering=1)
    if rank == 1:
        step, calls = MAMLTRPO.meta_step, []

        def failing(self, tasks, generator):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected failure")
            return step(self, tasks, generator)

        MAMLTRPO.meta_step = failing
    cfg = small_cfg(Path(out), iterations=10_000, checkpoint_every=10_000, val_every=0, dist_timeout=30)
    train.fit(train.new_trainer(cfg, Path(out) / "crash"))


def test_a_dying_rank_ends_the_job_and_rank_0_keeps_the_finished_iterations(tmp_path):
    codes = exit_codes(start_two(_crashing_job, tmp_path), 90)
    assert all(code not in (None, 0) for code in codes), codes  # both ended, neither hangs
    crashed, survivor = ((tmp_path / f"out-{r}.txt").read_text() for r in (1, 0))
    assert "rank 1 of 2 crashed (RuntimeError: injected failure)" in crashed
    assert "rank 0 of 2: a collective failed" in survivor
    run = tmp_path / "crash"
    assert train.load_trainer(run).step == 2, survivor[-2000:]  # the 2 finished iterations, none after
    assert f"checkpoint of step 2 saved to {run / 'checkpoint.safetensors'}" in survivor
    assert f"mamlkit rl train --resume {run}" in survivor


def torchrun_and_env() -> tuple[Path, dict[str, str]]:
    """The torchrun beside this python (the test skips without it) and an environment that imports this tree."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to this python")
    root = Path(__file__).resolve().parents[1]
    return torchrun, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}


def test_torchrun_rl_train_trains_and_only_rank_0_reports(tmp_path):
    torchrun, env = torchrun_and_env()
    flags = ["--iterations", "2", "--meta-batch", "3", "--traj-per-task", "2", "--horizon", "10", "--hidden-sizes",
             "8", "--val-every", "1", "--val-tasks", "2", "--eval-tasks", "2", "--eval-traj", "2", "--eval-lrs", "0.1",
             "--pretrain-iterations", "1", "--no-progress", "--threads", "1", "--out-dir", str(tmp_path)]
    proc = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master-addr=127.0.0.1",
                           f"--master-port={free_port()}", "-m", "mamlkit", "rl", "train", "nav2d", *flags],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run folder:") == 1 and proc.stdout.count("| steps |") == 1  # rank 0 alone
    run = tmp_path / "rl-nav2d-maml-trpo"
    assert train.load_trainer(run).step == 2 and train.load_trainer(run / "pretrained").step == 1
    assert (run / "eval.md").exists() and "pretrained" in (run / "eval.md").read_text()


def test_two_nodes_train_as_one_process_and_only_the_first_node_writes(tmp_path):
    """Two torchrun launchers on the loopback as two machines of one rank each (``--nnodes 2``): every rank is
    its node's ``LOCAL_RANK`` 0, so a job that took "local rank 0" for "the writer" would write twice. The job
    ends with the one-process parameters bit for bit (float64) and one set of files."""
    torchrun, env = torchrun_and_env()
    flags = ["--iterations", "2", "--meta-batch", "3", "--traj-per-task", "2", "--horizon", "10", "--hidden-sizes",
             "8", "--val-every", "1", "--val-tasks", "2", "--eval-tasks", "2", "--eval-traj", "2", "--eval-lrs", "0.1",
             "--no-baselines", "--dtype", "float64", "--no-progress", "--threads", "1"]
    port, nodes = free_port(), []
    for node in range(2):
        (tmp_path / f"node{node}").mkdir()
        nodes.append(subprocess.Popen(
            [str(torchrun), "--nnodes=2", f"--node-rank={node}", "--nproc_per_node=1", "--master-addr=127.0.0.1",
             f"--master-port={port}", "-m", "mamlkit", "rl", "train", "nav2d", *flags, "--out-dir",
             str(tmp_path / "shared")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            cwd=tmp_path / f"node{node}"))
    outs = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [err[-3000:] for _, err in outs]
    assert outs[0][0].count("run folder:") == 1 and outs[0][0].count("| steps |") == 1
    assert "run folder:" not in outs[1][0] and "| steps |" not in outs[1][0]  # the second node wrote nothing
    assert [p for node in range(2) for p in (tmp_path / f"node{node}").iterdir()] == []  # nothing in either cwd
    assert main(["rl", "train", "nav2d", *flags, "--out-dir", str(tmp_path / "one")]) == 0
    two, one = (train.load_trainer(tmp_path / d / "rl-nav2d-maml-trpo") for d in ("shared", "one"))
    assert two.step == one.step == 2
    assert all(torch.equal(v, params(one)[k]) for k, v in params(two).items())
    assert [r["step"] for r in rows(tmp_path / "shared" / "rl-nav2d-maml-trpo", "train")] == [1, 2]
