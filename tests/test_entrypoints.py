"""Every entry point runs under the trainer's thread plan and gives the caller's thread settings back, and
evaluation runs on the learner's executor, so a model that trains also evaluates.

The plan (mamlkit.exec.threads): one intra-op thread on the CPU unless ``--threads N`` (or ``threads=N``)
says otherwise. The caller's count below is 3, a value no plan here chooses, so a command that leaves
it changed, or runs without its plan, shows."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import mamlkit
from mamlkit.base.batch import TaskBatch
from mamlkit.eval import evaluate, reports
from mamlkit.eval.evaluate import test_tasks as fixed_tasks
from mamlkit.exec import threads
from mamlkit.tasks.sinusoid import Sinusoid
from mamlkit.use import api

CALLER = 3  # the caller's own torch thread count
FAST = ["--iterations", "2", "--meta-batch", "2", "--log-every", "1", "--val-every", "2", "--val-tasks", "2",
        "--eval-tasks", "4", "--eval-query", "5", "--eval-steps", "0", "1", "--eval-shots", "5", "--hidden-sizes",
        "8", "--no-compare-pretrained", "--no-progress", "--no-tensorboard", "--strategy", "loop"]
RL_FAST = ["--hidden-sizes", "8", "--meta-batch", "3", "--traj-per-task", "4", "--horizon", "10", "--eval-tasks",
           "4", "--eval-traj", "3", "--pretrain-iterations", "1", "--no-progress", "--no-baselines"]


@pytest.fixture
def caller_threads():
    torch.set_num_threads(CALLER)
    yield
    torch.set_num_threads(1)


def spy(monkeypatch, owner, name: str) -> list[tuple[int, int]]:
    """Record ``(torch threads, task workers)`` each time ``owner.name`` is called, and call it."""
    seen, original = [], getattr(owner, name)

    def wrapper(*args, **kwargs):
        seen.append((torch.get_num_threads(), threads.task_workers()))
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return seen


@pytest.fixture(scope="module")
def sinusoid_run(tmp_path_factory):
    """A finished two-iteration sinusoid run."""
    from mamlkit.cli import main

    out = tmp_path_factory.mktemp("runs")
    assert main(["train", "sinusoid", "--out-dir", str(out), *FAST]) == 0
    torch.set_num_threads(1)
    return out / "sinusoid-maml"


@pytest.fixture(scope="module")
def nav2d_run(tmp_path_factory):
    from mamlkit.cli import main

    out = tmp_path_factory.mktemp("rl")
    assert main(["rl", "train", "nav2d", "--iterations", "1", "--out-dir", str(out), "--run-name", "r",
                 *RL_FAST]) == 0
    torch.set_num_threads(1)
    return out / "r"


# --- the command line ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, inside", [([], 1), (["--threads", "2"], 2)])
def test_train_runs_its_plan_and_gives_the_callers_threads_back(cli, tmp_path, caller_threads, monkeypatch,
                                                                 flag, inside):
    seen = spy(monkeypatch, reports, "report")
    code, _, err = cli("train", "sinusoid", "--out-dir", str(tmp_path), *FAST, *flag)
    assert code == 0, err
    assert seen == [(inside, threads.cores() if not flag else 2)]
    assert torch.get_num_threads() == CALLER and threads.task_workers() == CALLER


@pytest.mark.parametrize("flag, inside", [([], 1), (["--threads", "2"], 2)])
def test_eval_runs_the_trainers_plan_and_gives_the_callers_threads_back(cli, sinusoid_run, tmp_path, caller_threads,
                                                                        monkeypatch, flag, inside):
    seen = spy(monkeypatch, reports, "report")
    code, _, err = cli("eval", str(sinusoid_run), "--out", str(tmp_path), "--eval-tasks", "4", *flag)
    assert code == 0, err
    assert [s[0] for s in seen] == [inside]
    assert torch.get_num_threads() == CALLER and threads.task_workers() == CALLER


@pytest.mark.parametrize("flag, inside", [([], 1), (["--threads", "2"], 2)])
def test_adapt_runs_the_trainers_plan_and_gives_the_callers_threads_back(cli, sinusoid_run, tmp_path, caller_threads,
                                                                         monkeypatch, flag, inside):
    seen = spy(monkeypatch, api.Learner, "adapt")
    (tmp_path / "s.csv").write_text("x,y\n0.1,0.2\n0.5,0.4\n")
    (tmp_path / "q.csv").write_text("x\n0.3\n")
    code, _, err = cli("adapt", str(sinusoid_run), "--support", tmp_path / "s.csv", "--query", tmp_path / "q.csv",
                       *flag)
    assert code == 0, err
    assert [s[0] for s in seen] == [inside]
    assert torch.get_num_threads() == CALLER


@pytest.mark.parametrize("flag, inside", [([], 1), (["--threads", "2"], 2)])
def test_rl_eval_and_adapt_run_the_plan_and_give_the_callers_threads_back(cli, nav2d_run, tmp_path, caller_threads,
                                                                          monkeypatch, flag, inside):
    from mamlkit.rl import evaluate as rl_evaluate

    seen = spy(monkeypatch, rl_evaluate, "report")
    code, _, err = cli("rl", "eval", str(nav2d_run), "--out", str(tmp_path), *flag)
    assert code == 0, err
    assert [s[0] for s in seen] == [inside]
    assert torch.get_num_threads() == CALLER
    seen = spy(monkeypatch, rl_evaluate, "trajectory_figure")
    code, _, err = cli("rl", "adapt", str(nav2d_run), "--goal", "0.3", "-0.2", "--steps", "1", "--traj", "2",
                       "--out", str(tmp_path / "adapt.png"), *flag)
    assert code == 0, err
    assert [s[0] for s in seen] == [inside]
    assert torch.get_num_threads() == CALLER


@pytest.mark.parametrize("command", [["eval", "RUN"], ["adapt", "RUN", "--support", "s", "--query", "q"],
                                     ["rl", "eval", "RUN"], ["rl", "adapt", "nav2d", "--goal", "0", "0"]])
def test_a_negative_thread_count_is_refused(cli, capsys, command):
    with pytest.raises(SystemExit) as stop:
        cli(*command, "--threads", "-1")
    assert stop.value.code == 2
    assert "--threads takes a count >= 0 (0: mamlkit chooses), got '-1'" in capsys.readouterr().err


# --- the Python API ----------------------------------------------------------------------------------------


def sinusoid_batch(tasks: int = 4) -> TaskBatch:
    return Sinusoid(k_support=5, k_query=5).sample(tasks, torch.Generator().manual_seed(0))


def recorder(model: nn.Module) -> list[int]:
    """Torch's thread count at every forward of ``model`` and every backward through its parameters."""
    seen: list[int] = []
    model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    for p in model.parameters():
        p.register_hook(lambda g: seen.append(torch.get_num_threads()))
    return seen


