"""Faults and bad inputs: signals, full disks, two runs in one folder, killed runs' leftovers, crafted
checkpoints, non-finite CSV values and unusable paths. Nothing is lost, nothing is silent, no traceback."""

import dataclasses
import errno
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from helpers import config_flags as flags
from helpers import write_csv
from safetensors.torch import load_file, save_file
from torch import nn

import mamlkit
from mamlkit import checkpoint, config
from mamlkit.loop import train
from mamlkit.presets import PRESETS, preset_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(iterations=12, log_every=2, val_every=6, val_tasks=4, checkpoint_every=100, progress=False,
             tensorboard=False, hidden_sizes=(8, 8), meta_batch=4, eval_tasks=10, eval_query=10,
             eval_steps=(0, 1, 2), eval_shots=(5,), test_inner_steps=2, strategy="vmap", threads=1)


def small_cfg(tmp_path, **kw):
    return preset_config("sinusoid", {**SMALL, "out_dir": str(tmp_path), **kw})


def params_of(trainer):
    return {k: v.detach().clone() for k, v in trainer.learner.meta_parameters().items()}


def assert_same_params(a, b):
    pa, pb = params_of(a), params_of(b)
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


def logged_steps(run: Path) -> tuple[list, list]:
    """The (step, split) records of metrics.jsonl and metrics.csv, in file order."""
    jsonl = [(r["step"], r["split"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    lines = (run / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("step,split"), lines[:1]
    return jsonl, [(int(x.split(",")[0]), x.split(",")[1]) for x in lines[1:]]


@pytest.fixture
def spawn():
    """Start ``python -m mamlkit ARGS`` in a subprocess; whatever is still running at the test's end is killed."""
    procs = []

    def start(*args: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "mamlkit", *map(str, args)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        return procs[-1]

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    start = time.monotonic()
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.05)


# --------------------------------------------------------------------------------------
# 1, 3. SIGTERM: finish the iteration, checkpoint, print the resume command, exit 143; the run folder is
# locked meanwhile (a second run exits 2 naming the folder and PID), and resuming equals an uninterrupted run.


def test_sigterm_checkpoints_locks_and_resume_equals_uninterrupted(cli, tmp_path, spawn):
    long = {**SMALL, "iterations": 100_000, "checkpoint_every": 100_000, "val_every": 100_000}
    proc = spawn("train", "sinusoid", "--out-dir", tmp_path, "--run-name", "r", "--no-compare-pretrained",
                 *flags(long))
    run = tmp_path / "r"
    # training under way: some metrics rows written (log_every 2)
    wait_for(lambda: (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size > 300, proc)
    code, _, err = cli("train", "--resume", run)  # no checkpoint yet: refused either way
    assert code == 2
    code, _, err = cli("train", "sinusoid", "--out-dir", tmp_path, "--run-name", "r", "--overwrite",
                       "--no-progress")
    assert code == 2 and str(run) in err and f"PID {proc.pid}" in err, err
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert f"mamlkit train --resume {run}" in err
    assert "Traceback" not in err
    _, state = checkpoint.load(run)
    stopped = state["step"]
    assert stopped > 0
    # the logs hold every step up to the checkpoint exactly once
    jsonl, rows = logged_steps(run)
    assert [s for s, _ in jsonl] == list(range(2, stopped + 1, 2))[: len(jsonl)]
    # resume to stopped + 5 (the lock died with the process) and compare with an uninterrupted run
    end = stopped + 5
    code, _, err = cli("train", "--resume", run, "--iterations", end, "--no-compare-pretrained")
    assert code == 0, err
    straight = train.fit(train.new_trainer(small_cfg(tmp_path, iterations=end, val_every=100_000), tmp_path / "s"))
    resumed = train.load_trainer(run)
    assert resumed.step == end
    assert_same_params(straight, resumed)
    jsonl, rows = logged_steps(run)
    assert jsonl == rows and len(set(jsonl)) == len(jsonl)
    assert [s for s, split in jsonl if split == "train"] == list(range(2, end + 1, 2)) + ([end] if end % 2 else [])


def _stop_torchrun_run(tmp_path, stop) -> tuple[Path, str, str]:
    """Train 2 ranks under torchrun into ``tmp_path/r``, call ``stop(agent_pid)`` once a few steps are
    logged, and return the run folder and the job's stdout and stderr."""
    long = {**SMALL, "iterations": 100_000, "checkpoint_every": 100_000, "val_every": 100_000}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "mamlkit", "train", "sinusoid", "--out-dir", str(tmp_path), "--run-name", "r",
                             "--no-compare-pretrained", *flags(long)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "r"
    try:
        wait_for(lambda: (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size > 300, proc)
        stop(proc.pid)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return run, out, err


def test_sigterm_under_torchrun_checkpoints_on_rank_0(tmp_path):
    # the agent passes it on to every worker
    run, out, err = _stop_torchrun_run(tmp_path, lambda agent: os.kill(agent, signal.SIGTERM))
    assert (run / "checkpoint.safetensors").exists(), f"no checkpoint; the job said:\n{out[-2000:]}\n{err[-6000:]}"
    stopped = checkpoint.load(run)[1]["step"]
    assert stopped > 0 and f"stopped by SIGTERM at step {stopped}" in out + err
    assert err.count(f"mamlkit train --resume {run}") >= 1
    jsonl, rows = logged_steps(run)
    assert jsonl == rows and [s for s, _ in jsonl] == list(range(2, stopped + 1, 2))


def _worker_of_rank(agent: int, rank: int) -> int:
    """The PID of torchrun's worker ``rank`` (a child of the ``agent`` process), from its environment."""
    for child in Path(f"/proc/{agent}/task/{agent}/children").read_text().split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(child)
    raise AssertionError(f"no worker of rank {rank} under {agent}")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers through /proc")
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    # A signal that reaches one rank first (a scheduler's, or torchrun's own, sent to the workers one by
    # one) must not let that rank leave alone: the others would fail in the next gradient reduction,
    # and rank 0 would write no checkpoint.
    # rank 1 only; rank 0 never gets a signal
    run, out, err = _stop_torchrun_run(tmp_path, lambda agent: os.kill(_worker_of_rank(agent, 1), signal.SIGTERM))
    assert "a collective failed" not in err, err[-2000:]
    assert (run / "checkpoint.safetensors").exists(), f"no checkpoint; the job said:\n{out[-2000:]}\n{err[-6000:]}"
    stopped = checkpoint.load(run)[1]["step"]
    assert stopped > 0 and f"stopped by SIGTERM at step {stopped}" in out + err
    jsonl, rows = logged_steps(run)
    assert jsonl == rows and [s for s, _ in jsonl] == list(range(2, stopped + 1, 2))


def test_stale_lock_of_a_killed_process_does_not_block(cli, tmp_path):
    train.fit(train.new_trainer(small_cfg(tmp_path), tmp_path / "r"))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mamlkit import runfolder\n"
                               "with runfolder.lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)",
                               str(tmp_path / "r")], env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.PIPE, text=True)
    try:
        _stale_lock(cli, tmp_path, holder)
    finally:
        holder.kill()
        holder.communicate()


def _stale_lock(cli, tmp_path, holder):
    assert holder.stdout.readline().strip() == "locked"
    code, _, err = cli("train", "--resume", tmp_path / "r", "--iterations", "14")
    assert code == 2 and f"PID {holder.pid}" in err and str(tmp_path / "r") in err
    holder.kill()  # SIGKILL: no clean-up code runs
    holder.wait()
    code, _, err = cli("train", "--resume", tmp_path / "r", "--iterations", "14", "--no-compare-pretrained")
    assert code == 0, err


# 15. A double Ctrl-C: one clean stop, no traceback (not even from atexit handlers), exit 130.
def test_double_ctrl_c_stops_cleanly(tmp_path, spawn):
    long = {**SMALL, "iterations": 100_000, "checkpoint_every": 100_000, "val_every": 100_000}
    proc = spawn("train", "sinusoid", "--out-dir", tmp_path, "--run-name", "r", "--no-compare-pretrained",
                 *flags(long))
    run = tmp_path / "r"
    wait_for(lambda: (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_size > 300, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    assert checkpoint.load(run)[1]["step"] > 0


# --------------------------------------------------------------------------------------
# 2. A full disk: a torn metrics tail is dropped on resume; a write that fails for lack of space stops the
# run with exit 1 and a message naming the intact checkpoint and the resume command.


def test_resume_drops_a_torn_metrics_tail(cli, tmp_path):
    run = tmp_path / "r"
    train.fit(train.new_trainer(small_cfg(tmp_path), run))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 14, "split": "tr')  # an append cut short
    code, _, err = cli("train", "--resume", run, "--iterations", "16", "--no-compare-pretrained")
    assert code == 0, err
    jsonl, rows = logged_steps(run)
    assert jsonl == rows and [s for s, split in jsonl if split == "train"] == list(range(2, 17, 2))


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_on_metrics_stops_with_exit_1_and_keeps_the_checkpoint(cli, tmp_path, monkeypatch):
    from mamlkit.base.metrics import MetricsLog

    log = MetricsLog.log

    def log_until_full(self, step, split, values):
        if step >= 8:
            _no_space()
        log(self, step, split, values)

    monkeypatch.setattr(MetricsLog, "log", log_until_full)
    code, _, err = cli("train", "sinusoid", "--out-dir", tmp_path, "--run-name", "r",
                       *flags({**SMALL, "checkpoint_every": 4}))
    assert code == 1, err
    assert "no space" in err.lower() and "step 4" in err and f"mamlkit train --resume {tmp_path / 'r'}" in err
    assert "Traceback" not in err
    assert checkpoint.load(tmp_path / "r")[1]["step"] == 4


def test_disk_full_on_checkpoint_keeps_the_previous_one(cli, tmp_path, monkeypatch):
    real = checkpoint.save_file
    calls = []

    def save_then_fill(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: half written, then the disk is full
            Path(path).write_bytes(b"\0" * 100)
            _no_space()
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_then_fill)
    code, _, err = cli("train", "sinusoid", "--out-dir", tmp_path, "--run-name", "r",
                       *flags({**SMALL, "checkpoint_every": 4}))
    assert code == 1 and "no space" in err.lower() and "step 4" in err and "Traceback" not in err
    assert checkpoint.load(tmp_path / "r")[1]["step"] == 4
    assert not list((tmp_path / "r").glob(".*.tmp"))


# --------------------------------------------------------------------------------------
# 4, 5. Logs after a kill, fresh runs into used folders, orphan temporary files.


def test_resume_after_kill_between_log_and_checkpoint_logs_each_step_once(cli, tmp_path):
    run = tmp_path / "r"
    train.fit(train.new_trainer(small_cfg(tmp_path), run), stop_at=6)
    at6 = (run / "checkpoint.safetensors").read_bytes()
    train.fit(train.load_trainer(run), stop_at=10)  # logs 8 and 10 written ...
    (run / "checkpoint.safetensors").write_bytes(at6)  # ... but killed before their checkpoint
    (run / "metrics.csv").write_text("")  # and killed between creating metrics.csv and writing its header
    (run / ".checkpoint.safetensors.x1y2.tmp").write_bytes(b"partial")  # a checkpoint write cut short
    code, _, err = cli("train", "--resume", run, "--no-compare-pretrained")
    assert code == 0, err
    jsonl, rows = logged_steps(run)
    assert jsonl == rows
    assert [s for s, split in jsonl if split == "train"] == list(range(2, 13, 2))
    assert [s for s, split in jsonl if split == "val"] == [6, 12]
    assert not list(run.glob(".*.tmp"))


def test_fresh_run_into_a_killed_runs_folder_is_refused_unless_overwrite(cli, tmp_path):
    run = tmp_path / "r"
    train.fit(train.new_trainer(small_cfg(tmp_path), run), stop_at=4)  # killed after its checkpoint of step 4
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "split": "train", "loss": 1.0}\n')
    args = ["train", "sinusoid", "--out-dir", tmp_path, "--run-name", "r", "--no-compare-pretrained",
            *flags(SMALL)]
    code, _, err = cli(*args)
    assert code == 2 and "--overwrite" in err and f"mamlkit train --resume {run}`" in err
    code, _, err = cli(*args, "--overwrite")
    assert code == 0, err
    jsonl, rows = logged_steps(run)
    assert jsonl == rows and [s for s, split in jsonl if split == "train"] == list(range(2, 13, 2))


# --------------------------------------------------------------------------------------
# 6, 10, 11. Checkpoints: every tensor checked against the model; crafted files exit 2; eval needs no
# optimiser, step or RNG state.


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "r"
    train.fit(train.new_trainer(small_cfg(tmp_path, iterations=2, val_tasks=0), run))
    return run


def _rewrite(path: Path, tensors=None, meta=None):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        old_meta = f.metadata()
    save_file(tensors if tensors is not None else load_file(str(path)), str(path),
              metadata=old_meta if meta is None else meta)


def test_a_broadcastable_tensor_shape_is_refused(cli, run_dir):
    ckpt = run_dir / "checkpoint.safetensors"
    tensors = load_file(str(ckpt))
    assert tensors["meta/2.weight"].shape == (8, 8)
    tensors["meta/2.weight"] = torch.zeros(8)  # copy_ would broadcast it silently
    _rewrite(ckpt, tensors)
    for args in (["eval", run_dir], ["adapt", run_dir, "--support", "x.csv", "--query", "y.csv"],
                 ["train", "--resume", run_dir]):
        code, _, err = cli(*args)
        assert code == 2 and "meta/2.weight" in err and "[8, 8]" in err and "Traceback" not in err


@pytest.mark.parametrize("meta, message", [
    ({"format": "mamlkit", "format_version": "one", "state": "{}"}, "format_version"),
    ({"format": "mamlkit", "format_version": "1"}, "no 'state'"),
    ({"format": "mamlkit", "format_version": "1", "state": "{not json"}, "not JSON"),
    ({"format": "mamlkit", "format_version": "1", "state": "[1, 2]"}, "JSON list"),
    ({"format": "mamlkit", "format_version": "1", "state": "{}"}, "no run config"),
    ({"format": "mamlkit", "format_version": "1", "state": '{"config": {"hidden_sizes": [1000000, 1000000]}}'},
     "memory"),
])
def test_crafted_checkpoints_exit_2(cli, run_dir, meta, message):
    _rewrite(run_dir / "checkpoint.safetensors", meta=meta)
    for args in (["eval", run_dir], ["train", "--resume", run_dir]):
        code, _, err = cli(*args)
        assert code == 2 and message in err and "Traceback" not in err, err


def test_optimizer_state_of_the_wrong_shape_is_refused(cli, run_dir):
    ckpt = run_dir / "checkpoint.safetensors"
    tensors = load_file(str(ckpt))
    tensors["optim/0/exp_avg"] = torch.zeros(3)
    _rewrite(ckpt, tensors)
    code, _, err = cli("train", "--resume", run_dir)
    assert code == 2 and "optim/0/exp_avg" in err and "Traceback" not in err


def test_task_model_files_missing_keys_or_tensors_exit_2(cli, run_dir, tmp_path):
    from mamlkit.use import api

    learner = api.load(run_dir)
    model = learner.adapt(torch.rand(5, 1), torch.rand(5, 1))
    model.save(tmp_path / "task.safetensors")
    meta_ok = {"format": "mamlkit", "format_version": "1"}
    state = checkpoint.load(tmp_path / "task.safetensors")[1]
    del state["kind"]
    _rewrite(tmp_path / "task.safetensors", meta={**meta_ok, "state": json.dumps(state)})
    with pytest.raises(checkpoint.CheckpointError, match="without kind"):
        api.load(tmp_path / "task.safetensors")
    model.save(tmp_path / "task2.safetensors")
    tensors = load_file(str(tmp_path / "task2.safetensors"))
    del tensors["param/0.bias"]
    _rewrite(tmp_path / "task2.safetensors", tensors)
    with pytest.raises(checkpoint.CheckpointError, match="param/0.bias is missing"):
        api.load(tmp_path / "task2.safetensors")


def test_eval_of_a_checkpoint_without_optimizer_step_or_rng(cli, run_dir, tmp_path):
    slim = tmp_path / "slim"
    checkpoint.slim(run_dir, slim / "checkpoint.safetensors")
    tensors, state = checkpoint.load(slim)
    del state["step"]
    _rewrite(slim / "checkpoint.safetensors", meta={"format": "mamlkit", "format_version": "1",
                                                    "state": json.dumps(state)})
    assert not any(k.startswith(("optim/", "rng/")) for k in tensors)
    code, out, err = cli("eval", slim, "--eval-tasks", "5")
    assert code == 0, err
    code, _, err = cli("train", "--resume", slim)  # resuming does need them: refused, with the reason
    assert code == 2 and "not a run to resume" in err
    # the shipped model loads for evaluation (no data needed to build it)
    shipped = train.load_trainer(Path(mamlkit.__file__).parent / "assets" / "omniglot-5w1s.safetensors", resume=False)
    assert shipped.cfg.task == "omniglot"


# --------------------------------------------------------------------------------------
# 7, 14. Regression CSVs for `mamlkit adapt`: non-finite values and non-UTF-8 bytes exit 2 naming file, line,
# column; non-finite and huge values in a training CSV are named as such.


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "1e309"])
def test_adapt_regression_csv_with_non_finite_values_exits_2(cli, run_dir, tmp_path, bad):
    support = write_csv(tmp_path / "s.csv", ["x", "y"], [[0.1, 0.2], [0.3, bad], [0.5, 0.6]])
    query = write_csv(tmp_path / "q.csv", ["x"], [[0.1], [0.2]])
    code, out, err = cli("adapt", run_dir, "--support", support, "--query", query)
    assert code == 2 and str(support) in err and "line 3" in err and "'y'" in err and "Traceback" not in err
    assert "nan" not in out
    code, out, err = cli("adapt", run_dir, "--support", write_csv(tmp_path / "s2.csv", ["x", "y"], [[0.1, 0.2]]),
                         "--query", write_csv(tmp_path / "q2.csv", ["x"], [[0.1], [bad]]))
    assert code == 2 and "line 3" in err and "'x'" in err


def test_adapt_regression_csv_with_a_latin1_byte_exits_2(cli, run_dir, tmp_path):
    support = tmp_path / "s.csv"
    support.write_bytes(b"x,y\n0.1,0.2\n0.3,0.4 \xe9\n")
    code, _, err = cli("adapt", run_dir, "--support", support, "--query", support)
    assert code == 2 and "UTF-8" in err and "Traceback" not in err


def _table(tmp_path, feature, target):
    rows = [[f"t{i % 10}", 1.0 + i, float(i % 7)] for i in range(200)]
    rows[17][1], rows[23][2] = feature, target
    return write_csv(tmp_path / "t.csv", ["task", "x", "y"], rows)


@pytest.mark.parametrize("feature, target, message", [
    ("inf", 1.0, "line 19 column 'x' is 'inf': not a finite number"),
    ("1e309", 1.0, "line 19 column 'x' is '1e309': not a finite number"),
    (2.0, "-inf", "line 25 column 'y' is '-inf': not a finite number"),
    (2.0, "1e308", "column 'y' holds values up to 1e+308, too large"),
    ("1e300", 1.0, "column 'x' holds values up to 1e+300, too large"),
])
def test_training_csv_with_non_finite_or_huge_values_is_named(cli, tmp_path, feature, target, message):
    path = _table(tmp_path, feature, target)
    code, _, err = cli("train", "csv", "--path", path, "--task-column", "task", "--target", "y", "--out-dir",
                       tmp_path, "--iterations", "2", "--no-progress")
    assert code == 2 and message in err and "categorical" not in err, err


# --------------------------------------------------------------------------------------
# 8, 9. Every flag takes effect or is refused.


def test_config_or_preset_with_resume_is_applied_or_refused(cli, run_dir, tmp_path):
    code, _, err = cli("train", "sinusoid", "--resume", run_dir)
    assert code == 2 and "'sinusoid' would be ignored" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner_lr: 0.5\n")
    code, _, err = cli("train", "--resume", run_dir, "--config", bad)
    assert code == 2 and "inner_lr" in err and "cannot change" in err
    good = tmp_path / "good.yaml"
    good.write_text("iterations: 4\ncompare_pretrained: false\n")
    code, _, err = cli("train", "--resume", run_dir, "--config", good)
    assert code == 0, err
    assert checkpoint.load(run_dir)[1]["step"] == 4


def _preset_of(task: str) -> str:
    return next(name for name, p in sorted(PRESETS.items()) if p.overrides.get("task") == task)


def _owned(kind: str, name: str | None = None) -> set[str]:
    """The options the plug-in ``name`` of ``kind`` reads (every plug-in of that kind's, for None)."""
    from mamlkit.base.options import option_classes, options_of, users

    classes = options_of(kind, name) if name else [c for c in option_classes() if any(k == kind for k, _ in users(c))]
    return {f.name for c in classes for f in dataclasses.fields(c)}


def test_every_config_field_is_generic_or_declared_by_the_families_that_use_it():
    from mamlkit.tasks import TASK_FAMILIES

    fields = set(config.field_types())
    task_fields, algo_fields = _owned("task"), _owned("algo")
    assert task_fields <= fields and algo_fields <= fields
    assert not task_fields & algo_fields
    for family in TASK_FAMILIES.values():
        assert _owned("task", family.name) <= task_fields, family.name
    # a field no family reads would be silently ignored everywhere
    used = set().union(*(_owned("task", f.name) for f in TASK_FAMILIES.values()))
    assert task_fields - used == set()


@pytest.mark.parametrize("task", ["sinusoid", "omniglot", "miniimagenet", "csv", "clinc"])
def test_flags_a_family_ignores_are_refused(cli, tmp_path, task):
    defaults = config.TrainConfig()
    ignored = sorted(_owned("task") - _owned("task", task))
    assert ignored
    for name in ignored:
        value = getattr(defaults, name)
        value = {(): ("a",), "": "a"}.get(value, value) if isinstance(value, (tuple, str)) else value
        code, _, err = cli("train", _preset_of(task), "--out-dir", tmp_path, *flags({name: value}))
        flag = "--" + name.replace("_", "-")
        assert code == 2 and flag in err and f"the {task} task family" in err and "Traceback" not in err, (name, err)
    # also from a YAML file
    yaml = tmp_path / "c.yaml"
    value = getattr(defaults, ignored[0])
    yaml.write_text(f"{ignored[0]}: {json.dumps(list(value) if isinstance(value, tuple) else value)}\n")
    code, _, err = cli("train", _preset_of(task), "--config", yaml, "--out-dir", tmp_path)
    assert code == 2 and "--" + ignored[0].replace("_", "-") in err


@pytest.mark.parametrize("algo", ["maml", "fomaml", "mamlpp", "metasgd", "anil", "reptile", "imaml", "pretrain"])
def test_flags_an_algorithm_ignores_are_refused(cli, tmp_path, algo):
    assert _owned("algo", algo) <= _owned("algo")
    defaults = config.TrainConfig()
    for name in sorted(_owned("algo") - _owned("algo", algo)):
        value = getattr(defaults, name)
        value = ("*",) if value == () else value  # a repeatable pattern flag needs a value to be given at all
        code, _, err = cli("train", "sinusoid", "--algo", algo, "--out-dir", tmp_path, *flags({name: value}))
        flag = "--" + name.replace("_", "-")
        assert code == 2 and flag in err and f"--algo {algo}" in err and "Traceback" not in err, (name, err)


def test_sinusoid_flags_take_effect(cli, tmp_path):
    code, _, err = cli("train", "sinusoid", "--out-dir", tmp_path, "--run-name", "r", "--no-compare-pretrained",
                       *flags({**SMALL, "iterations": 2, "hidden_sizes": (3, 5), "eval_shots": (4,),
                               "eval_query": 7}))
    assert code == 0, err
    tensors, state = checkpoint.load(tmp_path / "r")
    assert tensors["meta/2.weight"].shape == (5, 3)
    assert json.loads((tmp_path / "r" / "eval.json").read_text())["mse"]["maml"].keys() >= {"4"}


# --------------------------------------------------------------------------------------
# 12, 13. Images and output paths.


def _png_header_only(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_png_exits_2_naming_the_file(cli, tmp_path):
    from mamlkit.use import io as mio

    bomb = _png_header_only(tmp_path / "huge.png", 20000, 20000)
    with pytest.raises(Exception) as e:
        mio.load_image(bomb, {"size": 28, "mode": "L"}, set())
    assert type(e.value).__name__ == "UserError" and "huge.png" in str(e.value)


def test_unusable_output_paths_are_refused_before_any_work(cli, tmp_path, monkeypatch):
    from mamlkit.use import api

    def no_work(*a, **k):
        raise AssertionError("loaded the model before checking --output")

    monkeypatch.setattr(api, "load", no_work)
    for output, message in ((tmp_path / "missing" / "p.csv", "does not exist"), (tmp_path, "folder")):
        if output == tmp_path:
            output = tmp_path / "adir.csv"
            output.mkdir()
        code, _, err = cli("adapt", "omniglot-5w1s", "--support", tmp_path, "--query", tmp_path, "--output", output)
        assert code == 2 and message in err and "Traceback" not in err
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = cli("example", "clinc", afile)
    assert code == 2 and "is a file" in err


# --------------------------------------------------------------------------------------
# 16. The training's RNG stream: seeded from --seed, checkpointed, so a dropout model resumes bit-identically.


class DropoutMLP(nn.Module):
    def __init__(self, hidden: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Dropout(0.3), nn.Linear(hidden, 1))

    def forward(self, x):
        return self.net(x)


@pytest.fixture
def dropout_family():
    from mamlkit.models import MODELS, register_model
    from mamlkit.tasks import (
        TASK_FAMILIES,
        MLPOptions,
        RegressionEvalOptions,
        Sinusoid,
        TaskFamily,
        register_task_family,
    )

    register_model("dropout_mlp")(lambda hidden=8: DropoutMLP(hidden))
    register_task_family(TaskFamily(  # the sinusoid's options, which the small runs set
        "sinusoid_dropout", build=lambda cfg, split: Sinusoid(k_support=cfg.k_shot, k_query=cfg.k_query),
        model_spec=lambda cfg: {"name": "dropout_mlp", "hidden": 8}, options=(MLPOptions, RegressionEvalOptions)))
    yield
    del MODELS["dropout_mlp"], TASK_FAMILIES["sinusoid_dropout"]


def test_dropout_model_resumes_bit_identically(tmp_path, dropout_family):
    cfg = small_cfg(tmp_path, task="sinusoid_dropout", strategy="loop")
    straight = train.fit(train.new_trainer(cfg, tmp_path / "straight"))
    torch.rand(7)  # whatever else the process draws from the global RNG does not matter
    first = train.fit(train.new_trainer(cfg, tmp_path / "split"), stop_at=5)
    del first
    resumed = train.fit(train.load_trainer(tmp_path / "split"))
    assert_same_params(straight, resumed)
    a, _ = checkpoint.load(tmp_path / "straight")
    b, _ = checkpoint.load(tmp_path / "split")
    assert torch.equal(a["rng/torch"], b["rng/torch"])
    # the seed decides the dropout masks
    other = train.fit(train.new_trainer(small_cfg(tmp_path, task="sinusoid_dropout", strategy="loop", seed=1),
                                        tmp_path / "other"))
    assert not torch.equal(params_of(other)["net.0.weight"], params_of(straight)["net.0.weight"])


# --------------------------------------------------------------------------------------
# Scale: a large CSV is streamed in small batches and encoded into arrays allocated once, never held whole as
# strings. Peak memory (VmHWM: getrusage's ru_maxrss starts from the parent's peak, pytest's here) above the
# process after its imports and after reading a small file (one-time costs of pyarrow's kernels and reader
# threads, ~35 MB, not counted) is bounded by a multiple of the file's size. Reading it as rows of Python
# strings took ~26x; reading it whole with pyarrow ~6x.

MEMORY_FACTOR = 3  # measured 2.4x on this 58 MB file: x in float64 (7 columns, 4 of them one-hot) is 1.5x of it


def _large_csv(path: Path, mb: float) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    n = 50_000
    cols = (rng.integers(0, 200, n), rng.normal(10, 2, n), rng.normal(15, 8, n), rng.integers(0, 2, n),
            rng.choice(["north", "south", "east", "west"], n), rng.normal(100, 20, n))
    block = "".join(f"s{a},{b:.4f},{c:.3f},{d},{e},{f:.3f}\n" for a, b, c, d, e, f in zip(*cols))
    with open(path, "w") as f:
        f.write("store,price,temp,promo,region,sales\n")
        for j in range(int(mb * 2**20 / len(block)) + 1):
            f.write(f"b{j}" + block.replace("\ns", f"\nb{j}s")[:-1] + "\n")
    return path


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is measured with Linux's VmHWM")
def test_large_csv_trains_within_a_memory_limit(tmp_path):
    path = _large_csv(tmp_path / "big.csv", 50)
    size = path.stat().st_size
    with open(path) as f:
        (tmp_path / "small.csv").write_text("".join(next(f) for _ in range(8000)))
    script = ("import sys\nimport torch, pyarrow, pyarrow.csv\nfrom mamlkit import config\n"
              "from mamlkit.tasks import tabular\n"
              "def build(path):\n"
              "    cfg = config.from_dict({'task': 'csv', 'path': path, 'task_column': 'store', 'target': 'sales', "
              "'k_shot': 5, 'k_query': 10})\n"
              "    return tabular.build(cfg, 'train')\n"
              "def status(key):\n"
              "    return next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') "
              "if line.startswith(key + ':'))\n"
              "build(sys.argv[2])\n"
              "open('/proc/self/clear_refs', 'w').write('5')\n"  # VmHWM restarts from here
              "base = status('VmRSS')\n"
              "tasks = build(sys.argv[1])\nbatch = tasks.sample(4, torch.Generator().manual_seed(0))\n"
              "print(len(tasks.data.y), tasks.num_tasks, status('VmHWM') - base)\n")
    out = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "small.csv")],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows, tasks, grown = map(int, out.stdout.split())
    assert rows > 1_000_000 and tasks > 1000
    assert grown <= MEMORY_FACTOR * size, f"peak RSS grew by {grown / size:.2f}x the file's size"
