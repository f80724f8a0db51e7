"""The recipe of a run: what `mamlkit train` and `mamlkit eval` ask for, from start to finish.

:func:`train_run` takes the run folder's lock once, for everything the run does: it clears the previous run
(``--overwrite``: exactly the files that run's manifest names, :func:`mamlkit.runfolder.clear`), trains, trains
and tunes the pretrained baseline, and writes the report. The trainer's steps inside it never ask for the lock
again (:func:`mamlkit.runfolder.holds`). The command line only parses what it is given, asks for a run, and
prints what comes back: messages on the way go through ``say`` (stdout) and ``note`` (stderr).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mamlkit import checkpoint, config, runfolder
from mamlkit.base.errors import DiskFull, UserError
from mamlkit.eval import reports
from mamlkit.flags import resumed_config
from mamlkit.loop import train
from mamlkit.models import approve_model_code, import_from_here, named_factory
from mamlkit.presets import preset_config

# Fields that may change when a run is resumed; everything else defines the run.
RESUMABLE = {"iterations", "log_every", "val_every", "checkpoint_every", "progress", "tensorboard", "threads",
             "tune_malloc", "eval_tasks", "eval_steps", "eval_shots", "eval_query", "compare_pretrained",
             "baseline_lrs", "test_guard",
             "backend", "dist_timeout", "data_root", "trust_checksum"}  # data: verified by checksum

# The settings a run's report depends on: a finished run resumed with others is reported again.
REPORTED = ("eval_tasks", "eval_steps", "eval_shots", "eval_query", "compare_pretrained", "baseline_lrs", "test_guard")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass(frozen=True)
class Request:
    """What `mamlkit train` was asked: a ``preset`` (a fresh run) or a run folder to ``resume``; the fields set
    as flags (``given``) and in a ``--config`` file (``file_values``, read from ``config_file``)."""

    preset: str | None = None
    resume: str | None = None
    given: dict[str, Any] = field(default_factory=dict)
    file_values: dict[str, Any] = field(default_factory=dict)
    config_file: str | None = None
    overwrite: bool = False
    trust_model_code: bool = False


@dataclass(frozen=True)
class Outcome:
    """What a run leaves to print: its folder, the report's table (None where nothing is to be printed: a
    finished run with nothing left to do, or a rank other than 0) and the files the run wrote there."""

    run_dir: Path
    report: str | None = None
    written: tuple[str, ...] = ()


def is_main_rank() -> bool:
    """Under torchrun, rank 0 alone owns the run folder (locks, clears, reports); elsewhere always."""
    return int(os.environ.get("RANK", "0")) == 0


def _lock(run_dir: Path) -> contextlib.AbstractContextManager:
    return runfolder.lock(run_dir) if is_main_rank() else contextlib.nullcontext()


def train_run(request: Request, started: list[Path], say: Callable[[str], None] = print,
              note: Callable[[str], None] = _stderr) -> Outcome:
    """Run what ``request`` asks, holding the run folder's lock once for all of it: clear (``--overwrite``), fit,
    the baseline and its step size, the report. ``started`` receives the run folder as soon as it is known (a
    stop signal's message names it). Raises :class:`UserError` for what cannot be run."""
    approval = {"model": None, "trust_model_code": request.trust_model_code}
    if request.resume:
        trainer, stored, asked = _resumed(request, approval)
        started.append(trainer.run_dir)
    else:
        cfg, run_dir = _fresh(request, approval)
        started.append(run_dir)
    with _lock(started[0]), contextlib.ExitStack() as planned:
        if not request.resume:
            if request.overwrite and is_main_rank():
                runfolder.clear(run_dir)
            trainer = train.new_trainer(cfg, run_dir)
        elif _nothing_left(trainer, stored, asked, say, note):
            return Outcome(trainer.run_dir)
        # the run's thread plan (--threads) for training, baseline and report; the caller's settings after
        planned.enter_context(trainer.learner.executor.planned(trainer.cfg.threads))
        _check_before_training(trainer)
        train.fit(trainer)
        cfg = trainer.cfg
        learners, iterations = {trainer.learner.name: trainer.learner}, {trainer.learner.name: trainer.step}
        if cfg.compare_pretrained and cfg.algo != "pretrain":
            baseline = _baseline(trainer, approval, say)
            learners["pretrain"], iterations["pretrain"] = baseline.learner, baseline.step
        if not is_main_rank():
            return Outcome(trainer.run_dir)  # under torchrun every rank trains; rank 0 alone evaluates and reports
        table = _report_of_run(trainer.run_dir, lambda: reports.report(trainer.run_dir, learners, cfg, iterations),
                               reports.REPORT_FILES, f"mamlkit eval {trainer.run_dir} --overwrite")
    return Outcome(trainer.run_dir, table, tuple(runfolder.written(trainer.run_dir)))


def _resumed(request: Request, approval: dict) -> tuple[train.Trainer, config.TrainConfig, int]:
    """The trainer of the run ``request`` resumes, its config as the command changes it; the checkpoint's config;
    the iterations the command asked for."""
    given = dict(request.given)
    # --model on a resume names the run's own factory again: consent to import it, not a change.
    named = given.pop("model", None)
    import_from_here(named)
    _check_resumable(Path(request.resume))
    trainer = train.load_trainer(request.resume, model=named, trust_model_code=request.trust_model_code)
    approval["model"] = named
    overrides = {**request.file_values, **given}  # --config with --resume may hold only what may change
    check_used(trainer.cfg, set(overrides))
    stored, trainer.cfg = trainer.cfg, resumed_config(trainer.cfg, overrides, RESUMABLE)
    asked = trainer.cfg.iterations  # a run past it trains no further: its config keeps what it trained
    trainer.cfg = trainer.cfg.replace(iterations=max(asked, trainer.step))
    return trainer, stored, asked


def _fresh(request: Request, approval: dict) -> tuple[config.TrainConfig, Path]:
    """The config and run folder of the fresh run ``request`` asks for, its model code approved."""
    file_values, given = request.file_values, request.given
    if "model" in file_values and "model" not in given:  # a file names the code: the user approves it here
        approve_model_code([file_values["model"]], f"--config {request.config_file}",
                           trust_model_code=request.trust_model_code)
    cfg = preset_config(request.preset, {**file_values, **given})
    approval["model"] = named_factory(cfg.model)  # named on this command (or allowed just above)
    import_from_here(approval["model"])
    check_used(cfg, set(file_values) | set(given))
    return cfg, train.run_dir_for(cfg, overwrite=request.overwrite or not is_main_rank())


def after_stop(started: list[Path], resume: Callable[[Path], str] | None = None) -> str:
    """What a stopped `mamlkit train` (or, with its ``resume`` command, `mamlkit rl train`) leaves: a run to
    resume, or, stopped before the run's first checkpoint (preparing data, timing strategies), none, and then no
    resume command, which could only fail."""
    if not started:
        return " before training began"
    run_dir = started[0]
    if (run_dir / "checkpoint.safetensors").exists():
        return f"; resume with `{(resume or _resume_command)(run_dir)}`"
    return (f" before the run's first checkpoint: nothing was trained, so {run_dir} holds no run to resume. Run the "
            "same command again to start it; the folder can be used as it is")


def _resume_command(run_dir: Path) -> str:
    """The command that resumes the supervised run in ``run_dir`` (naming its model's factory, if any)."""
    try:
        model = json.loads((run_dir / "config.json").read_text()).get("model", "")
    except (OSError, ValueError, AttributeError):
        model = ""
    return train.resume_command_for(run_dir, model)


def _report_of_run(run_dir: Path, write: Callable[[], str], files: tuple[str, ...], again: str) -> str:
    """The trained run's report, written by ``write`` (which returns its table), its ``files`` recorded in the
    run's manifest before they are written (the report module's own as well, registered with
    :func:`mamlkit.runfolder.register_run_files`); a full disk while writing it says that training is done and
    kept, and that ``again`` writes the report."""
    try:
        runfolder.record(run_dir, files)
        return write()
    except Exception as e:
        if not runfolder.no_space(e):
            raise
        raise DiskFull(f"{runfolder.disk_full_message(e)}. Training finished and its checkpoint in {run_dir} "
                       f"is intact: free some space, then `{again}` writes the report") from None


def _check_resumable(path: Path) -> None:
    """A folder without a checkpoint holds no run (its run stopped before the first checkpoint): say that,
    and how to start it, rather than "checkpoint not found"."""
    if path.is_dir() and not (path / "checkpoint.safetensors").exists():
        raise UserError(f"{path} holds no checkpoint: its run stopped before the first one, so nothing was trained "
                        "to resume. Start the run again with the command that began it; the folder can be used as "
                        "it is")


def _finished(trainer: train.Trainer, stored: config.TrainConfig) -> bool:
    """Whether a resumed run has nothing left to do: trained to its iterations, its baseline (if it has one)
    too, and its report written for exactly these (eval.json's ``iterations``) with the same report settings
    as ``stored`` (the checkpoint's)."""
    cfg, run = trainer.cfg, trainer.run_dir
    if trainer.step < cfg.iterations or any(getattr(cfg, f) != getattr(stored, f) for f in REPORTED):
        return False
    done = {trainer.learner.name: trainer.step}
    try:
        if cfg.compare_pretrained and cfg.algo != "pretrain":
            done["pretrain"] = checkpoint.load(run / "pretrained")[1].get("step")
        reported = json.loads((run / "eval.json").read_text(encoding="utf-8")).get("iterations")
    except (OSError, ValueError, AttributeError, UserError):  # whatever is missing or unreadable is redone
        return False
    baseline_done = all(isinstance(s, int) and s >= cfg.iterations for s in done.values())
    return reported == done and baseline_done and (run / "eval.md").exists()


def _nothing_left(trainer: train.Trainer, stored: config.TrainConfig, asked: int, say: Callable[[str], None],
                  note: Callable[[str], None], finished: bool | None = None, baseline: bool | None = None,
                  evaluate: str = "mamlkit eval") -> bool:
    """Whether a resumed run has nothing left to do (``finished``, by default :func:`_finished`), saying so;
    ``asked``: the iterations the command asked for, which a run already past them does not go back to (said
    too). ``baseline``: whether the run trains a baseline (default: a supervised run's ``compare_pretrained``);
    ``evaluate``: the command that evaluates the run again (a meta-RL run's is `mamlkit rl eval`)."""
    run, step, cfg = trainer.run_dir, trainer.step, trainer.cfg
    below = f"--iterations {asked} is below the {step} it has trained, and " if asked < step else ""
    if not (_finished(trainer, stored) if finished is None else finished):
        if below and is_main_rank():
            note(f"mamlkit: {below}it trains no further; finishing what it has not done")
        return False
    if baseline is None:
        baseline = cfg.compare_pretrained and cfg.algo != "pretrain"
    if is_main_rank():  # under torchrun every rank finds the same
        say(f"mamlkit: {below}{run} is finished: {step} iterations trained"
            f"{' (its baseline too)' if baseline else ''}, report in "
            f"{run / 'eval.md'}: nothing to do. Pass --iterations above {step} to train further, or run "
            f"`{evaluate} {run} --overwrite` to evaluate it again.")
    return True


def _check_before_training(trainer: train.Trainer) -> None:
    """Run now what would otherwise fail only after training: the splits in the order the run uses them
    (training; validation, which also tunes the baseline's step size) and everything the report needs
    (:func:`mamlkit.eval.reports.check`). The families keep what they load, so this costs one task each."""
    cfg = trainer.cfg
    train.check_split(cfg, "train")
    if cfg.val_tasks or (cfg.compare_pretrained and cfg.algo != "pretrain" and cfg.baseline_lrs):
        train.check_split(cfg, "val")
    if is_main_rank():  # rank 0 alone reports
        reports.check(cfg, trainer.learner.kind)


def check_used(cfg: config.TrainConfig, given: set[str]) -> None:
    """Refuse the fields the user set that ``cfg``'s task family or algorithm does not read (each owns its
    options: :mod:`mamlkit.base.options`), naming their flags; on a resume too, before "cannot change"."""
    config.check_owned(cfg, given)
    if "baseline_lrs" in given and not (cfg.compare_pretrained and cfg.algo != "pretrain"):
        raise UserError("--baseline-lrs tunes the pretrained baseline's step size; this run trains no baseline "
                        "(--no-compare-pretrained or --algo pretrain): drop the flag")


def _baseline(trainer: train.Trainer, approval: dict, say: Callable[[str], None]) -> train.Trainer:
    """Train (or resume, or load) the paper's pretrained baseline in ``RUN/pretrained``; ``approval``: the
    model code the user allowed on this command (the baseline's checkpoint names the run's model)."""
    folder = trainer.run_dir / "pretrained"
    if (folder / "checkpoint.safetensors").exists():
        baseline = train.load_trainer(folder, **approval)
        # the run's settings that may change on a resume, its budget above all: the baseline trains as long as
        # the run (`iterations` of both), and a baseline that trains further has its step size tuned again
        keys = trainer.cfg.to_dict()  # the settings its family reads (the baseline's family is the run's)
        shared = {f: keys[f] for f in RESUMABLE - {"compare_pretrained", "baseline_lrs"} if f in keys}
        shared["iterations"] = max(shared["iterations"], baseline.step)
        if baseline.step < shared["iterations"]:
            shared["baseline_lrs"] = trainer.cfg.baseline_lrs
        baseline.cfg = baseline.cfg.replace(**shared)
    else:
        # the run's execution settings; the options only the run's algorithm reads (checkpoint_inner) are dropped
        cfg = trainer.cfg.replace(algo="pretrain", compare_pretrained=False, run_name="pretrained")
        baseline = train.new_trainer(cfg, folder)
    if is_main_rank():  # the baseline's own folder is the run's: --overwrite removes it with the rest
        runfolder.record(trainer.run_dir, ["pretrained/"])
    baseline.resume_dir = trainer.run_dir  # a stop in it resumes the run, which then reports too
    baseline, losses = train.tune_inner_lr(train.fit(baseline), baseline.cfg.baseline_lrs)
    if losses:
        tried = ", ".join(f"{r:g}: {v:.4f}" for r, v in losses.items())
        say(f"pretrained baseline: fine-tuning step size {baseline.cfg.inner_lr:g}, the lowest validation query "
            f"loss after {baseline.cfg.eval_inner_steps} steps on {baseline.cfg.val_tasks} tasks ({tried})")
    return baseline


def eval_run(path: str | Path, *, baseline: str | None = None, eval_tasks: int | None = None,
             test_guard: bool | None = None, out: str | None = None, overwrite: bool = False, model: str | None = None,
             trust_model_code: bool = False, threads: int | None = None,
             say: Callable[[str], None] = print) -> tuple[Path, tuple[str, ...]]:
    """Evaluate the run or checkpoint ``path`` (and its baseline: ``baseline``, else ``RUN/pretrained`` if
    present) on fixed test tasks; ``say`` receives the report's table. The report goes to ``out`` (default: the
    run's folder), which must not hold a report unless ``overwrite``. Returns the folder and the report files
    written there."""
    approval = {"model": model, "trust_model_code": trust_model_code}
    import_from_here(model)
    main = train.load_trainer(path, resume=False, **approval)  # no optimiser, step or RNG state needed
    with main.learner.executor.planned(threads):  # the trainer's thread plan; the caller's settings after
        folder = runfolder.report_folder(Path(out) if out else main.run_dir, reports.REPORT_FILES, overwrite)
        cfg = main.cfg if eval_tasks is None else main.cfg.replace(eval_tasks=eval_tasks)
        cfg = cfg if test_guard is None else cfg.replace(test_guard=test_guard)
        learners, steps = {main.learner.name: main.learner}, {main.learner.name: main.step}
        other = Path(baseline) if baseline else main.run_dir / "pretrained"
        if baseline or (other / "checkpoint.safetensors").exists():
            loaded = train.load_trainer(other, resume=False, **approval)
            learners["pretrain"], steps["pretrain"] = loaded.learner, loaded.step
        if folder == main.run_dir and (folder / runfolder.MANIFEST).exists():  # a run's own report: its files
            runfolder.record(folder, reports.REPORT_FILES)
        # the iterations each trained, where known (a shipped model records none)
        say(reports.report(folder, learners, cfg, {name: step for name, step in steps.items() if step}))
    return folder, tuple(n for n in reports.REPORT_FILES if (folder / n).exists())


# ---------------------------------------------------------------- meta-RL runs (`mamlkit rl train`, `rl eval`)

# Fields of an RL run that may change when it is resumed; everything else defines the run.
RL_RESUMABLE = {"iterations", "log_every", "checkpoint_every", "progress", "threads", "eval_tasks", "eval_traj",
                "eval_lrs", "baselines", "pretrain_iterations", "val_every", "fast_fisher", "dist_timeout"}
# The settings an RL run's report depends on: a finished run resumed with others is reported again.
RL_REPORTED = ("eval_tasks", "eval_traj", "eval_lrs", "baselines", "pretrain_iterations")
MAX_EVAL_STEPS = 10  # `rl eval --steps` and `--eval-lrs`: test steps reported


@dataclass(frozen=True)
class RLRequest:
    """What `mamlkit rl train` was asked: an environment ``env`` (a fresh run) or a run folder to ``resume``;
    the fields set as flags (``given``) and in a ``--config`` file (``file_values``)."""

    env: str | None = None
    resume: str | None = None
    given: dict[str, Any] = field(default_factory=dict)
    file_values: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False


def rl_train_run(request: RLRequest, started: list[Path], say: Callable[[str], None] = print) -> Outcome:
    """Run what ``request`` asks, holding the run folder's lock once for all of it: clear (``--overwrite``), fit,
    the pretrained baseline, the report (of the best validated policy). ``started`` receives the run folder as
    soon as it is known. Raises :class:`UserError` for what cannot be run."""
    from mamlkit.rl import evaluate
    from mamlkit.rl import train as rltrain

    if request.resume:
        trainer, stored, asked = _rl_resumed(request)
        run_dir = trainer.run_dir
    else:
        cfg = _rl_fresh_config(request)
        run_dir = rltrain.run_dir_for(cfg, overwrite=request.overwrite or not is_main_rank())
        # built before the folder exists: an environment the installed packages lack leaves no folder behind
        trainer = rltrain.new_trainer(cfg, run_dir)
    started.append(run_dir)
    with _lock(run_dir):
        if request.overwrite and is_main_rank():
            runfolder.clear(run_dir)
        if request.resume and _nothing_left(trainer, stored, asked, say, _stderr, _rl_finished(trainer, stored),
                                            _rl_trains_baseline(trainer.cfg), "mamlkit rl eval"):
            return Outcome(run_dir)
        rltrain.fit(trainer)
        if not _rl_report_on_this_rank(trainer):
            return Outcome(run_dir)
        chosen, what = rltrain.best_or_last(trainer)
        say("")
        say(what)
        table = _report_of_run(run_dir, lambda: _rl_report(chosen, trainer.cfg.baselines, train_baseline=True),
                               (*evaluate.REPORT_FILES, "pretrained/"), f"mamlkit rl eval {run_dir} --overwrite")
    return Outcome(run_dir, table, tuple(runfolder.written(run_dir)))


def _rl_resumed(request: RLRequest):
    """The trainer of the RL run ``request`` resumes, its config as the command changes it; the checkpoint's
    config; the iterations the command asked for (a run past them trains no further: its config keeps what it
    trained)."""
    from mamlkit.rl import train as rltrain

    if request.env:
        raise UserError("pass either an environment or --resume RUN, not both")
    if request.overwrite:
        raise UserError("--overwrite starts a fresh run; it cannot be combined with --resume")
    _check_resumable(Path(request.resume))
    trainer = rltrain.load_trainer(request.resume)
    stored = trainer.cfg
    trainer.cfg = resumed_config(stored, {**request.file_values, **request.given}, RL_RESUMABLE)
    asked = trainer.cfg.iterations
    trainer.cfg = trainer.cfg.replace(iterations=max(asked, trainer.step))
    return trainer, stored, asked


def _rl_trains_baseline(cfg) -> bool:
    """Whether an RL run's report trains the pretrained baseline (:func:`_rl_report`; a Meta-World run's
    report has none: its family's own evaluation reports the published figures instead)."""
    return (cfg.baselines and cfg.algo != "pretrain" and cfg.pretrain_iterations > 0
            and cfg.family.report is None)


def _rl_finished(trainer, stored) -> bool:
    """Whether a resumed RL run has nothing left to do (as :func:`_finished` for a supervised one): trained to
    its iterations, its pretrained baseline (if its report trains one) too, and its report written after them
    with the same report settings as ``stored`` (the checkpoint's). RL's eval.json records no iterations: the
    report is the finished run's when its files are newer than the checkpoints it evaluated."""
    cfg, run = trainer.cfg, trainer.run_dir
    if trainer.step < cfg.iterations or any(getattr(cfg, f) != getattr(stored, f) for f in RL_REPORTED):
        return False
    evaluated = [run / "checkpoint.safetensors"]
    try:
        if _rl_trains_baseline(cfg):
            step = checkpoint.load(run / "pretrained")[1].get("step")
            if not (isinstance(step, int) and step >= max(1, cfg.pretrain_iterations)):
                return False
            evaluated.append(run / "pretrained" / "checkpoint.safetensors")
        written = min((run / name).stat().st_mtime_ns for name in ("eval.md", "eval.json"))
        return written >= max(path.stat().st_mtime_ns for path in evaluated)
    except (OSError, ValueError, UserError):  # whatever is missing or unreadable is redone
        return False


def _rl_fresh_config(request: RLRequest):
    """The config of the fresh RL run ``request`` asks for."""
    from mamlkit.rl import config as rlconfig
    from mamlkit.rl import families

    if families.find_family(request.env or "") is None:
        names = "|".join(families.examples())
        raise UserError(f"name an environment: `mamlkit rl train {{{names}}}` (or ml1-<task>; got {request.env!r}), "
                        "or pass --resume RUN")
    return rlconfig.from_dict({**request.file_values, **request.given, "env": request.env})


def _rl_report_on_this_rank(trainer) -> bool:
    """Under torchrun: every rank trains the pretrained baseline (a distributed fit of its own), then rank 0
    alone evaluates and reports. True on the rank that reports (the one process without torchrun)."""
    from mamlkit.loop import distributed
    from mamlkit.rl import train as rltrain

    world = distributed.current()
    if world.size == 1:
        return True
    if _rl_trains_baseline(trainer.cfg):
        rltrain.pretrained_baseline(trainer)  # rank 0's report then loads it from RUN/pretrained
    return world.is_main


def _rl_report(trainer, baselines: bool, train_baseline: bool, show: tuple[int, ...] | None = None,
               out: Path | None = None, eval_episodes: int = 3) -> str:
    """Evaluate the run's policy, and with ``baselines`` the pretrained one (trained first when
    ``train_baseline``, else loaded from RUN/pretrained if there) and a randomly initialised one; the
    report goes to ``out`` (default: the run folder). A Meta-World run is evaluated by the package's own
    evaluation instead (``eval_episodes`` scored episodes per goal), without baselines."""
    from mamlkit.rl import evaluate
    from mamlkit.rl import train as rltrain
    from mamlkit.rl.families import hook

    cfg = trainer.cfg  # threads: set by the caller (rl train's fit, or the eval's plan)
    if cfg.family.report is not None:  # a benchmark's own evaluation (Meta-World's); its baselines: the published
        steps = show or tuple(range(1, len(cfg.eval_lrs) + 1))
        return hook(cfg.family.report)(out or trainer.run_dir, trainer.policy, cfg, steps, eval_episodes)
    policies = {cfg.algo: trainer.policy}
    if baselines and cfg.algo != "pretrain":
        folder = trainer.run_dir / "pretrained"
        if (folder / "checkpoint.safetensors").exists() and not train_baseline:
            policies["pretrained"] = rltrain.load_trainer(folder).policy
        elif train_baseline and cfg.pretrain_iterations > 0:
            policies["pretrained"] = rltrain.pretrained_baseline(trainer).policy
        policies["random init"] = rltrain.make_policy(cfg.replace(seed=cfg.seed + 1))
    return evaluate.report(out or trainer.run_dir, policies, cfg, show)


@dataclass(frozen=True)
class RLEval:
    """What `mamlkit rl eval` was asked (None: the run's own setting)."""

    path: str
    eval_tasks: int | None = None
    eval_traj: int | None = None
    eval_lrs: tuple[float, ...] | None = None
    steps: tuple[int, ...] | None = None
    baselines: bool = True
    eval_episodes: int = 3
    out: str | None = None
    overwrite: bool = False
    last: bool = False
    threads: int | None = None


def rl_eval_run(request: RLEval, say: Callable[[str], None] = print) -> tuple[Path, tuple[str, ...]]:
    """Evaluate the meta-RL run or checkpoint ``request.path`` (its best validated policy unless ``last``) on
    fixed test tasks; ``say`` receives what is evaluated and the report's table. Returns the report's folder
    and the files written there."""
    from mamlkit.rl import evaluate
    from mamlkit.rl import train as rltrain

    trainer = rltrain.load_trainer(request.path)
    trainer.cfg = trainer.cfg.replace(**_rl_eval_changes(request, trainer.cfg.eval_lrs))
    # the run's own report (written when training ended) is kept unless the user says otherwise
    out = runfolder.report_folder(Path(request.out) if request.out else trainer.run_dir, evaluate.REPORT_FILES,
                                  request.overwrite)
    what = f"evaluating the policy of iteration {trainer.step} from {request.path}"
    if Path(request.path).is_dir() and not request.last:
        trainer, what = rltrain.best_or_last(trainer)
    say(what)
    with evaluate.planned(request.threads, trainer.cfg):
        say(_rl_report(trainer, trainer.cfg.baselines and request.baselines, train_baseline=False,
                       show=request.steps or None, out=out, eval_episodes=request.eval_episodes))
    return out, tuple(n for n in evaluate.REPORT_FILES if (out / n).exists())


def _rl_eval_changes(request: RLEval, run_lrs: tuple[float, ...]) -> dict[str, Any]:
    """The run's evaluation settings that ``request`` changes, checked."""
    import math

    from mamlkit.base.limits import MAX_TASKS, check_count
    from mamlkit.rl import evaluate

    changes: dict[str, Any] = {k: v for k, v in (("eval_tasks", request.eval_tasks),
                                                 ("eval_traj", request.eval_traj)) if v is not None}
    if request.eval_lrs is not None:
        if not all(math.isfinite(a) and a >= 0 for a in request.eval_lrs) or len(request.eval_lrs) > MAX_EVAL_STEPS:
            raise UserError(f"--eval-lrs takes 1 to {MAX_EVAL_STEPS} finite rates >= 0 (e.g. --eval-lrs 0.1 0.05), "
                            f"got {' '.join(map(str, request.eval_lrs))}")
        changes["eval_lrs"] = tuple(request.eval_lrs)
    if request.steps is not None:
        if not all(1 <= k <= MAX_EVAL_STEPS for k in request.steps):
            raise UserError(f"--steps takes step counts from 1 to {MAX_EVAL_STEPS} (e.g. --steps 1 2 3), "
                            f"got {' '.join(map(str, request.steps))}")
        changes["eval_lrs"] = evaluate.step_rates(changes.get("eval_lrs", run_lrs), max(request.steps))
    check_count("--eval-episodes", request.eval_episodes, MAX_TASKS)
    for name, v in (("--eval-tasks", request.eval_tasks), ("--eval-traj", request.eval_traj),
                    ("--eval-episodes", request.eval_episodes)):
        if v is not None and v < 1:
            raise UserError(f"{name} must be >= 1, got {v}")
    return changes


# ---------------------------------------------------------------- `mamlkit rl adapt`

@dataclass(frozen=True)
class RLAdapt:
    """What `mamlkit rl adapt` was asked: the policy (``checkpoint``: a run folder, a checkpoint file or a
    shipped policy's name) and where to adapt it: ``goal`` (X Y for nav2d, X Y Z for Meta-World, of
    ``task_type`` for ML10) or a Meta-World ``test_task``; ``steps`` steps of ``traj`` episodes each (noise
    from ``seed``), the figure to ``out`` (None: the environment's default name) and, for a MuJoCo environment,
    the rendered episodes to ``video`` (an animated GIF; None: none)."""

    checkpoint: str
    goal: tuple[float, ...] | None = None
    test_task: int | None = None
    task_type: str | None = None
    steps: int = 3
    traj: int = 20
    out: str | None = None
    seed: int = 0
    threads: int | None = None
    video: str | None = None


def rl_adapt_run(request: RLAdapt) -> list[str]:
    """Adapt the policy ``request`` names to its goal or test task and write the figure of its trajectories before
    and after each step; returns the lines to print (the policy, the returns per step count, the figure).
    Raises :class:`UserError` for what cannot be adapted, the options' mistakes before the checkpoint is read."""
    from mamlkit.rl import adapt_inputs, families
    from mamlkit.rl import train as rltrain

    _rl_adapt_figure(request, "adapt.png")  # mistakes of any environment's, before the checkpoint is read
    name = request.checkpoint
    source = adapt_inputs.shipped_policy(name) if name in adapt_inputs.SHIPPED else Path(name)
    try:
        trainer = rltrain.load_trainer(source)
    except UserError:  # the goal's mistake first, as it would be for a readable nav2d checkpoint
        adapt_inputs.check_2d_goal(request.goal)
        raise
    what = f"the policy of iteration {trainer.step} from {source}"
    if source.is_dir():
        trainer, what = rltrain.best_or_last(trainer)
    what = what.replace("evaluating ", "adapting ")
    adapt = _RL_ADAPT.get(trainer.cfg.family.adapt)  # what `rl adapt` gives the policy's environment family
    if adapt is None:
        takers = " and ".join(f.name for f in families.ENV_FAMILIES.values() if f.adapt)
        raise UserError(f"{request.checkpoint} holds a {trainer.cfg.env} policy; `mamlkit rl adapt` takes {takers} "
                        "ones")
    return adapt(request, trainer, what)


def _rl_adapt_figure(request: RLAdapt, default_out: str) -> Path:
    """Check `rl adapt`'s steps, episodes and figure (any environment's); return the figure's path."""
    if not 1 <= request.steps <= 3:
        raise UserError(f"--steps must be 1, 2 or 3 (the paper's test protocol), got {request.steps}")
    if request.traj < 1:
        raise UserError(f"--traj must be >= 1, got {request.traj}")
    out = Path(request.out or default_out)
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise UserError(f"--out {out} must end in .png, .pdf or .svg")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    if request.video is not None:
        video = Path(request.video)
        if video.suffix.lower() != ".gif":
            raise UserError(f"--video {video} must end in .gif (an animated GIF)")
        if not video.parent.is_dir():
            raise UserError(f"--video {video}: folder {video.parent} does not exist")
    return out


def _rl_adapt_nav2d(request: RLAdapt, trainer, what: str) -> list[str]:
    """`rl adapt` of a nav2d policy to the goal X Y."""
    import torch

    from mamlkit.rl import adapt_inputs, evaluate

    if (request.goal is None or len(request.goal) != 2 or request.test_task is not None
            or request.task_type is not None):
        raise UserError("a nav2d policy adapts to --goal X Y (two numbers); --test-task and --task-type are "
                        "Meta-World's")
    if request.video is not None:
        raise UserError("--video renders a MuJoCo scene (a Meta-World policy's); nav2d's episodes are all in the "
                        "figure (--out)")
    adapt_inputs.check_2d_goal(request.goal)
    x, y = request.goal
    out = _rl_adapt_figure(request, "nav2d_adapt.png")
    cfg = trainer.cfg.replace(eval_lrs=evaluate.step_rates(trainer.cfg.eval_lrs, request.steps),
                              eval_traj=request.traj, seed=request.seed)
    goal = torch.tensor([[x, y]], dtype=torch.float64)
    with evaluate.planned(request.threads, cfg):
        curve = evaluate.trajectory_figure(out, {cfg.algo: trainer.policy}, cfg, tasks=goal,
                                           shown_steps=tuple(range(request.steps + 1)))[0][0]
    rates = ", ".join(f"{a:g}" for a in cfg.eval_lrs)
    return [what, f"goal ({x:g}, {y:g}): mean return of {request.traj} episodes after 0..{request.steps} steps "
                  f"(rates {rates}):",
            *(f"  {k} step{'s' * (k != 1)}: {r:.2f}" for k, r in enumerate(curve.tolist())), f"figure: {out}"]


def _rl_adapt_metaworld(request: RLAdapt, trainer, what: str) -> list[str]:
    """`rl adapt` of a Meta-World policy: to the goal X Y Z (of ``task_type`` for ML10) or to a test task."""
    from mamlkit.base.batch import task_generator
    from mamlkit.rl import evaluate, metaworld, metaworld_adapt

    cfg = trainer.cfg
    if (request.goal is None) == (request.test_task is None):
        raise UserError(f"{cfg.env}: pass either --goal X Y Z or --test-task INDEX (a task of the benchmark's "
                        "test split)")
    if request.test_task is not None and request.task_type is not None:
        raise UserError("--task-type names the task type of --goal; --test-task INDEX already names a task")
    out = _rl_adapt_figure(request, f"{cfg.env}_adapt.png")
    if request.goal is not None:
        row = metaworld.given_goal(cfg.env, cfg.seed, list(request.goal), request.task_type)
        task = "the given goal"
    else:
        row = metaworld.test_task_row(cfg.env, cfg.seed, request.test_task)
        task = f"test task {request.test_task}"
    cfg = cfg.replace(eval_lrs=evaluate.step_rates(cfg.eval_lrs, request.steps), eval_traj=request.traj)
    with evaluate.planned(request.threads, cfg), contextlib.ExitStack() as stack:
        renderer = None
        if request.video is not None:  # before adapting: a machine without offscreen OpenGL fails at once
            from mamlkit.rl.render import OffscreenRenderer
            renderer = stack.enter_context(OffscreenRenderer(camera=metaworld_adapt.CAMERA, flip=False))
        result = metaworld_adapt.adapt(trainer.policy, cfg, row, task_generator(request.seed, "adapt", 0), renderer)
        goal = metaworld_adapt.task_goal(cfg.env, row)
        name = metaworld.resolve(cfg.env, row)[0].env_name
        metaworld_adapt.trajectory_figure(out, result["episodes"], goal,
                                          f"{cfg.env} ({name}), {task}: end effector, mean action")
        if renderer is not None:
            frames = metaworld_adapt.rollout_video(Path(request.video), result["episodes"])
    rates = ", ".join(f"{a:g}" for a in cfg.eval_lrs)
    lines = [what, f"{name}, {task}, goal at ({', '.join(f'{v:.3f}' for v in goal)}): after 0..{request.steps} steps "
                   f"(rates {rates}), mean return of {request.traj} sampled episodes; return and success of the mean "
                   "action:"]
    for k, (r, ep) in enumerate(zip(result["sampled"], result["episodes"])):
        lines.append(f"  {k} step{'s' * (k != 1)}: {r:.2f}; mean action {ep['return']:.2f}, "
                     f"{'success' if ep['success'] else 'no success'}")
    video = ([f"video: {request.video} ({frames} frames of {len(result['episodes'])} episodes side by side, "
              f"rendered offscreen through {renderer.backend})"] if request.video is not None else [])
    return [*lines, f"figure: {out}", *video]


# `rl adapt` by what an environment family's `adapt` says it takes (mamlkit.rl.families.EnvFamily.adapt)
_RL_ADAPT = {"goal-2d": _rl_adapt_nav2d, "metaworld": _rl_adapt_metaworld}
