"""Batch norm → ReLU → max-pool as one compiled kernel (the fused block of mamlkit.exec.kernels and the
fused models of mamlkit.exec.kernels.fusion): the same values, derivatives of every order, running statistics
and meta-gradients as the three ops run by torch, and a fall-back wherever fusing would change what the
user's code sees."""


import pytest
import torch
import torch.nn.functional as F
from helpers import flat, needs_compiler
from torch import nn

import mamlkit
from mamlkit.engine import functional
from mamlkit.exec import kernels
from mamlkit.exec.kernels import fusion
from mamlkit.models import conv4
from mamlkit.tasks import TaskBatch

pytestmark = [needs_compiler, pytest.mark.usefixtures("kernels_on")]


@pytest.fixture
def fused_calls(monkeypatch):
    """How many times the fused kernel ran."""
    calls = []
    for name in ("batch_norm_relu_max_pool", "conv_batch_norm_relu_max_pool"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    return calls


def close(a, b):
    """Largest difference over the largest magnitude, across a list of tensors (a gradient that is zero
    in exact arithmetic, such as a conv bias under batch norm, is compared on the scale of the rest)."""
    return max((x - y).abs().max().item() for x, y in zip(a, b)) / max(y.abs().max().item() for y in b)


def same(a, b, tol=1e-12):
    return torch.equal(a, b) or close([a], [b]) < tol


def block(affine=True, kernel=2, stride=None, channels=2):
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Conv2d(channels, 5, 3, padding=1), nn.BatchNorm2d(5, affine=affine), nn.ReLU(),
                           nn.MaxPool2d(kernel, stride)).double()
    if affine:
        with torch.no_grad():  # a negative scale flips which element of a window is the maximum
            layers[1].weight.copy_(torch.tensor([1.5, -0.7, 0.3, 1.0, -2.0]))
            layers[1].bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.5, 0.3]))
    return layers


def derivatives(run, model, x):
    """Output, first derivatives with create_graph, and second derivatives of a function of them."""
    params = list(model.parameters())
    out = run(model, x)
    first = torch.autograd.grad((out ** 2).sum(), params, create_graph=True)
    second = torch.autograd.grad(sum((g * g.detach().sin()).sum() for g in first), params)
    return [out.detach(), *(g.detach() for g in first), *second]


def by_ops(model, x):  # the functional calls: the kernels' mode fuses them as it sees them
    conv, bn, _, pool = model
    h = F.batch_norm(conv(x), None, None, bn.weight, bn.bias, training=True)
    return F.max_pool2d(F.relu(h), pool.kernel_size, pool.stride)


def by_trace(model, x):  # the module, through functional.call: mamlkit.exec.kernels.fusion's fused layer list
    return functional.call(model, dict(model.named_parameters()), dict(model.named_buffers()), x)