@pytest.mark.parametrize("given, inside", [({}, 1), ({"threads": 2}, 2)])
def test_meta_training_calls_run_the_plan_and_give_the_callers_threads_back(caller_threads, given, inside):
    model = mamlkit.models.mlp(1, (8,), 1)
    learner = mamlkit.MAML(model, inner_lr=0.01, loss_fn="mse", strategy="loop", **given)
    seen, batch = recorder(model), sinusoid_batch()
    loss, _ = learner.meta_loss(batch)
    assert torch.get_num_threads() == CALLER and seen and set(seen) == {inside}
    seen.clear()
    loss.backward()  # after meta_loss returned: the plan holds for its backward too, and is undone after
    assert seen and set(seen) == {inside}
    assert torch.get_num_threads() == CALLER
    seen.clear()
    learner.meta_backward(batch)
    assert seen and set(seen) == {inside} and torch.get_num_threads() == CALLER


def test_the_callers_threads_become_task_workers():
    """Without threads=N, a call keeps to the cores the caller gave torch: its count becomes the task
    workers of the threads strategy, and the intra-op count drops to one."""
    model = mamlkit.models.mlp(1, (8,), 1)
    learner = mamlkit.MAML(model, inner_lr=0.01, loss_fn="mse", strategy="loop")
    seen = []
    model.register_forward_pre_hook(lambda *_: seen.append((torch.get_num_threads(), threads.task_workers())))
    torch.set_num_threads(2)
    try:
        learner.meta_backward(sinusoid_batch())
        assert set(seen) == {(1, 2)} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_adapt_and_a_loaded_checkpoints_adapt_run_the_plan(sinusoid_run, caller_threads):
    model = mamlkit.models.mlp(1, (8,), 1)
    learner = mamlkit.MAML(model, inner_lr=0.01, loss_fn="mse")
    seen, batch = recorder(model), sinusoid_batch(1)
    learner.adapt(batch.support_x[0], batch.support_y[0], steps=2)
    assert seen and set(seen) == {1} and torch.get_num_threads() == CALLER
    loaded = mamlkit.load(sinusoid_run)
    seen = recorder(loaded.meta.model)
    loaded.adapt(batch.support_x[0], batch.support_y[0], steps=2)
    assert seen and set(seen) == {1} and torch.get_num_threads() == CALLER


def test_nested_plans_keep_the_outermost():
    with threads.planned(threads.ThreadPlan(intra_op=2, task_workers=2)):
        with threads.planned(threads.ThreadPlan(intra_op=1, task_workers=5)):
            assert (torch.get_num_threads(), threads.task_workers()) == (2, 2)
        assert threads.active() == threads.ThreadPlan(intra_op=2, task_workers=2)
    assert threads.active() is None and torch.get_num_threads() == 1


