"""The compiled CPU forward kernels (mamlkit.exec.kernels): max-pooling bit for bit as torch's, batch
norm to rounding, derivatives of every order from torch's own backward, and the meta-gradient unchanged."""

import logging

import pytest
import torch
import torch.nn.functional as F
from helpers import flat, needs_compiler
from torch import nn

import mamlkit
from mamlkit.exec import kernels, strategies
from mamlkit.loop import train
from mamlkit.models import conv4
from mamlkit.presets import preset_config
from mamlkit.tasks import TaskBatch

pytestmark = [needs_compiler, pytest.mark.usefixtures("kernels_on")]


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def tied(shape, dtype, seed):
    """Small integers through ReLU: many ties and zero windows, plus NaNs and infinities."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, shape, generator=g).to(dtype).relu()
    flat_x = x.view(-1)
    pick = torch.randperm(flat_x.numel(), generator=g)
    flat_x[pick[:3]] = float("nan")
    flat_x[pick[3:5]] = float("-inf")
    flat_x[pick[5:7]] = float("inf")
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel, stride", [(2, None), (3, 2), ((2, 3), (1, 2)), (3, 1), (2, 2)])
def test_max_pool_equals_torch_bit_for_bit(dtype, kernel, stride):
    for seed, shape in enumerate([(2, 3, 9, 11), (1, 2, 8, 8), (3, 1, 5, 7), (2, 4, 28, 28)]):
        x = tied(shape, dtype, seed)
        ref_y, ref_i = F.max_pool2d(x, kernel, stride, return_indices=True)
        with kernels.fast():
            y, i = F.max_pool2d(x, kernel, stride, return_indices=True)
            plain = torch.nn.MaxPool2d(kernel, stride)(x)
        assert torch.equal(i, ref_i)
        assert torch.equal(y.isnan(), ref_y.isnan()) and torch.equal(y.nan_to_num(), ref_y.nan_to_num())
        assert torch.equal(plain.nan_to_num(), ref_y.nan_to_num())


def test_the_fast_path_is_taken_and_cases_it_does_not_cover_go_to_torch():
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    w, b = torch.rand(3, requires_grad=True), torch.rand(3, requires_grad=True)
    with kernels.fast():
        assert "_MaxPool2d" in F.max_pool2d(x, 2).grad_fn.name()
        assert "_BatchNorm" in F.batch_norm(x, None, None, w, b, training=True).grad_fn.name()
        assert "_BatchNorm" in nn.BatchNorm2d(3).train()(x).grad_fn.name()
        # padding, dilation, ceil mode, channels-last, 3-d input, eval-mode batch norm, under a transform
        for y in (F.max_pool2d(x, 2, padding=1), F.max_pool2d(x, 2, dilation=2), F.max_pool2d(x, 3, ceil_mode=True),
                  F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 2), F.max_pool2d(x[0], 2),
                  F.batch_norm(x, torch.zeros(3), torch.ones(3), w, b, training=False)):
            assert "_MaxPool2d" not in y.grad_fn.name() and "_BatchNorm" not in y.grad_fn.name()
        out = torch.func.grad(lambda t: F.max_pool2d(t, 2).sum())(x.detach())
    assert torch.equal(out, torch.func.grad(lambda t: F.max_pool2d(t, 2).sum())(x.detach()))
    kernels.set_enabled(False)
    with kernels.fast():
        assert "_MaxPool2d" not in F.max_pool2d(x, 2).grad_fn.name()


def block(x, w, gamma, beta, running=None):
    """conv → batch norm → ReLU → max-pool, as in Conv4 with pooling."""
    h = F.conv2d(x, w, padding=1)
    rm, rv = running if running else (None, None)
    return F.max_pool2d(F.relu(F.batch_norm(h, rm, rv, gamma, beta, training=True)), 2)


def derivatives(fast: bool, running=None):
    """First and second derivatives of a scalar through ``block``, as the inner loop takes them: the
    gradient with create_graph, then the gradient of a function of that gradient (float64)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 10, 10, generator=g, dtype=torch.float64)
    w = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    gamma = torch.rand(4, generator=g, dtype=torch.float64).add(0.5).requires_grad_()
    beta = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(6, 4, 5, 5, generator=g, dtype=torch.float64)
    kernels.set_enabled(fast)
    with kernels.fast():
        loss = ((block(x, w, gamma, beta, running) - target) ** 2).sum()
        first = torch.autograd.grad(loss, (w, gamma, beta), create_graph=True)
        adapted = [p - 0.1 * d for p, d in zip((w, gamma, beta), first)]
        outer = ((block(x, *adapted, running) - target) ** 2).sum()
    second = torch.autograd.grad(outer, (w, gamma, beta))  # through the first gradient: Hessian terms
    return [t.detach() for t in first], list(second)


def test_first_and_second_derivatives_equal_torch_in_float64():
    fast_first, fast_second = derivatives(True)
    ref_first, ref_second = derivatives(False)
    for a, b in zip(fast_first + fast_second, ref_first + ref_second):
        assert rel(a, b) < 1e-12


