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
from mamlkit.base.errors import UserError
from mamlkit.engine.functional import call, named_buffers
from mamlkit.models import USER_MODELS, build_model
from mamlkit.tasks import get_family
from mamlkit.use import inputs as raw

log = logging.getLogger("mamlkit")
TASK_MODEL_FORMAT = "task_model"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
# Meta-trained models that ship inside the package, loadable by name: ``mamlkit.load("omniglot-5w1s")``.
PRETRAINED = {"omniglot-5w1s": ASSETS / "omniglot-5w1s.safetensors",
              "clinc-5w1s": ASSETS / "clinc-5w1s.safetensors"}
# Example tasks (``mamlkit example NAME DIR``); scripts/ship_omniglot.py and scripts/ship_text_csv.py build them.
EXAMPLES = {"omniglot": ASSETS / "examples" / "omniglot", "clinc": ASSETS / "examples" / "clinc",
            "csv": ASSETS / "examples" / "csv"}


def input_spec(cfg) -> dict[str, Any]:
    """How raw inputs become model inputs, stored in every checkpoint (see ``mamlkit.use.io``)."""
    if cfg.task in ("omniglot",):
        # as mamlkit.data preprocesses Omniglot: grey levels, Lanczos resize, strokes bright, scaled to [0, 1]
        return {"type": "image", "mode": "L", "size": getattr(cfg, "image_size", 28), "invert": True,
                "scale": 1 / 255}
    if cfg.task in ("miniimagenet",):
        return {"type": "image", "mode": "RGB", "size": getattr(cfg, "image_size", 84), "invert": False,
                "scale": 1 / 255}
    if cfg.task == "clinc":
        return raw.text_spec(cfg)
    if cfg.task == "csv":  # the encoding itself (features, categories, classes) is in the model spec
        return {"type": "table", "target": cfg.target, "task_column": cfg.task_column, "fill": cfg.fill}
    return {"type": "vector"}


Inputs = Tensor | list[str] | list[dict[str, Any]]


def model_input(spec: dict[str, Any], model_spec: dict[str, Any], x: Inputs) -> Tensor:
    """``x`` as the model's input tensor: utterances (text checkpoints) and row dicts (CSV-task checkpoints)
    are encoded; a tensor is taken as already encoded."""
    if isinstance(x, Tensor):
        return x
    kind = spec.get("type")
    accepted = {"text": "a tensor or a list of strings", "table": "a tensor or a list of row dicts"}
    if kind not in accepted or isinstance(x, str) or not isinstance(x, (list, tuple)):
        raise UserError(f"this checkpoint's inputs are {kind}s: pass {accepted.get(kind, 'a tensor')}, "
                        f"not a {type(x).__name__}")
    if kind == "text":
        return raw.encode_texts(list(x), spec)
    return raw.encode_rows(list(x), model_spec, fill=spec.get("fill", "none"))


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
    input: dict[str, Any]
    num_classes: int | None = None   # classes in use (the first ``num_classes`` logits)
    class_names: list[str] | None = None

    @torch.no_grad()
    def predict(self, x: Inputs) -> Prediction:
        """Predict for ``x [B, *x_shape]`` in the model's input format, or raw inputs: a list of utterances
        (text checkpoints) or of row dicts (CSV tasks; regression values come back in the target's units)."""
        x = model_input(self.input, self.model_spec, x)
        out = call(self.model, self.params, named_buffers(self.model), x.to(next(iter(self.params.values())).dtype))
        if self.kind != "classification":
            return Prediction(None, None, raw.destandardise(out, self.model_spec) if _table(self.input) else out)
        probs = out[..., : self.num_classes].softmax(-1)
        return Prediction(probs.argmax(-1), probs)

    def save(self, path: str | Path) -> None:
        """Write the adapted parameters and everything needed to rebuild the model (atomic)."""
        state = {"type": TASK_MODEL_FORMAT, "model_spec": self.model_spec, "kind": self.kind, "input": self.input,
                 "num_classes": self.num_classes, "class_names": self.class_names}
        tensors = {f"param/{k}": v for k, v in self.params.items()}
        tensors |= {f"buffer/{k}": v for k, v in named_buffers(self.model).items()}
        checkpoint.save(path, tensors, state)


