"""What a run writes into its folder: one registry of names, a manifest per run, `--overwrite` removing exactly
the previous run's files, a closing line naming only this run's, and the folder's lock taken once per run."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import write_csv

from mamlkit import runfolder

SINUSOID = ["--iterations", "2", "--log-every", "1", "--val-every", "2", "--val-tasks", "2", "--eval-tasks", "4",
            "--eval-query", "5", "--eval-steps", "0", "1", "--eval-shots", "5", "--hidden-sizes", "8",
            "--meta-batch", "2", "--baseline-lrs", "0.01", "--no-progress", "--threads", "1", "--strategy", "loop"]


def csv_tasks(path: Path) -> Path:
    """Twenty linear tasks, y = (t/10)·x + t, of sixteen rows each."""
    rows = [[f"t{t}", x / 8 - 1, t / 10 * (x / 8 - 1) + t] for t in range(20) for x in range(16)]
    return write_csv(path, ["site", "x", "y"], rows)


def test_a_run_takes_its_folders_lock_once(cli, tmp_path, monkeypatch):
    taken, real = [], runfolder.lock

    def lock(run_dir):
        taken.append(Path(run_dir).resolve())
        return real(run_dir)

    monkeypatch.setattr(runfolder, "lock", lock)
    code, _, err = cli("train", "sinusoid", "--out-dir", tmp_path, "--run-name", "r", "--no-tensorboard", *SINUSOID)
    assert code == 0, err
    run = (tmp_path / "r").resolve()
    # training, the baseline and the report under one lock; the baseline's own folder locked by its fit
    assert taken == [run, run / "pretrained"]


def test_overwrite_removes_exactly_the_previous_runs_files_and_names_only_its_own(cli, tmp_path):
    runs = tmp_path / "runs"
    code, out, err = cli("train", "sinusoid", "--out-dir", runs, "--run-name", "r", "--tensorboard", *SINUSOID)
    assert code == 0, err
    run = runs / "r"
    before = ["figure2_fits.png", "figure3_learning_curve.png", "pretrained"]
    assert all((run / n).exists() for n in before) and "figure2_fits.png" in out
    (run / "notes.txt").write_text("mine")  # a user's file beside the run's
    code, out, err = cli("train", "csv", "--path", csv_tasks(tmp_path / "d.csv"), "--task-column", "site", "--target",
                         "y", "--out-dir", runs, "--run-name", "r", "--overwrite", "--iterations", "2", "--threads",
                         "1", "--no-progress", "--no-tensorboard", "--eval-tasks", "4", "--val-tasks", "2",
                         "--no-compare-pretrained")
    assert code == 0, err
    assert [n for n in [*before, "tensorboard"] if (run / n).exists()] == []
    assert out.splitlines()[-1] == (f"run folder: {run} (checkpoint.safetensors, config.json, metrics.jsonl, "
                                    "metrics.csv, eval.md, eval.json)")
    assert (run / "notes.txt").read_text() == "mine"
    assert runfolder.written(run) == ["checkpoint.safetensors", "config.json", "metrics.jsonl", "metrics.csv",
                                      "eval.md", "eval.json"]


def test_a_folder_written_before_manifests_loses_only_the_registered_names(tmp_path):
    for name in ("checkpoint.safetensors", "config.json", "eval.md", "figure2_fits.png", "notes.txt", "fig.png"):
        (tmp_path / name).write_text("x")
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events").write_text("x")
    assert runfolder.written(tmp_path) == ["checkpoint.safetensors", "config.json", "tensorboard/", "eval.md",
                                           "figure2_fits.png"]
    runfolder.clear(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "notes.txt"]


def test_a_manifest_names_nothing_outside_its_run(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "keep.txt"
    run.mkdir()
    outside.write_text("x")
    (run / ".lock").write_text("")
    (run / "eval.md").write_text("x")
    (run / "notes.txt").write_text("x")
    (run / runfolder.MANIFEST).write_text(json.dumps(["../keep.txt", str(outside), ".lock", "", 7, "eval.md"]))
    runfolder.clear(run)
    assert outside.exists() and sorted(p.name for p in run.iterdir()) == [".lock", "notes.txt"]


def test_the_manifest_records_before_writing_and_keeps_every_name_once(tmp_path):
    runfolder.record(tmp_path, ["config.json", "metrics.jsonl"])
    runfolder.record(tmp_path, ["metrics.jsonl", "eval.md"])
    assert json.loads((tmp_path / runfolder.MANIFEST).read_text()) == ["config.json", "metrics.jsonl", "eval.md"]
    assert runfolder.written(tmp_path) == []  # recorded, none written yet
    (tmp_path / "eval.md").write_text("x")
    (tmp_path / "config.json").write_text("x")
    (tmp_path / "checkpoint.safetensors").write_text("x")  # not this run's: its manifest does not name it
    assert runfolder.written(tmp_path) == ["config.json", "eval.md"]
