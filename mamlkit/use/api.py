"""Use a meta-trained model on your own task: load, adapt on a support set, predict, export.

    learner = mamlkit.load("runs/omniglot-5w1s-maml")         # a training checkpoint
    task_model = learner.adapt(support_x, support_y)          # the checkpoint's test-time α and K
    labels, probs, _ = task_model.predict(query_x)            # classification
    task_model.save("my_task.safetensors")                    # no inner loop needed to reuse it
    same = mamlkit.load("my_task.safetensors")                # -> TaskModel

Text checkpoints (task ``clinc``) also take lists of utterances and label names, encoded with the
checkpoint's encoder recipe; CSV-task checkpoints (task ``csv``) take rows as ``column -> value`` dicts
(encoded with the stored meta-train encoding) and work in the target's own units (see
:mod:`mamlkit.use.inputs`). Adaptation runs the same ``adapt_path`` as training and evaluation. Loading
never runs code from the file: weights are safetensors, everything else JSON.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from mamlkit import checkpoint
from mamlkit.algorithms import MetaLearner
from mamlkit.algorithms.driver import thread_planned
from mamlkit.assemble import assemble, config_of
from mamlkit.base.errors import UserError
from mamlkit.base.limits import MAX_IMAGE_SIZE, MAX_STEPS, check_count
from mamlkit.config import TrainConfig
from mamlkit.data import tables
from mamlkit.data.tables import beyond
from mamlkit.engine.functional import call, named_buffers
from mamlkit.engine.outputs import OutputSpec, output_selector
from mamlkit.models import Workload, approve_model_code, build_model, check_model_memory, example_shape
from mamlkit.tasks import get_family
from mamlkit.use import formats

log = logging.getLogger("mamlkit")
TASK_MODEL_FORMAT = "task_model"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
# Meta-trained models that ship inside the package, loadable by name: ``mamlkit.load("omniglot-5w1s")``.
PRETRAINED = {"omniglot-5w1s": ASSETS / "omniglot-5w1s.safetensors",
              "clinc-5w1s": ASSETS / "clinc-5w1s.safetensors"}
# Example tasks (``mamlkit example NAME DIR``); scripts/ship_omniglot.py and scripts/ship_text_csv.py build them.
EXAMPLES = {"omniglot": ASSETS / "examples" / "omniglot", "clinc": ASSETS / "examples" / "clinc",
            "csv": ASSETS / "examples" / "csv"}


def input_spec(cfg) -> dict[str, Any] | None:
    """How raw inputs become model inputs, as ``cfg``'s task family declares it (see ``mamlkit.use.io``);
    ``None`` when the family takes tensors only."""
    family = get_family(cfg.task)
    return family.input_spec(cfg) if family.input_spec is not None else None


Inputs = Tensor | list[str] | list[dict[str, Any]]


def model_input(spec: dict[str, Any] | None, model_spec: dict[str, Any], x: Inputs, kind: str) -> Tensor:
    """``x`` as the model's input tensor: raw inputs (utterances of text checkpoints, row dicts of CSV-task
    checkpoints) encoded by the input format of ``spec`` (:mod:`mamlkit.use.formats`); a tensor is taken as
    already encoded."""
    return formats.model_input(spec, kind, model_spec, x)


class Prediction(NamedTuple):
    """``labels [B]`` and class ``probs [B, C]`` (classification), or ``values [B, ...]`` (regression)."""

    labels: Tensor | None
    probs: Tensor | None
    values: Tensor | None = None


def _head_name(model: nn.Module, n_out: int) -> str:
    """The last ``nn.Linear`` with ``n_out`` outputs: the classifier head."""
    heads = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == n_out]
    if not heads:
        raise UserError(f"cannot find a linear head with {n_out} outputs to reset in this model")
    return heads[-1]


@dataclass
class TaskModel:
    """A model adapted to one task: a plain module plus its adapted parameters."""

    model: nn.Module
    params: dict[str, Tensor]
    model_spec: dict[str, Any]
    kind: str
    input: dict[str, Any] | None
    num_classes: int | None = None   # classes in use (the first ``num_classes`` logits)
    class_names: list[str] | None = None
    output: OutputSpec = None  # the tensor of the model's output that is the prediction (mamlkit.engine.outputs)

    @torch.no_grad()
    def predict(self, x: Inputs) -> Prediction:
        """Predict for ``x [B, *x_shape]`` in the model's input format, or raw inputs: a list of utterances
        (text checkpoints) or of row dicts (CSV tasks; regression values come back in the target's units)."""
        x = model_input(self.input, self.model_spec, x, self.kind)
        x = _cast(x, next(iter(self.params.values())).dtype, "the query inputs")
        out = call(self.model, self.params, named_buffers(self.model), x)
        out = output_selector(self.output)(out)
        if not bool(torch.isfinite(out).all()):
            raise UserError(f"the model's outputs for query row(s) {_rows(out)} are NaN or infinite: those inputs "
                            f"(largest magnitude {x.abs().max().item():g}) overflow {_name(x.dtype)} inside the "
                            "model. Rescale them nearer the range the model was meta-trained on")
        if self.kind != "classification":
            if formats.is_table(self.input):  # back in the target's units
                out = tables.inverse_targets(formats.table_spec(self.input, self.model_spec), out)
            return Prediction(None, None, out)
        probs = out[..., : self.num_classes].softmax(-1)
        return Prediction(probs.argmax(-1), probs)

    def save(self, path: str | Path) -> None:
        """Write the adapted parameters and everything needed to rebuild the model (atomic)."""
        if not output_selector(self.output).recordable:
            raise UserError("this adapted model selects its prediction with a function (output=...), which a file "
                            "cannot hold: a file never holds code. Select with a key (\"logits\") or an index (0)")
        state = {"type": TASK_MODEL_FORMAT, "model_spec": self.model_spec, "kind": self.kind, "input": self.input,
                 "num_classes": self.num_classes, "class_names": self.class_names, "output": self.output}
        tensors = {f"param/{k}": v for k, v in self.params.items()}
        tensors |= {f"buffer/{k}": v for k, v in named_buffers(self.model).items()}
        checkpoint.save(path, tensors, state)


@dataclass
class Learner:
    """A meta-trained model ready to adapt: the checkpoint's algorithm, config and test-time settings."""

    meta: MetaLearner
    cfg: Any
    tensors: dict[str, Tensor]
    input: dict[str, Any] | None
    model_spec: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.meta.kind

    @property
    def n_way(self) -> int | None:
        return self.cfg.n_way if self.kind == "classification" else None

    @thread_planned(lambda learner: learner.meta.executor)  # encoding raw inputs included
    def adapt(self, support_x: Inputs, support_y: Tensor | list, steps: int | None = None, *,
              reset_head: bool = False, class_names: list[str] | None = None) -> TaskModel:
        """Adapt to one task with the algorithm's own inner loop (its α, learned rates, and K).

        ``support_x [N, *x_shape]``, or a list of utterances (text checkpoints) or of row dicts (CSV
        tasks); ``support_y [N]`` class ids in ``[0, C)`` or a list of label names (classes numbered in
        ``class_names`` order, default sorted), or regression targets ``[N, *y_shape]``. ``steps``
        defaults to the checkpoint's test-time K. With fewer classes than the head's N outputs, the
        first C outputs are used. With more, ``reset_head=True`` replaces the head by a
        zero-initialised one with C outputs before adapting; otherwise it is an error.

        CSV-task checkpoints keep the meta-train classes (a support set may hold only some of them) and
        take regression targets in the target's own units (standardised here with the stored statistics).
        """
        if steps is not None:  # bounded: a step count decides how long adapting runs (mamlkit.base.limits)
            if steps < 0:
                raise UserError(f"steps must be >= 0, got {steps}")
            check_count("steps (--steps)", steps, MAX_STEPS)
        support_x = model_input(self.input, self.model_spec, support_x, self.kind)
        if formats.is_table(self.input):
            return self._adapt_table(support_x, support_y, steps, reset_head)
        meta, num_classes = self.meta, None
        dtype = next(iter(meta.model.parameters())).dtype
        if self.kind == "classification" and not isinstance(support_y, Tensor):
            support_y, class_names = _label_ids(list(support_y), class_names)
        support_y = torch.as_tensor(support_y)
        if len(support_y) != len(support_x):
            raise UserError(f"{len(support_x)} support examples but {len(support_y)} labels or targets")
        if self.kind == "classification":
            support_y = support_y.long()
            num_classes = int(support_y.max()) + 1
            if num_classes < 2:
                raise UserError("the support set has a single class; few-shot classification needs at least 2")
            if num_classes > self.n_way:
                if not reset_head:
                    raise UserError(f"the support set has {num_classes} classes but this model's head has "
                                    f"{self.n_way} outputs; pass reset_head=True (CLI: --reset-head) to adapt a "
                                    "fresh zero-initialised head of the right size")
                meta = self._with_new_head(num_classes)
            elif num_classes < self.n_way:
                log.warning("mamlkit: %d classes, fewer than the head's %d outputs: using the first %d",
                            num_classes, self.n_way, num_classes)
        support_x = _cast(support_x, dtype, "the support inputs")
        if support_y.is_floating_point():  # regression targets, used as given; finite in the model's dtype
            _cast(support_y, dtype, "the support targets")
        params = _adapted(meta.adapt(support_x, support_y, steps), support_x, support_y)
        spec = self.model_spec if meta is self.meta else get_family(self.cfg.task).model_spec(
            meta_cfg(self.cfg, num_classes, True))
        return TaskModel(meta.model, params, spec, self.kind, self.input, num_classes, class_names,
                         output_selector(meta.output).spec)

    def _adapt_table(self, x: Tensor, y: Tensor | list, steps: int | None, reset_head: bool) -> TaskModel:
        pre = self.model_spec["preprocess"]
        if reset_head:
            raise UserError("a CSV-task model keeps the classes of its meta-training; --reset-head does not apply")
        dtype = next(iter(self.meta.model.parameters())).dtype
        if self.kind == "classification" and isinstance(y, Tensor):
            y = y.long()
            if y.numel() and (y.min() < 0 or y.max() >= len(pre["classes"])):
                raise UserError(f"class ids must be in [0, {len(pre['classes'])}) for this model's classes "
                                f"{', '.join(pre['classes'])}")
        else:
            y = tables.encode_targets(formats.table_spec(self.input, self.model_spec),
                                     y.reshape(-1).tolist() if isinstance(y, Tensor) else list(y))
        if len(y) != len(x):
            raise UserError(f"{len(x)} support rows but {len(y)} targets")
        classes = len(pre["classes"]) if self.kind == "classification" else None
        x = _cast(x, dtype, "the support inputs")
        y = y if classes else _cast(y, dtype, "the support targets")
        params = _adapted(self.meta.adapt(x, y, steps), x, y)
        return TaskModel(self.meta.model, params, self.model_spec, self.kind, self.input, classes,
                         list(pre["classes"]) if classes else None, output_selector(self.meta.output).spec)

    def _with_new_head(self, classes: int) -> MetaLearner:
        head = _head_name(self.meta.model, self.n_way)
        cfg = meta_cfg(self.cfg, classes, True)
        meta = assemble(cfg, get_family(cfg.task).model_spec(cfg))
        with torch.no_grad():
            for name, p in meta.meta_parameters().items():
                key = f"meta/{name}"
                if name.startswith(head + ".") or key not in self.tensors or self.tensors[key].shape != p.shape:
                    p.zero_()  # the new head (and any per-parameter extra of its shape) starts at zero
                else:
                    p.copy_(self.tensors[key])
        return meta


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _rows(t: Tensor, most: int = 10) -> str:
    """The rows (counted from 0) of ``t [N, ...]`` that hold a value that is not finite."""
    bad = (~torch.isfinite(t)).reshape(len(t), -1).any(1).nonzero().flatten().tolist() if t.dim() else [0]
    return ", ".join(map(str, bad[:most])) + (f" and {len(bad) - most} more" if len(bad) > most else "")


def _cast(x: Tensor, dtype: torch.dtype, what: str) -> Tensor:
    """``x`` in the model's ``dtype``, refused if a value is NaN or infinite there. Checked after the cast:
    1e39 is a finite float64 but an infinite float32, and the model would predict NaN from it in silence."""
    cast = x.to(dtype)
    if cast.is_floating_point() and not bool(torch.isfinite(cast).all()):
        raise UserError(f"{what} hold NaN, inf or values {beyond(dtype)} (row(s) {_rows(cast)}, counted from 0). "
                        "Rescale them")
    return cast


def _adapted(params: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``params``, the result of adapting, refused if one is NaN or infinite: finite inputs and targets can
    still overflow the support loss (a target of 1e38 squared, in float32)."""
    if checkpoint.all_finite(p for p in params.values() if p.is_floating_point()):
        return params
    dtype = next(p.dtype for p in params.values() if p.is_floating_point())
    targets = f" and targets up to {y.abs().max().item():g}" if y.is_floating_point() and y.numel() else ""
    raise UserError(f"adapting to this support set gave NaN or infinite parameters: its loss overflows "
                    f"{_name(dtype)} (inputs up to {x.abs().max().item():g}{targets} in magnitude, as the model "
                    "sees them). Rescale the inputs and targets nearer the range the model was meta-trained on, or "
                    "adapt with fewer steps")


def meta_cfg(cfg: TrainConfig, classes: int | None, reset: bool) -> TrainConfig:
    """``cfg`` for ``classes`` classes when ``reset``; a family without episodes (``n_way``) sizes its head
    from its data, so its config stays as it is."""
    return cfg.replace(n_way=classes) if reset and "n_way" in cfg.to_dict() else cfg


def _label_ids(labels: list, names: list[str] | None) -> tuple[Tensor, list[str]]:
    """Label names as class ids ``[N]``, numbered in ``names`` order (default: sorted)."""
    labels = [str(v).strip() for v in labels]
    names = list(names) if names else sorted(set(labels))
    unknown = sorted(set(labels) - set(names))
    if unknown:
        raise UserError(f"labels {', '.join(map(repr, unknown))} are not among class_names {names}")
    return torch.tensor([names.index(v) for v in labels]), names


def load(path: str | Path, *, model: str | None = None, trust_model_code: bool = False) -> Learner | TaskModel:
    """Load a training checkpoint (→ :class:`Learner`) or an exported adapted model (→ :class:`TaskModel`).

    ``path`` may also name a model that ships with mamlkit (see ``PRETRAINED``), e.g. ``"omniglot-5w1s"``;
    the shipped model wins over a file or folder of that name in the current folder (``"./omniglot-5w1s"``
    loads the local one).

    A file of a model built by your own factory (``mamlkit train --model package.module:fn``) records the
    factory's name; loading never imports it on the file's word. Name it again, ``model="package.module:fn"``,
    or allow the file's code, ``trust_model_code=True``; otherwise an ``UntrustedModelCode`` error says which
    code the file asks for.
    """

    if isinstance(path, str) and path in PRETRAINED:
        path = PRETRAINED[path]
    tensors, state = checkpoint.load(path)
    if state.get("type") == TASK_MODEL_FORMAT:
        approve_model_code([state.get("model_spec")], f"adapted model {path}", model=model,
                           trust_model_code=trust_model_code)
        lacking = [k for k in ("model_spec", "kind", "input", "num_classes", "class_names") if k not in state]
        if lacking:
            raise checkpoint.CheckpointError(f"{path} is an adapted model without {', '.join(lacking)}; the file is "
                                             "damaged or was not written by TaskModel.save")
        _check_size(state["model_spec"], state["input"], tensors, examples=1, where=path)
        model = build_model(state["model_spec"])
        params = {k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")}
        checkpoint.check_tensors(tensors, "param/", dict(model.named_parameters()), where="adapted model")
        checkpoint.check_tensors(tensors, "buffer/", dict(model.named_buffers()), required=False,
                                 where="adapted model")
        model = model.to(next(iter(params.values())).dtype)
        _load_buffers(model, tensors)
        return TaskModel(model, params, state["model_spec"], state["kind"], state["input"], state["num_classes"],
                         state["class_names"], _stored_output(state.get("output"), path))
    if "config" not in state:
        raise checkpoint.CheckpointError(f"{path} is a mamlkit file without a run config; it cannot be adapted")
    stored = state["config"]
    approve_model_code([state.get("model_spec"), stored.get("model") if isinstance(stored, dict) else None],
                       f"checkpoint {path}", model=model, trust_model_code=trust_model_code)
    cfg = config_of(state, path)
    # The stored spec: a CSV task's comes from its training file, which need not exist where it is adapted.
    spec = state.get("model_spec") or get_family(cfg.task).model_spec(cfg)
    inputs = state.get("input") or input_spec(cfg)
    _check_size(spec, inputs, tensors, examples=(cfg.n_way if cfg.loss == "cross_entropy" else 1) * cfg.k_shot,
                where=path)
    return Learner(assemble(cfg, spec, tensors), cfg, tensors, inputs, spec)


def _check_size(spec: Any, inputs: Any, tensors: dict[str, Tensor], examples: int, where: str | Path) -> None:
    """Refuse, before the model is built or an input read, an input spec whose images are over
    MAX_IMAGE_SIZE pixels a side, and a model that cannot adapt on ``examples`` inputs in the memory available
    (one task, only the current iterate kept: :meth:`~mamlkit.algorithms.driver.Driver.adapt`)."""
    if isinstance(inputs, dict) and inputs.get("type") == "image":
        size = inputs.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise checkpoint.CheckpointError(f"{where}: its input spec's image size is {size!r}, not a pixel count")
        try:
            check_count("the input spec's image size (pixels a side)", size, MAX_IMAGE_SIZE)
        except UserError as e:
            raise checkpoint.CheckpointError(f"{where}: {e}") from None
    if isinstance(spec, dict):
        dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
        check_model_memory(spec, dtype, Workload(example_shape(spec, inputs if isinstance(inputs, dict) else None),
                                                 examples, steps=1, shrink="the support set"))


def _stored_output(value: Any, path: str | Path) -> str | int | None:
    """An adapted-model file's ``output`` selector (absent in files written before it was recorded: None): a key
    or an index, nothing else."""
    ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10**6) \
        or (isinstance(value, str) and 0 < len(value) <= 100 and value.isidentifier())
    if not ok:
        raise checkpoint.CheckpointError(f"{path}: its 'output' must be a key or an index of the model's output, "
                                         f"got {str(value)[:80]!r}; the file is damaged or was not written by "
                                         "TaskModel.save")
    return value


def _load_buffers(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for name, b in model.named_buffers():
            if f"buffer/{name}" in tensors:
                b.copy_(tensors[f"buffer/{name}"])