def test_batch_norm_updates_running_statistics_like_torch():
    got = (torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    ref = (torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    derivatives(True, got)
    derivatives(False, ref)
    assert rel(got[0], ref[0]) < 1e-12 and rel(got[1], ref[1]) < 1e-12
    assert not torch.equal(got[0], torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_forward_and_backward_in_float32(affine):
    """Statistics summed in double: within float32 rounding of torch's, values far from zero included."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(75, 8, 28, 28, generator=g) * 3 + 50).requires_grad_()
    layer = nn.BatchNorm2d(8, affine=affine, track_running_stats=False)
    gy = torch.randn(75, 8, 28, 28, generator=g)
    outs = []
    for fast in (True, False):
        kernels.set_enabled(fast)
        with kernels.fast():
            y = layer(x)
        outs.append([y, *torch.autograd.grad(y, [x, *layer.parameters()], gy)])
    for a, b in zip(*outs):
        assert rel(a, b) < 1e-5


def pooled_conv_model():
    torch.manual_seed(0)
    return conv4(1, 3, 6, 16, pool=True).double()


def image_batch(tasks=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(3)
    return TaskBatch(torch.rand(tasks, 3, 1, size, size, generator=g, dtype=torch.float64), y.repeat(tasks, 1),
                     torch.rand(tasks, 9, 1, size, size, generator=g, dtype=torch.float64),
                     y.repeat_interleave(3).repeat(tasks, 1))


def meta_grad(learner, batch):
    for p in learner.meta_parameters().values():
        p.grad = None
    learner.meta_backward(batch)
    return flat(p.grad for p in learner.meta_parameters().values())


@pytest.mark.parametrize("strategy", ["loop", "threads"])
def test_meta_gradient_with_the_kernels_equals_torch_and_vmap(strategy):
    """Conv4 with max-pool, second order, two inner steps: the loop and threads (fast kernels) against
    the loop on torch's kernels and vmap (ExactNorms, no fast kernels), float64, 1e-10."""
    model, batch = pooled_conv_model(), image_batch()
    kw = dict(inner_lr=0.3, inner_steps=2, loss_fn="cross_entropy")
    fast = meta_grad(mamlkit.MAML(model, strategy=strategy, **kw), batch)
    kernels.set_enabled(False)
    ref = meta_grad(mamlkit.MAML(model, strategy="loop", **kw), batch)
    vmapped = meta_grad(mamlkit.MAML(model, strategy="vmap", **kw), batch)
    assert rel(fast, ref) < 1e-10 and rel(vmapped, ref) < 1e-10
    assert not torch.equal(fast, torch.zeros_like(fast))


def test_training_applies_the_fast_kernels_flag(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(kernels, "set_enabled", seen.append)
    cfg = preset_config("sinusoid", {"iterations": 1, "meta_batch": 2, "progress": False, "tensorboard": False,
                                     "compare_pretrained": False, "eval_tasks": 2, "strategy": "vmap",
                                     "fast_kernels": False})
    train.fit(train.new_trainer(cfg, tmp_path / "run"))
    assert seen == [False]


def test_without_a_compiler_everything_runs_on_torch(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_lib", False)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level(logging.INFO, logger="mamlkit"):
        assert not kernels.available()
    assert "failed" in caplog.text or "unavailable" in caplog.text
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    with kernels.fast():
        assert "_MaxPool2d" not in F.max_pool2d(x, 2).grad_fn.name()
    model, batch = pooled_conv_model(), image_batch(tasks=2)
    learner = mamlkit.MAML(model, inner_lr=0.3, inner_steps=1, loss_fn="cross_entropy", strategy="loop")
    assert learner.executor.strategy == strategies.Strategy(False)
    assert torch.isfinite(meta_grad(learner, batch)).all()


def test_code_that_used_no_kernel_runs_without_the_mode_afterwards(monkeypatch):
    """Small activations: torch's kernels are used, and after the first batch the mode (a Python call per
    torch function) is not entered at all; large ones keep it."""
    entered = []
    monkeypatch.setattr(kernels.FastKernels, "__enter__",
                        lambda self: entered.append(True) or torch.overrides.TorchFunctionMode.__enter__(self))
    monkeypatch.setattr(kernels, "MIN_ELEMENTS", 10**9)
    model, batch = pooled_conv_model(), image_batch()
    learner = mamlkit.MAML(model, inner_lr=0.3, inner_steps=1, loss_fn="cross_entropy", strategy="loop")
    first = meta_grad(learner, batch)
    assert entered == [True]
    assert torch.equal(meta_grad(learner, batch), first) and entered == [True]
    monkeypatch.setattr(kernels, "MIN_ELEMENTS", 0)
    other = image_batch(size=20)  # other shapes: decided afresh
    meta_grad(learner, other)
    meta_grad(learner, other)
    assert len(entered) == 1 + 2 * other.num_tasks  # the loop's backward runs one task per call
