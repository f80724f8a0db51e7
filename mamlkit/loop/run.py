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
        table = _report_of_run(trainer.run_dir, learners, cfg, iterations)
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


def after_stop(started: list[Path]) -> str:
    """What a stopped `mamlkit train` leaves: a run to resume, or, stopped before the run's first checkpoint
    (preparing data, timing strategies), none, and then no resume command, which could only fail."""
    if not started:
        return " before training began"
    run_dir = started[0]
    if (run_dir / "checkpoint.safetensors").exists():
        try:
            model = json.loads((run_dir / "config.json").read_text()).get("model", "")
        except (OSError, ValueError, AttributeError):
            model = ""
        return f"; resume with `{train.resume_command_for(run_dir, model)}`"
    return (f" before the run's first checkpoint: nothing was trained, so {run_dir} holds no run to resume. Run the "
            "same command again to start it; the folder can be used as it is")


def _report_of_run(run_dir: Path, learners: dict, cfg: config.TrainConfig, iterations: dict[str, int]) -> str:
    """The trained run's report (``iterations``: each learner's), its files recorded in the run's manifest
    before they are written; a full disk while writing it says that training is done and kept."""
    try:
        runfolder.record(run_dir, reports.REPORT_FILES)
        return reports.report(run_dir, learners, cfg, iterations)
    except Exception as e:
        if not runfolder.no_space(e):
            raise
        raise DiskFull(f"{runfolder.disk_full_message(e)}. Training finished and its checkpoint in {run_dir} "
                       f"is intact: free some space, then `mamlkit eval {run_dir} --overwrite` writes the report"
                       ) from None


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
                  note: Callable[[str], None]) -> bool:
    """Whether a resumed run has nothing left to do (:func:`_finished`), saying so; ``asked``: the iterations
    the command asked for, which a run already past them does not go back to (said too)."""
    run, step, cfg = trainer.run_dir, trainer.step, trainer.cfg
    below = f"--iterations {asked} is below the {step} it has trained, and " if asked < step else ""
    if not _finished(trainer, stored):
        if below and is_main_rank():
            note(f"mamlkit: {below}it trains no further; finishing what it has not done")
        return False
    if is_main_rank():  # under torchrun every rank finds the same
        say(f"mamlkit: {below}{run} is finished: {step} iterations trained"
            f"{' (its baseline too)' if cfg.compare_pretrained and cfg.algo != 'pretrain' else ''}, report in "
            f"{run / 'eval.md'}: nothing to do. Pass --iterations above {step} to train further, or run "
            f"`mamlkit eval {run} --overwrite` to evaluate it again.")
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