@pytest.mark.parametrize("run, channels", [(by_ops, 2), (by_trace, 2), (by_trace, 1)])
@pytest.mark.parametrize("affine, kernel, stride", [(True, 2, None), (False, 2, None), (True, 3, 2), (True, 2, 1)])
def test_fused_block_has_torchs_values_and_derivatives(run, channels, affine, kernel, stride, fused_calls):
    """Op by op (the mode), and the module with a 2-channel conv (batch norm → ReLU → pool fused) and a
    1-channel one (the convolution fused too)."""
    model = block(affine, kernel, stride, channels)
    x = torch.randn(4, channels, 11, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = derivatives(run, model, x)
    with kernels.fast():
        got = derivatives(run, model, x)
    assert fused_calls == ["conv_batch_norm_relu_max_pool" if channels == 1 else "batch_norm_relu_max_pool"]
    n = len(list(model.parameters()))
    assert close(got[:1 + n], ref[:1 + n]) < 1e-13  # output and first derivatives
    # second: the batch-norm statistics differ from torch's in the last bits (sums in double, another
    # order), which second derivatives through batch norm amplify; the unfused kernels differ as much
    assert close(got, ref) < 1e-11


def test_an_input_that_takes_a_gradient_is_not_fused_into_the_convolution(fused_calls):
    model = block(channels=1)
    x = torch.randn(4, 1, 12, 12, dtype=torch.float64, requires_grad=True)
    ref = torch.autograd.grad(by_trace(model, x).square().sum(), [x, *model.parameters()])
    with kernels.fast():
        got = torch.autograd.grad(by_trace(model, x).square().sum(), [x, *model.parameters()])
    assert fused_calls == ["batch_norm_relu_max_pool"] and close(got, ref) < 1e-13


def test_float32_output_matches_the_unfused_kernels():
    model = block().float()
    x = torch.randn(8, 2, 16, 16, generator=torch.Generator().manual_seed(2)) * 3 + 1
    with kernels.fast():
        fused = by_ops(model, x)
        conv, bn, _, _ = model
        h = F.batch_norm(conv(x), None, None, bn.weight, bn.bias, training=True)
        r = F.relu(h)
        r.add_(0)  # an in-place change (even a no-op) after relu: not fused
        unfused = F.max_pool2d(r, 2)
    assert "Fused" not in type(unfused.grad_fn).__name__ and "_MaxPool2d" in unfused.grad_fn.name()
    assert "_BatchNormReLUMaxPool" in fused.grad_fn.name()
    assert torch.allclose(fused, unfused, rtol=0, atol=1e-6)


def test_an_intermediate_with_another_use_keeps_its_gradient(fused_calls):
    """The batch norm output also feeds a second branch: the pool is still fused (its input is recomputed
    from batch norm's input) and both branches' gradients arrive."""
    model = block()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def run(model, x):
        conv, bn, _, _ = model
        h = F.batch_norm(conv(x), None, None, bn.weight, bn.bias, training=True)
        return F.max_pool2d(F.relu(h), 2).sum() + (h ** 3).mean() + F.relu(h).square().sum()

    ref = torch.autograd.grad(run(model, x), list(model.parameters()))
    with kernels.fast():
        got = torch.autograd.grad(run(model, x), list(model.parameters()))
    assert fused_calls and close(got, ref) < 1e-12


def test_fused_model_keeps_names_and_objects_and_only_covers_sequential_built_ins():
    model = conv4(1, 3, 6, 16, pool=True)
    assert fusion.fused(model) is model  # outside a fast() block
    with kernels.fast():
        runner = fusion.fused(model)
        assert isinstance(runner, fusion.FusedSequential)
        assert [type(s).__name__ for s in runner.steps] == ["FusedBlock"] * 4 + ["Flatten", "Linear"]
        assert runner.steps[0].parts[0] is model.body[0][0]  # the first block's convolution: fused too
        assert dict(runner.named_parameters()).keys() == dict(model.named_parameters()).keys()
        assert all(a is b for a, b in zip(runner.parameters(), model.parameters()))
        assert dict(runner.named_buffers()).keys() == dict(model.named_buffers()).keys()
        assert fusion.fused(model) is runner  # cached

        class Custom(nn.Module):  # a forward of its own: only running it follows its control flow
            def __init__(self):
                super().__init__()
                self.body = conv4(1, 3, 6, 16, pool=True)

            def forward(self, x):
                return self.body(x) * (2 if self.training else 1)

        custom = Custom()
        assert fusion.fused(custom) is custom
        plain = conv4(1, 3, 6, 16)  # stride-2 Conv4: nothing to fuse
        assert fusion.fused(plain) is plain


def test_a_hook_on_a_container_runs_the_model_itself(fused_calls):
    model = conv4(1, 3, 6, 16, pool=True).double()
    x = torch.rand(5, 1, 16, 16, dtype=torch.float64)
    handle = model.body.register_forward_hook(lambda m, i, o: o + 1)
    ref = by_trace(model, x)
    with kernels.fast():
        got = by_trace(model, x)
    handle.remove()
    assert close([got], [ref]) < 1e-13
    assert "conv_batch_norm_relu_max_pool" not in fused_calls  # the layer list did not run


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_and_counter_as_torch(momentum):
    torch.manual_seed(0)
    models = [conv4(1, 3, 6, 16, pool=True, bn_track_running_stats=True).double() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for m in models:
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.momentum = momentum
    x = torch.rand(10, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for step in range(3):
        ref = by_trace(models[1], x + step)
        with kernels.fast():
            got = by_trace(models[0], x + step)
        assert close([got], [ref]) < 1e-13
    a, b = models[0].state_dict(), models[1].state_dict()
    assert all(same(a[k], b[k]) for k in a)
    assert a["body.0.1.num_batches_tracked"].item() == 3


def test_evaluation_mode_and_hooks_run_the_modules(fused_calls):
    model = conv4(1, 3, 6, 16, pool=True, bn_track_running_stats=True).double()
    x = torch.rand(5, 1, 16, 16, dtype=torch.float64)
    model.eval()
    ref = by_trace(model, x)
    with kernels.fast():
        assert torch.equal(by_trace(model, x), ref)
    assert not fused_calls
    model.train()
    seen = []

    def hook(module, inputs, out):  # sees ReLU's output, and changes it
        seen.append(out.shape)
        return out * 2

    handle = model.body[0][2].register_forward_hook(hook)
    ref = by_trace(model, x)
    with kernels.fast():
        got = by_trace(model, x)
    handle.remove()
    assert seen == [(5, 6, 16, 16)] * 2 and close([got], [ref]) < 1e-13
    assert len(fused_calls) == 3  # the hooked block ran as its modules


@pytest.mark.parametrize("strategy", ["loop", "threads"])
def test_meta_gradient_of_the_fused_model_equals_torch(strategy, fused_calls):
    """Second order, two inner steps, running statistics on: the loop and threads through the
    fused copy against the loop on torch's kernels (float64)."""
    torch.manual_seed(0)
    model = conv4(1, 3, 6, 16, pool=True, bn_track_running_stats=True).double()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    y = torch.arange(3)
    batch = TaskBatch(torch.rand(3, 3, 1, 16, 16, generator=g, dtype=torch.float64), y.repeat(3, 1),
                      torch.rand(3, 9, 1, 16, 16, generator=g, dtype=torch.float64),
                      y.repeat_interleave(3).repeat(3, 1))
    grads, states = [], []
    for fast in (True, False):
        model.load_state_dict(start)
        kernels.set_enabled(fast)
        learner = mamlkit.MAML(model, strategy=strategy if fast else "loop", inner_lr=0.3, inner_steps=2,
                               loss_fn="cross_entropy")
        for p in learner.meta_parameters().values():
            p.grad = None
        learner.meta_backward(batch)
        grads.append(flat(p.grad for p in learner.meta_parameters().values()))
        states.append(flat(v.double() for v in model.state_dict().values()))
    assert "conv_batch_norm_relu_max_pool" in fused_calls and "batch_norm_relu_max_pool" in fused_calls
    assert close([grads[0]], [grads[1]]) < 1e-10 and close([states[0]], [states[1]]) < 1e-12