# --- evaluation on the executor ----------------------------------------------------------------------------


class _Branchy(nn.Module):
    """Reads a tensor's value in Python (data-dependent control flow): vmap cannot run it, the loop can."""

    def __init__(self, out: int = 1):
        super().__init__()
        self.body, self.head = nn.Linear(1, 8), nn.Linear(8, out)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        if h.mean() > 0:
            h = h * 2
        return self.head(h)


def test_evaluation_runs_a_model_vmap_cannot_in_the_loop_with_the_loops_numbers():
    """``auto`` before its trial starts as vmap: evaluation falls back to the loop, with the loop's numbers."""
    torch.manual_seed(0)
    model = _Branchy().double()
    tasks = fixed_tasks(Sinusoid(k_support=5, k_query=5), 3, 6)
    auto = mamlkit.MAML(model, inner_lr=0.05, loss_fn="mse")
    loop = mamlkit.MAML(model, inner_lr=0.05, loss_fn="mse", strategy="loop")
    assert auto.executor.strategy.vectorize
    got = evaluate.evaluate(auto, tasks, 3, dtype=torch.float64, guard=True)
    ref = evaluate.evaluate(loop, tasks, 3, dtype=torch.float64, guard=True)
    assert torch.equal(got.losses, ref.losses) and torch.equal(got.halved, ref.halved)
    assert not torch.equal(got.losses[:, 3], got.losses[:, 0])  # it took its steps
    plain = evaluate.evaluate(auto, tasks, 3, dtype=torch.float64)  # the learner's own path, same fallback
    assert torch.equal(plain.losses, evaluate.evaluate(loop, tasks, 3, dtype=torch.float64).losses)


def test_evaluation_under_vmap_runs_a_recurrent_model_with_the_loops_numbers():
    """Evaluation enters the executor's modes: a recurrent layer runs under vmap as in training (bare
    ``torch.func.vmap`` has no batching rule for it)."""

    class LSTMRegressor(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.LSTM(1, 4, batch_first=True), nn.Linear(4, 1)

        def forward(self, x):
            out, _ = self.rnn(x.unsqueeze(1))
            return self.head(out[:, -1])

    torch.manual_seed(0)
    model = LSTMRegressor().double()
    tasks = fixed_tasks(Sinusoid(k_support=5, k_query=5), 3, 4)
    vmapped = mamlkit.MAML(model, inner_lr=0.05, loss_fn="mse", strategy="vmap")
    got = evaluate.evaluate(vmapped, tasks, 2, dtype=torch.float64, guard=True)
    assert not vmapped.executor._vmap_failed  # it ran vectorised
    ref = evaluate.evaluate(mamlkit.MAML(model, inner_lr=0.05, loss_fn="mse", strategy="loop"), tasks, 2,
                            dtype=torch.float64, guard=True)
    assert (got.losses - ref.losses).abs().max().item() < 1e-12


def test_dropout_in_train_mode_is_evaluated():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1)).double().train()
    learner = mamlkit.MAML(model, inner_lr=0.05, loss_fn="mse", strategy="vmap")
    result = evaluate.evaluate(learner, fixed_tasks(Sinusoid(k_support=5, k_query=5), 3, 4), 2, dtype=torch.float64,
                               guard=True)
    assert torch.isfinite(result.losses).all() and result.losses.shape == (4, 3)


# --- the input a checkpoint records -------------------------------------------------------------------------


def test_adapt_of_a_checkpoint_without_an_input_record_uses_the_familys_else_says_why(cli, sinusoid_run, tmp_path,
                                                                                     monkeypatch):
    from mamlkit import checkpoint
    from mamlkit.tasks import TASK_FAMILIES

    tensors, state = checkpoint.load(sinusoid_run / "checkpoint.safetensors")
    assert state["input"]["features"] == 1
    del state["input"]  # as a checkpoint written before inputs were recorded
    old = tmp_path / "old.safetensors"
    checkpoint.save(old, tensors, state)
    (tmp_path / "s.csv").write_text("x,y\n0.1,0.2\n0.5,0.4\n")
    (tmp_path / "q.csv").write_text("x\n0.3\n")
    args = ["--support", tmp_path / "s.csv", "--query", tmp_path / "q.csv"]
    code, out, err = cli("adapt", old, *args)
    assert code == 0, err  # the sinusoid family's input spec: one column
    assert out.splitlines()[0] == "x0,prediction"
    widthless = dataclasses.replace(TASK_FAMILIES["sinusoid"], input_spec=lambda cfg: {"type": "vector"})
    monkeypatch.setitem(TASK_FAMILIES, "sinusoid", widthless)
    code, _, err = cli("adapt", old, *args)
    assert code == 2 and "does not record how many input columns its model takes" in err
    assert "Traceback" not in err
