"""The main job, `mamlkit train sinusoid`: its evaluation table, its divergence checks, what it writes,
the trainer's thread choice, and the README's numbers against benchmarks/RESULTS.md."""

import json
import re

import pytest
import torch
from conftest import ROOT

import mamlkit
from mamlkit.eval import reports
from mamlkit.eval.evaluate import EvalResult, evaluate
from mamlkit.eval.evaluate import test_tasks as fixed_tasks
from mamlkit.exec import threads
from mamlkit.loop import train
from mamlkit.presets import preset_config
from mamlkit.tasks.sinusoid import Sinusoid

FAST = dict(iterations=40, log_every=20, val_every=40, val_tasks=8, checkpoint_every=100, progress=False,
            tensorboard=False, meta_batch=5, eval_tasks=30, strategy="vmap")


def strict_json(path):
    """``json.load`` that refuses NaN and Infinity, as any strict JSON parser does."""
    def refuse(token):
        raise ValueError(f"{path.name} holds {token}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def sharp(learner, scale=10.0):
    """A hand-built divergent parameter set: the output layer scaled up, so that plain inner SGD at
    α=0.01 overshoots (the support loss's curvature grows with the square of the scale)."""
    with torch.no_grad():
        last = [m for m in learner.model.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.mul_(scale)
        for m in learner.model.modules():
            if isinstance(m, torch.nn.Linear) and m is not last:
                m.weight.mul_(3.0)
    return learner


def sinusoid_learner(dtype=torch.float64, lr=0.01):
    torch.manual_seed(0)
    return mamlkit.MAML(mamlkit.models.mlp(1, (40, 40), 1).to(dtype), inner_lr=lr, loss_fn="mse", strategy="vmap")


def test_preset_follows_the_papers_protocol():
    cfg = preset_config("sinusoid")
    # one model meta-trained with K=10, 1 step at α=0.001 (the authors' code); evaluated on 600 tasks of K
    # support and K query points for K = 5, 10, 20 with 10 steps at the same α
    assert (cfg.k_shot, cfg.inner_steps, cfg.inner_lr, cfg.meta_batch, cfg.iterations) == (10, 1, 0.001, 25, 70_000)
    assert (cfg.eval_tasks, cfg.eval_query, cfg.eval_shots, max(cfg.eval_steps)) == (600, 0, (5, 10, 20), 10)
    from mamlkit.presets import PRESETS

    assert "meta-trained with K=10" in PRESETS["sinusoid"].summary
    assert "600 tasks, K query points" in PRESETS["sinusoid"].summary
    assert cfg.compare_pretrained and cfg.baseline_lrs == (0.001, 0.003, 0.01, 0.03, 0.1)  # "a tuned step size"


def test_descent_path_is_plain_sgd_where_plain_sgd_descends():
    learner = sinusoid_learner()
    tasks = fixed_tasks(Sinusoid(k_support=5, k_query=5), 3, 40)
    plain, safe = evaluate(learner, tasks, 10, dtype=torch.float64), evaluate(learner, tasks, 10,
                                                                             dtype=torch.float64, guard=True)
    assert int(safe.halved.sum()) == 0
    assert (plain.losses - safe.losses).abs().max().item() < 1e-12


def test_divergence_is_impossible_and_the_flag_covers_every_cell():
    learner = sharp(sinusoid_learner())
    tasks = fixed_tasks(Sinusoid(k_support=5, k_query=5), 3, 40)
    plain = evaluate(learner, tasks, 10, dtype=torch.float64)
    # plain SGD on the divergent parameters blows up, and every cell after it is flagged, not just the last
    assert not torch.isfinite(plain.losses[:, -1]).all()
    assert plain.cell(0)["flag"] is None
    for s in range(1, 11):
        cell = plain.cell(s)
        assert cell["flag"] is not None, s  # from the first step on, while the mean is still finite
        assert (cell["mean"] is None) == cell["flag"].startswith("not finite on "), cell
    # the safeguarded evaluation never lets a task's support loss grow: every cell finite
    safe = evaluate(learner, tasks, 10, dtype=torch.float64, guard=True)
    assert torch.isfinite(safe.losses).all() and int(safe.halved.sum()) > 0
    from mamlkit.engine.inner import support_loss_fn

    sx, sy = tasks.support_x.double(), tasks.support_y.double()
    path = [{k: torch.stack([learner.adapt(sx[t], sy[t], steps, guard=True)[k] for t in range(len(sx))])
             for k in learner.model.state_dict()} for steps in range(11)]
    support = torch.func.vmap(support_loss_fn(learner.model, learner.loss_fn, {}, learner.buffers()))
    curve = torch.stack([support(p, sx, sy) for p in path], 1)
    assert (curve[:, 1:] <= curve[:, :-1] * (1 + 1e-3) + 1e-12).all()


def test_a_cell_whose_ci_exceeds_its_mean_is_flagged():
    losses = torch.full((20, 2), 0.1)
    losses[:, 0] = 200.0
    losses[0, 1] = 1000.0  # one outlier task: finite, under 10× its pre-update loss, but it sets the mean
    r = EvalResult(losses, torch.zeros_like(losses))
    assert r.cell(0)["flag"] is None
    cell = r.cell(1)
    assert cell["mean"] == pytest.approx(50.095) and cell["ci95"] > cell["mean"]
    assert cell["flag"] == "95% CI wider than the mean: outlier tasks" and "⚠" in r.loss_text(1)
    assert cell["median"] == pytest.approx(0.1)


def test_small_sinusoid_run_writes_a_finite_table_strict_json_and_labelled_figures(tmp_path):
    cfg = preset_config("sinusoid", {**FAST, "out_dir": str(tmp_path), "eval_shots": (5, 10), "test_guard": True})
    trainer = train.fit(train.new_trainer(cfg, tmp_path / "run"))
    learners = {"maml": trainer.learner, "pretrain": sharp(train.new_trainer(cfg.replace(algo="pretrain"),
                                                                               tmp_path / "p").learner)}
    text = reports.report(trainer.run_dir, learners, cfg)
    record = strict_json(trainer.run_dir / "eval.json")
    assert record["meta_train_k"] == 10 and record["query_points"] == "K" and record["num_tasks"] == 30
    cells = [c for by_k in record["mse"].values() for by_s in by_k.values() for c in by_s.values()]
    assert len(cells) == 2 * 2 * 4
    for c in cells:
        assert all(isinstance(c[key], float) for key in ("mean", "ci95", "median")), c
    assert "nan" not in text.lower() and "inf" not in text.lower() and "diverged" not in text
    assert "meta-trained with K=10" in text
    assert record["halved_tasks"]["pretrain"]["5"] > 0  # the divergent parameters needed the safeguard
    for name in ("figure2_fits.png", "figure3_learning_curve.png"):
        assert (trainer.run_dir / name).stat().st_size > 10_000


def test_eval_json_writes_null_with_a_reason_for_a_non_finite_cell():
    r = EvalResult(torch.tensor([[1.0, float("inf")], [1.0, 2.0]]), torch.zeros(2, 2))
    text = json.dumps({"cell": r.cell(1)}, allow_nan=False)
    assert json.loads(text)["cell"] == {"mean": None, "ci95": None, "median": 2.0,
                                        "flag": "not finite on 1/2 tasks"}


def test_trainer_chooses_one_intra_op_thread_and_a_task_worker_per_core(tmp_path):
    assert threads.choose(0, "cpu") == threads.ThreadPlan(intra_op=1, task_workers=threads.cores())
    assert threads.choose(3, "cpu") == threads.ThreadPlan(intra_op=3, task_workers=3)
    with pytest.raises(ValueError, match="threads must be >= 0"):
        threads.choose(-1)
    torch.set_num_threads(2)
    cfg = preset_config("sinusoid", {**FAST, "iterations": 2, "val_tasks": 0, "out_dir": str(tmp_path)})
    train.fit(train.new_trainer(cfg, tmp_path / "run"))
    assert torch.get_num_threads() == 1 and threads.task_workers() == threads.cores()
    strategy = mamlkit.exec.strategies.Strategy(False, workers=-1)
    assert strategy.num_workers() == threads.cores()
    train.fit(train.new_trainer(cfg.replace(threads=2, run_name="two"), tmp_path / "two"))
    assert torch.get_num_threads() == 2 and strategy.num_workers() == 2


def _results_section() -> str:
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    start = text.index("## Sinusoid: accuracy (the main job")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_readme_main_job_numbers_are_the_newest_results_entry():
    readme = (ROOT / "README.md").read_text()
    quick = readme[readme.index("## Quickstart"):]
    quick = quick[:quick.index("\n## ", 1)]
    rows = [line for line in quick.splitlines() if re.match(r"\| (5|10|20) \| \d+ \|", line)]
    assert len(rows) >= 3, "the Quickstart shows the main job's table"
    section = _results_section()
    readme_table = section[section.index("README's table"):]
    for row in rows:
        assert row in readme_table, f"README row not in RESULTS.md's README table: {row}"
    time = re.search(r"takes about \*\*([^*]+)\*\*", quick)
    assert time and time.group(1) in section, "the README's wall time is the one RESULTS.md records"
    prose = "".join(quick.split("```")[::2])  # outside the code blocks
    assert len(re.findall(r"\d+ min", prose)) == 1, "one time for the main job, not several"