@dataclass
class Learner:
    """A meta-trained model ready to adapt: the checkpoint's algorithm, config and test-time settings."""

    meta: MetaLearner
    cfg: Any
    tensors: dict[str, Tensor]
    input: dict[str, Any]
    model_spec: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.meta.kind

    @property
    def n_way(self) -> int | None:
        return self.cfg.n_way if self.kind == "classification" else None

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
        support_x = model_input(self.input, self.model_spec, support_x)
        if _table(self.input):
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
        params = meta.adapt(support_x.to(dtype), support_y, steps)
        spec = self.model_spec if meta is self.meta else get_family(self.cfg.task).model_spec(
            meta_cfg(self.cfg, num_classes, True))
        return TaskModel(meta.model, params, spec, self.kind, self.input, num_classes, class_names)

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
            y = raw.encode_targets(y.reshape(-1).tolist() if isinstance(y, Tensor) else list(y), self.model_spec)
        if len(y) != len(x):
            raise UserError(f"{len(x)} support rows but {len(y)} targets")
        classes = len(pre["classes"]) if self.kind == "classification" else None
        params = self.meta.adapt(x.to(dtype), y if classes else y.to(dtype), steps)
        return TaskModel(self.meta.model, params, self.model_spec, self.kind, self.input, classes,
                         list(pre["classes"]) if classes else None)

    def _with_new_head(self, classes: int) -> MetaLearner:
        from mamlkit.loop.train import build

        head = _head_name(self.meta.model, self.n_way)
        meta, _ = build(meta_cfg(self.cfg, classes, True))
        with torch.no_grad():
            for name, p in meta.meta_parameters().items():
                key = f"meta/{name}"
                if name.startswith(head + ".") or key not in self.tensors or self.tensors[key].shape != p.shape:
                    p.zero_()  # the new head (and any per-parameter extra of its shape) starts at zero
                else:
                    p.copy_(self.tensors[key])
        return meta


def meta_cfg(cfg, classes: int | None, reset: bool):
    return cfg.replace(n_way=classes) if reset else cfg


def _table(spec: dict[str, Any]) -> bool:
    return spec.get("type") == "table"


def _label_ids(labels: list, names: list[str] | None) -> tuple[Tensor, list[str]]:
    """Label names as class ids ``[N]``, numbered in ``names`` order (default: sorted)."""
    labels = [str(v).strip() for v in labels]
    names = list(names) if names else sorted(set(labels))
    unknown = sorted(set(labels) - set(names))
    if unknown:
        raise UserError(f"labels {', '.join(map(repr, unknown))} are not among class_names {names}")
    return torch.tensor([names.index(v) for v in labels]), names


def load(path: str | Path) -> Learner | TaskModel:
    """Load a training checkpoint (→ :class:`Learner`) or an exported adapted model (→ :class:`TaskModel`).

    ``path`` may also name a model that ships with mamlkit (see ``PRETRAINED``), e.g. ``"omniglot-5w1s"``.
    """
    from mamlkit import config
    from mamlkit.loop.train import build

    if str(path) in PRETRAINED and not Path(path).exists():
        path = PRETRAINED[str(path)]
    tensors, state = checkpoint.load(path)
    if state.get("type") == TASK_MODEL_FORMAT:
        model = build_model(state["model_spec"])
        params = {k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")}
        model = model.to(next(iter(params.values())).dtype)
        _load_buffers(model, tensors)
        return TaskModel(model, params, state["model_spec"], state["kind"], state["input"], state["num_classes"],
                         state["class_names"])
    if "config" not in state:
        raise checkpoint.CheckpointError(f"{path} is a mamlkit file without a run config; it cannot be adapted")
    cfg = config.from_dict(state["config"])
    spec = state.get("model_spec") or get_family(cfg.task).model_spec(cfg)
    user = spec if spec.get("name") in USER_MODELS else None  # a user's model is rebuilt as the checkpoint records
    meta = _build(cfg, tensors, spec) if cfg.task == "csv" else build(cfg, tensors, user)[0]
    return Learner(meta, cfg, tensors, state.get("input") or input_spec(cfg), spec)


def _build(cfg, tensors: dict[str, Tensor], spec: dict[str, Any]) -> MetaLearner:
    """``train.build`` from the checkpoint's stored model spec: a CSV-task checkpoint's spec comes from its
    training file, which need not exist where the checkpoint is adapted."""
    from mamlkit.algorithms import build_learner
    from mamlkit.loop.train import DTYPES, restore

    with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten; keep the global RNG untouched
        model = build_model(spec)
    model = model.to(device=cfg.device, dtype=DTYPES[cfg.dtype])
    meta = build_learner(cfg.algo, model, cfg)
    restore(meta, tensors)
    return meta


def _load_buffers(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for name, b in model.named_buffers():
            if f"buffer/{name}" in tensors:
                b.copy_(tensors[f"buffer/{name}"])
