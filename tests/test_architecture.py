"""The house: which part each module belongs to, the imports between parts that must never exist, and no
import cycles (docs/DEVELOPING.md). Read from the source with ``ast``, so imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mamlkit"

# module prefix -> part (the longest matching prefix wins)
PARTS = {
    "mamlkit.cli": "Face", "mamlkit.__main__": "Face", "mamlkit.adapt_cli": "Face",
    "mamlkit.use": "Use",
    "mamlkit.config": "Config", "mamlkit.presets": "Config", "mamlkit.flags": "Config",
    "mamlkit.loop": "Loop", "mamlkit.loop.distributed": "Dist", "mamlkit.loop.run": "Recipe",
    "mamlkit.loop.guard": "Guard",
    "mamlkit.eval": "Eval",
    "mamlkit.algorithms": "Algorithms",
    "mamlkit.exec": "Exec", "mamlkit.exec.kernels": "Kernels",
    "mamlkit.engine": "Engine",
    "mamlkit.tasks": "Tasks",
    "mamlkit.data": "Data",
    "mamlkit.models": "Models",
    "mamlkit.assemble": "Assemble",
    "mamlkit.checkpoint": "Store", "mamlkit.runfolder": "Store",
    "mamlkit.base": "Base",
    "mamlkit.rl": "RL", "mamlkit.rl.cli": "Face",
}

# (from, to): why (as docs/DEVELOPING.md explains)
NEVER = {
    ("Engine", "Exec"): "the math does not know how it is batched",
    ("Engine", "Tasks"): "the math sees tensors, not datasets",
    ("Engine", "Algorithms"): "pieces do not know the recipes built from them",
    ("Engine", "Kernels"): "the executor installs the fast path, not functional.call",
    ("Kernels", "Engine"): "kernels are a leaf: tensors in, tensors out",
    ("Exec", "Algorithms"): "the executor runs per-task fns; it knows no algorithm",
    ("Exec", "Tasks"): "the executor sees TaskBatch (Base), not families",
    ("Exec", "Loop"): "the executor is driven, it does not drive",
    ("Algorithms", "Loop"): "an algorithm does not know how it is trained",
    ("Algorithms", "Eval"): "an algorithm does not know how it is reported",
    ("Algorithms", "Face"): "no printing from algorithms",
    ("Algorithms", "Tasks"): "an algorithm sees TaskBatch (Base), not families",
    ("Tasks", "Algorithms"): "data knows no learning rule",
    ("Tasks", "Engine"): "data knows no learning rule",
    ("Tasks", "Eval"): "a family declares its report; Eval writes it",
    ("Tasks", "Loop"): "data knows no trainer",
    ("Models", "Engine"): "models stay plain nn.Modules",
    ("Models", "Tasks"): "models stay plain nn.Modules",
    ("Data", "Tasks"): "files on disk know no episodes",
    ("Loop", "Face"): "the loop reports through logs, not the CLI",
    ("Loop", "Eval"): "training does not write the final report",
    ("Eval", "Loop"): "evaluation does not train",
    ("Use", "Loop"): "loading for inference does not go through the trainer",
    ("Use", "Face"): "the library API knows no argparse",
    ("Dist", "Loop"): "collectives are driven by the loop",
    ("RL", "Face"): "rl plugs into the CLI; flag helpers live in Config",
    ("RL", "Loop"): "RL has its own trainer; shared helpers live below",
    ("RL", "Recipe"): "the recipe runs RL's trainer, not the reverse",
    ("Guard", "Loop"): "the step guards serve both trainers and know neither",
    ("Guard", "RL"): "the step guards serve both trainers and know neither",
    ("Guard", "Recipe"): "the step guards serve both trainers and know neither",
    ("Config", "Loop"): "configs are data",
    ("Config", "Tasks"): "configs are data; plug-ins register their options, the config does not look them up",
    ("Config", "Algorithms"): "configs are data; plug-ins register their options, the config does not look them up",
    ("Store", "Config"): "checkpoints store JSON; Assemble turns a stored config into a TrainConfig",
    ("Face", "Kernels"): "switches travel in TrainConfig to Exec",
    ("Face", "Loop"): "the CLI asks the recipe for a run, it does not run one",
    ("Loop", "Recipe"): "the recipe runs the loop, not the reverse",
    ("Recipe", "Face"): "the recipe returns what the CLI prints; it knows no argparse",
    ("Eval", "Recipe"): "evaluation does not train",
    ("Use", "Recipe"): "loading for inference does not go through the trainer",
    ("Dist", "Recipe"): "collectives are driven by the loop",
    ("Assemble", "Loop"): "the trainer and inference loading build through it; it knows neither",
    ("Assemble", "Use"): "the trainer and inference loading build through it; it knows neither",
    ("Assemble", "Tasks"): "the caller passes the model spec: the family's, or the checkpoint's",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str | None:
    best = max((p for p in PARTS if module == p or module.startswith(p + ".")), key=len, default=None)
    return PARTS[best] if best else None


def imports_of(path: Path) -> set[str]:
    """The mamlkit modules ``path`` imports (``from mamlkit import x`` names the module mamlkit.x)."""
    out: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "mamlkit"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against the importing package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "mamlkit":
                continue
            for alias in node.names:  # `from pkg import module` imports the module, not only the package
                candidate = f"{base}.{alias.name}"
                out.add(candidate if _is_module(candidate) else base)
    return out


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_part():
    """Every module of the package, and every module of it that is imported, is on a part. The package root
    (``mamlkit/__init__.py``: the public names, loaded on first use, and the plug-in modules' names) is the one
    module above the parts."""
    g = graph()
    unplaced = [m for m in g if m != "mamlkit" and part_of(m) is None]
    assert not unplaced, f"modules outside every part (add them to PARTS and docs/DEVELOPING.md): {unplaced}"
    targets = sorted({t for ts in g.values() for t in ts if t != "mamlkit" and part_of(t) is None})
    assert not targets, f"imported modules outside every part: {targets}"


def test_no_forbidden_import():
    bad = []
    for module, targets in graph().items():
        src = part_of(module)
        for target in sorted(targets):
            dst = part_of(target)
            if src == "Base" and dst not in (None, "Base"):
                bad.append(f"{module} -> {target}: Base imports nothing of the house")
            elif (src, dst) in NEVER:
                bad.append(f"{module} -> {target}: {src} -> {dst} ({NEVER[src, dst]})")
    assert not bad, "imports the design forbids:\n" + "\n".join(bad)


def test_no_import_cycle():
    """No module reaches itself through imports. A package's ``__init__`` importing its own modules to
    register them is not an edge (they import the package's registry back by design)."""
    g = {m: {t for t in ts if t != m and not (t.startswith(m + ".") and _is_package(m))} for m, ts in graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(g.get(m, ())):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t in g and not state.get(t):
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if not state.get(m):
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _is_package(name: str) -> bool:
    return (PACKAGE / Path(*name.split(".")[1:]) / "__init__.py").exists()


@pytest.mark.parametrize("module,target,expected", [
    ("mamlkit.engine.functional", "mamlkit.exec.kernels", True),
    ("mamlkit.exec.strategies", "mamlkit.engine.functional", False),
    ("mamlkit.base.batch", "mamlkit.tasks", True),
    ("mamlkit.config", "mamlkit.tasks", True),
    ("mamlkit.config", "mamlkit.algorithms.options", True),
    ("mamlkit.checkpoint", "mamlkit.config", True),
    ("mamlkit.assemble", "mamlkit.config", False),
    ("mamlkit.config", "mamlkit.base.options", False),
])
def test_the_check_itself(module, target, expected):
    """The rules catch what they are meant to (so that the tests above cannot pass vacuously)."""
    src, dst = part_of(module), part_of(target)
    forbidden = (src == "Base" and dst != "Base") or (src, dst) in NEVER
    assert forbidden is expected


# What Eval may read of a learner is the MetaLearner protocol; an algorithm's pieces are its own.
PRIVATE_TO_ALGORITHMS = frozenset({"pieces", "_pieces", "_start", "_task", "_outer", "_train_fn", "_path_losses"})


def private_reads(source: str) -> list[str]:
    """``name (line)`` of every attribute in ``PRIVATE_TO_ALGORITHMS`` that ``source`` reads, by attribute
    (``learner.pieces``) or by name (``getattr(learner, "pieces")``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_TO_ALGORITHMS:
            found.append(f"{node.attr} (line {node.lineno})")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
              and node.args[1].value in PRIVATE_TO_ALGORITHMS):
            found.append(f"{node.args[1].value} (line {node.lineno})")
    return found


def test_eval_reads_learners_through_the_protocol_only():
    """Eval adapts through the learner (``adapted_losses``, ``guarded_losses``, ``adapt``, ``describe``), never
    by reading the pieces an algorithm is built from."""
    reads = {path.name: private_reads(path.read_text()) for path in sorted((PACKAGE / "eval").glob("*.py"))}
    assert not {k: v for k, v in reads.items() if v}, reads


def test_the_private_read_check_itself():
    assert private_reads("p = getattr(learner, 'pieces', None)\nq = learner.pieces.inner_lr\n") == [
        "pieces (line 1)", "pieces (line 2)"]
    assert private_reads("x = learner.describe()\n") == []


def learner_parameters(source: str, filename: str = "<source>") -> list[int]:
    """Lines of the functions (lambdas included) in ``source`` that take a parameter named ``learner``."""
    lines = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if p is not None]
            if "learner" in names:
                lines.append(node.lineno)
    return lines


def test_exec_functions_take_no_learner():
    """Exec → Algorithms is forbidden also through an argument: the executor is handed functions and parameters
    (a ``Work``), never a learner to call back into."""
    bad = [f"{path.relative_to(PACKAGE.parent)}:{line}" for path in sorted((PACKAGE / "exec").rglob("*.py"))
           for line in learner_parameters(path.read_text(), str(path))]
    assert not bad, "Exec functions that take a learner:\n" + "\n".join(bad)


def test_the_learner_check_itself():
    assert learner_parameters("def f(work, batch):\n    return lambda b: b\n") == []
    assert learner_parameters("class E:\n    def settle(self, learner, batch): ...\n") == [2]
    assert learner_parameters("g = lambda *, learner=None: learner\n") == [1]


# Meta-RL runs through the recipe and the step guards: rl/ keeps no copy of their run-folder, resume, signal
# or report handling.
RUN_HELPERS = frozenset({"_diverged", "_saved_step", "_stop_if_disk_full", "_held_for_all_ranks", "_report_of_run",
                         "_report_on_this_rank", "_check_resumable", "_lock", "after_stop"})
# (the command line enters the stop-signal block, `runfolder.stop_on_signals`, as `mamlkit train` does)
RUN_CALLS = frozenset({"signal.signal", "runfolder.lock", "runfolder.clear", "runfolder.report_folder"})


def own_run_handling(source: str) -> list[str]:
    """``name (line)`` of every function or class ``source`` defines that the recipe or the step guards own (the
    top-level ones of ``loop/run.py`` and ``loop/guard.py``, and ``RUN_HELPERS``), and of every call in
    ``RUN_CALLS``."""
    owned = RUN_HELPERS | {node.name for name in ("run.py", "guard.py")
                           for node in ast.parse((PACKAGE / "loop" / name).read_text()).body
                           if isinstance(node, ast.FunctionDef | ast.ClassDef)}
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name in owned:
            found.append(f"{node.name} (line {node.lineno})")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and isinstance(node.func.value, ast.Name) and f"{node.func.value.id}.{node.func.attr}" in RUN_CALLS):
            found.append(f"{node.func.value.id}.{node.func.attr} (line {node.lineno})")
    return found


def test_rl_keeps_no_copy_of_the_run_handling():
    """`rl train` and `rl eval` go through the recipe (lock, clear, resume, report) and the step guards (stop
    signals, rollback, divergence, a full disk): rl/ defines none of their functions and makes none of their
    calls (`mamlkit rl` parses, asks the recipe and prints, as `mamlkit train` does)."""
    found = {path.name: own_run_handling(path.read_text()) for path in sorted((PACKAGE / "rl").glob("*.py"))}
    assert not {k: v for k, v in found.items() if v}, found


def test_the_run_handling_check_itself():
    source = ("import signal\nfrom mamlkit import runfolder\n"
              "def _diverged(t): pass\ndef train_run(t): pass\nclass StepGuard: pass\n"
              "def f():\n    signal.signal(2, None)\n    with runfolder.lock('r'): pass\n"
              "    runfolder.record('r', ())\n")
    assert own_run_handling(source) == ["_diverged (line 3)", "train_run (line 4)", "StepGuard (line 5)",
                                        "signal.signal (line 7)", "runfolder.lock (line 8)"]


# How tasks run is the executor's: RL maps its per-task work (the post-update policies, the inner step) with
# `Executor.map`, never with vmap itself.
def vmap_calls(source: str) -> list[str]:
    """``name (line)`` of every call of vmap in ``source`` (``torch.vmap``, ``torch.func.vmap``, a ``vmap``
    imported by name) and of every import of it."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name == "vmap" or name.endswith(".vmap"):
                found.append((node.lineno, name))
        elif isinstance(node, ast.ImportFrom) and any(a.name == "vmap" for a in node.names):
            found.append((node.lineno, "import of vmap"))
    return [f"{what} (line {line})" for line, what in sorted(found)]


def test_rl_runs_tasks_through_the_executor():
    found = {path.name: vmap_calls(path.read_text()) for path in sorted((PACKAGE / "rl").glob("*.py"))}
    assert not {k: v for k, v in found.items() if v}, found


def test_the_vmap_check_itself():
    source = ("import torch\nfrom torch.func import vmap\nf = torch.vmap(g)(x)\ny = vmap(g, in_dims=0)(x)\n"
              "z = torch.func.vmap(g)\n# torch.vmap(g) in a comment\ns = 'vmap'\nexecutor.map(g, x)\n")
    assert vmap_calls(source) == ["import of vmap (line 2)", "torch.vmap (line 3)", "vmap (line 4)",
                                  "torch.func.vmap (line 5)"]
