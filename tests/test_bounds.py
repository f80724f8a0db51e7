"""Everything read from a user or a file is bounded before use: patterns, counts, YAML documents, memory,
threads and adapt steps; and a stop signal ends validation. Each command runs under a timeout, so a hang
fails the test instead of stalling the suite."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mamlkit import checkpoint, config
from mamlkit.base import limits
from mamlkit.base.errors import UserError
from mamlkit.base.patterns import PatternError, compile_patterns

ROOT = Path(__file__).resolve().parents[1]
CATASTROPHIC = "(.*.*.*.*.*.*.*.*.*.*)*X"
QUICK = dict(iterations=1, meta_batch=2, strategy="loop", val_tasks=0, eval_tasks=2, compare_pretrained=False,
             progress=False, tensorboard=False)


def run_cli(args: list[str], cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    """``mamlkit ARGS`` in a fresh interpreter; a hang fails the test (it never stalls the suite)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        return subprocess.run([sys.executable, "-m", "mamlkit", *args], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`mamlkit {' '.join(args)}` did not finish within {timeout} s")


def run_python(code: str, cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{code!r} did not finish within {timeout} s")


def sinusoid_checkpoint(folder: Path, **state_config) -> Path:
    """A sinusoid run's checkpoint (built, not trained), its stored config changed by ``state_config``."""
    from mamlkit.loop import train

    cfg = config.TrainConfig(**QUICK, run_name="run", out_dir=str(folder))
    trainer = train.new_trainer(cfg, folder / "run")
    path = folder / "run" / "checkpoint.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    train.save_checkpoint(trainer, path)
    if state_config:
        tensors, state = checkpoint.load(path)
        state["config"] = {**state["config"], **state_config}
        checkpoint.save(path, tensors, state)
    return path


def sinusoid_csvs(folder: Path) -> tuple[Path, Path]:
    support, query = folder / "support.csv", folder / "query.csv"
    support.write_text("x,y\n-2,-0.9\n0,0.1\n1,0.8\n2,0.9\n")
    query.write_text("x\n-1\n3\n")
    return support, query


# --- patterns ---------------------------------------------------------------------------------------


NAMES = ["head.weight", "head.bias", "body.0.0.weight", "encoder.layer.4.attn.w", "encoder.layer.5.x", "a", "",
         "x[1]", "aaa", "net.12.bias", "ab\nc"]
PATTERNS = ["head.*", "*.layer.5.*", r"encoder\.layer\.[45]\..*", "a*", "?", "[ab]*", "[!h]*", "a|b",
            "(a|ab)(c|bcd)?", "a{2,3}", "a+?", "^a$", ".*bias", r"body\.\d+\.\d\.weight", r"[^.]+\.weight", "*bias",
            "[", "[!]", "net.1?.*", r"\w+", r"[\d.]*", "(a*)*", "[a-c]+", r"x\[1\]", "a{,2}", r"(?:head|body)\..*"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_patterns_match_as_glob_or_regex_exactly_as_fnmatch_and_re(pattern):
    passes = compile_patterns([pattern])
    try:
        regex = re.compile(pattern)
    except re.error:
        regex = None
    for name in NAMES:
        want = fnmatch.fnmatchcase(name, pattern) or (regex is not None and regex.fullmatch(name) is not None)
        assert passes(name) == want, (pattern, name)


def test_a_catastrophic_pattern_is_matched_in_linear_time():
    passes = compile_patterns([CATASTROPHIC])
    start = time.perf_counter()
    assert not passes("a" * 1000)  # re.fullmatch would not return in our lifetime
    assert passes("a" * 999 + "X")
    assert time.perf_counter() - start < 10  # a hang guard, not a speed claim


@pytest.mark.parametrize("pattern,feature", [(r"(a)\1", "backreferences"), ("(?=a)a", "lookarounds"),
                                             ("(?i)head", "flags"), ("a{100000}", "limit"),
                                             ("x" * (limits.MAX_PATTERN_LENGTH + 1), "characters")])
def test_patterns_that_need_backtracking_or_are_too_large_are_refused(pattern, feature):
    with pytest.raises(PatternError, match=re.escape(feature)):
        compile_patterns([pattern])
    with pytest.raises(UserError, match=re.escape(feature)):
        config.TrainConfig(adapt=(pattern,))
    with pytest.raises(UserError, match="patterns, more than the limit"):
        compile_patterns(["head.*"] * (limits.MAX_PATTERNS + 1))


def test_a_catastrophic_pattern_in_a_checkpoint_ends_adapt_and_load_with_a_message(tmp_path):
    path = sinusoid_checkpoint(tmp_path, adapt=[CATASTROPHIC])
    support, query = sinusoid_csvs(tmp_path)
    done = run_cli(["adapt", str(path), "--support", str(support), "--query", str(query)], tmp_path)
    assert done.returncode == 2, done.stderr
    assert "matches no parameter" in done.stderr and "Traceback" not in done.stderr
    loaded = run_python(f"import mamlkit\ntry:\n    mamlkit.load({str(path)!r})\nexcept mamlkit.UserError as e:\n"
                        f"    print('refused:', e)", tmp_path)
    assert loaded.returncode == 0 and "refused:" in loaded.stdout and "matches no parameter" in loaded.stdout, \
        loaded.stderr


# --- counts read from files --------------------------------------------------------------------------


def test_every_bounded_field_is_a_config_field_and_every_count_field_is_bounded():
    from mamlkit.rl.config import RLConfig
    from mamlkit.rl.config import field_types as rl_field_types

    fields = set(config.field_types()) | set(rl_field_types())
    assert set(limits.FIELD_BOUNDS) <= fields
    from mamlkit.base.options import option_classes

    # the generic fields and every plug-in's options (mamlkit.base.options)
    counts = {name for cls in (config.TrainConfig, RLConfig, *option_classes())
              for name, t in cls.__annotations__.items() if "int" in str(t) and "bool" not in str(t)}
    unbounded = counts - set(limits.FIELD_BOUNDS)
    # a seed is no count; the others are checked against small ranges (1..6, 1..100, 1 or 3)
    assert unbounded == {"seed", "finetune_layers", "text_per_intent", "channels"}


@pytest.mark.parametrize("field,value", [("test_inner_steps", 10**9), ("inner_steps", 10**9), ("meta_batch", 10**9),
                                         ("eval_tasks", 10**9), ("val_tasks", 10**9), ("eval_steps", [1, 10**9]),
                                         ("hidden_sizes", [10**9]), ("iterations", 10**12)])
def test_a_count_above_its_bound_is_refused_naming_field_and_limit(field, value):
    with pytest.raises(UserError, match=f"{field} .*above the limit of"):
        config.from_dict({field: value})


def test_test_inner_steps_1e9_in_a_checkpoint_exits_2_from_adapt_and_resume(tmp_path):
    path = sinusoid_checkpoint(tmp_path, test_inner_steps=10**9)
    support, query = sinusoid_csvs(tmp_path)
    for args in (["adapt", str(path), "--support", str(support), "--query", str(query)],
                 ["train", "--resume", str(path.parent)]):
        done = run_cli(args, tmp_path)
        assert done.returncode == 2, (args, done.stderr[-2000:])
        assert "test_inner_steps is 1,000,000,000, above the limit of 10,000" in done.stderr
        assert "Traceback" not in done.stderr


# --- a stop signal ends validation ---------------------------------------------------------------------


def test_sigterm_during_validation_stops_the_run_promptly_with_its_checkpoint(tmp_path):
    """Validation runs inside the loop's deferred block; 100 tasks × 10,000 inner steps one task at a time
    take minutes, and a stop must not wait for them."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["train", "sinusoid", "--out-dir", str(tmp_path), "--run-name", "run", "--iterations", "3",
            "--strategy", "loop", "--hidden-sizes", "2", "--test-inner-steps", str(limits.MAX_STEPS),
            "--val-tasks", "100", "--val-every", "1", "--log-every", "1", "--checkpoint-every", "1",
            "--no-compare-pretrained", "--no-progress", "--no-tensorboard"]
    proc = subprocess.Popen([sys.executable, "-m", "mamlkit", *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 120
        while not (metrics.exists() and '"train"' in metrics.read_text()):  # step 1 logged: validation begins
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        time.sleep(1.0)  # well inside the validation
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("SIGTERM during validation did not stop the run within 60 s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM at step 1; checkpoint saved" in out + err
    _, state = checkpoint.load(tmp_path / "run" / "checkpoint.safetensors")
    assert state["step"] == 1
    assert not any(json.loads(line)["split"] == "val" for line in metrics.read_text().splitlines())


def test_a_stop_point_raises_only_inside_an_interruptible_block_and_not_while_held():
    from mamlkit import runfolder
    from mamlkit.base.stops import stop_point

    state = runfolder.Signals()
    state.received = signal.SIGTERM
    stop_point()  # outside any interruptible block: nothing happens
    with state.interruptible(), pytest.raises(runfolder.Stopped):
        stop_point()
    with state.held(), state.interruptible():
        stop_point()  # held for the other ranks: the stop waits for their agreement


def test_a_stop_point_in_an_episode_ends_rl_validation():
    """RL validation samples episodes inside the iteration's deferred block; a stop ends it at the next step."""
    from mamlkit import runfolder
    from mamlkit.rl import sampling
    from mamlkit.rl.envs import make_env, sample_tasks

    gen = torch.Generator().manual_seed(0)
    env = make_env("nav2d", sample_tasks("nav2d", 2, gen), 1, 100)
    policy = lambda obs: torch.zeros(*obs.shape[:-1], 4)  # noqa: E731 - [T, N, 2a]: mean 0, log σ 0
    state = runfolder.Signals()
    assert sampling.rollout(env, policy, gen).obs.shape[2] == 100  # no stop: the whole horizon
    state.received = signal.SIGTERM
    with state.interruptible(), pytest.raises(runfolder.Stopped):
        sampling.rollout(env, policy, gen)


# --- YAML ------------------------------------------------------------------------------------------


def test_yaml_aliases_are_refused(tmp_path):
    laughs = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level, name in enumerate("bcd"):
        prev = "abc"[level]
        laughs.append(f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]")
    laughs.append("model_args: [" + ",".join(["*d"] * 9) + "]")
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(laughs) + "\n")
    with pytest.raises(config.ConfigError, match="alias"):
        config.load_yaml(str(path))
    done = run_cli(["train", "sinusoid", "--config", str(path)], tmp_path)
    assert done.returncode == 2 and "YAML alias (*a)" in done.stderr, done.stderr


def test_yaml_size_and_depth_are_bounded(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (limits.MAX_CONFIG_BYTES // 10 + 1) + "iterations: 5\n")
    with pytest.raises(config.ConfigError, match="larger than the limit of 1 MiB"):
        config.load_yaml(str(big))
    deep = tmp_path / "deep.yaml"
    deep.write_text("model_args: " + "[" * 1000 + "]" * 1000 + "\n")
    with pytest.raises(config.ConfigError, match="nests lists or mappings more than 32 deep"):
        config.load_yaml(str(deep))
    fine = tmp_path / "fine.yaml"
    fine.write_text("iterations: 5\neval_steps: [0, 1]\n")
    assert config.load_yaml(str(fine)) == {"iterations": 5, "eval_steps": [0, 1]}


# --- memory --------------------------------------------------------------------------------------------


@pytest.fixture
def half_a_gib(monkeypatch):
    from mamlkit import models

    monkeypatch.setattr(models, "available_memory", lambda: 2**29)


def test_a_meta_batch_whose_data_cannot_fit_is_refused_before_allocating(tmp_path, half_a_gib):
    from mamlkit.loop import train

    # 20,000 tasks × 10,000 points: 0.75 GiB of inputs alone; the model is 1,761 parameters
    cfg = config.TrainConfig(**{**QUICK, "meta_batch": 20_000}, k_shot=5_000, k_query=5_000, out_dir=str(tmp_path))
    with pytest.raises(UserError, match=r"data of 20,000 tasks 0\.7.*Shrink --meta-batch"):
        train.new_trainer(cfg, tmp_path / "run")
    train.new_trainer(cfg.replace(meta_batch=25, k_shot=10, k_query=10), tmp_path / "run")  # the paper's fits


def test_image_activations_are_counted_before_allocating(tmp_path, half_a_gib):
    from mamlkit.loop import train
    from mamlkit.presets import preset_config

    # Conv4's parameters hardly grow with the image side, its activations do: 64 × 1000² floats per example
    cfg = preset_config("omniglot-5w1s", {"image_size": 2000, "out_dir": str(tmp_path)})
    with pytest.raises(UserError, match="activations"):
        train.new_trainer(cfg, tmp_path / "run")


def test_an_image_input_spec_of_100000_pixels_in_a_checkpoint_is_refused_by_load_and_adapt(tmp_path):
    import mamlkit

    path = sinusoid_checkpoint(tmp_path)
    tensors, state = checkpoint.load(path)
    state["input"] = {"type": "image", "mode": "RGB", "size": 100_000, "invert": False, "scale": 1 / 255}
    checkpoint.save(path, tensors, state)
    with pytest.raises(UserError, match="image size .* is 100,000, above the limit of 10,000"):
        mamlkit.load(path)
    (tmp_path / "support" / "a").mkdir(parents=True)
    (tmp_path / "support" / "b").mkdir()
    done = run_cli(["adapt", str(path), "--support", str(tmp_path / "support"), "--query", str(tmp_path)], tmp_path)
    assert done.returncode == 2 and "above the limit of 10,000" in done.stderr, done.stderr[-2000:]


def test_a_huge_model_spec_in_a_checkpoint_is_refused_by_load_and_adapt(tmp_path):
    import mamlkit

    path = sinusoid_checkpoint(tmp_path)
    tensors, state = checkpoint.load(path)
    state["model_spec"] = {"name": "mlp", "in_features": 1, "hidden": [1_000_000, 1_000_000], "out_features": 1}
    checkpoint.save(path, tensors, state)
    with pytest.raises(UserError, match="GiB.*Use a smaller model"):
        mamlkit.load(path)
    support, query = sinusoid_csvs(tmp_path)
    done = run_cli(["adapt", str(path), "--support", str(support), "--query", str(query)], tmp_path)
    assert done.returncode == 2 and "GiB" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_model_args_nested_deep_in_a_checkpoint_exits_2(tmp_path):
    path = sinusoid_checkpoint(tmp_path, model_args="[" * 100_000)
    done = run_cli(["eval", str(path)], tmp_path)
    assert done.returncode == 2 and "model_args must be a JSON object" in done.stderr, done.stderr[-2000:]
    assert "(100,000 characters)" in done.stderr and len(done.stderr) < 2000  # the value is not echoed whole


def test_rl_policy_too_large_for_memory_exits_2(tmp_path):
    done = run_cli(["rl", "train", "nav2d", "--hidden-sizes", "1000000", "1000000", "--out-dir", str(tmp_path)],
                   tmp_path)
    assert done.returncode == 2 and "GiB" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


# --- threads and adapt steps -----------------------------------------------------------------------------


def test_threads_beyond_a_few_per_core_are_refused(tmp_path):
    done = run_cli(["train", "sinusoid", "--threads", "100000", "--out-dir", str(tmp_path)], tmp_path)
    assert done.returncode == 2 and "threads is 100,000, above the limit of 4,096" in done.stderr, done.stderr
    many = str(limits.max_threads() + 1)  # within what a file may record, beyond this machine
    done = run_cli(["train", "sinusoid", "--threads", many, "--iterations", "1", "--out-dir", str(tmp_path),
                    "--no-progress", "--no-compare-pretrained"], tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"--threads {many} is more than 4 per core" in done.stderr and f"at most {limits.max_threads()}" in \
        done.stderr
    done = run_cli(["rl", "train", "nav2d", "--threads", many, "--out-dir", str(tmp_path)], tmp_path)
    assert done.returncode == 2 and f"at most {limits.max_threads()}" in done.stderr, done.stderr[-2000:]


def test_adapt_keeps_one_set_of_parameters_whatever_the_steps(tmp_path):
    """Adapting builds no meta-gradient: the peak tensor memory is the same for 5 steps and 200."""
    import mamlkit
    from mamlkit.exec.memory import peak_tensor_bytes

    learner = mamlkit.load(sinusoid_checkpoint(tmp_path))
    x = torch.linspace(-3, 3, 10).unsqueeze(1)
    y = torch.sin(x)
    peaks = {steps: peak_tensor_bytes(lambda s=steps: learner.adapt(x, y, s)) for steps in (5, 200)}
    assert peaks[5] == peaks[200] > 0
    adapted = learner.adapt(x, y, 20).params
    assert all(t.grad_fn is None and not t.requires_grad for t in adapted.values())
    with pytest.raises(UserError, match="steps .* above the limit of 10,000"):
        learner.adapt(x, y, limits.MAX_STEPS + 1)
    done = run_cli(["adapt", str(tmp_path / "run"), "--support", str(sinusoid_csvs(tmp_path)[0]), "--query",
                    str(tmp_path / "query.csv"), "--steps", "100000"], tmp_path)
    assert done.returncode == 2 and "--steps is 100,000, above the limit of 10,000" in done.stderr, done.stderr
