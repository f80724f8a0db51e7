"""Exactness of the vmap strategy across the layer types users put in models.

torch.vmap's batching rules for the fused normalisation kernels give wrong second-order
meta-gradients (about 1e-2 relative). mamlkit's ExactNorms mode fixes them; these tests check
every strategy against the per-task loop and against finite differences, in float64.
"""

import pytest
import torch
from helpers import finite_difference_grad, flat
from torch import nn

import mamlkit
from mamlkit.engine.inner import make_task_fn
from mamlkit.engine.rules import sgd
from mamlkit.exec.strategies import map_tasks
from mamlkit.tasks import TaskBatch


class TorchLevelNorms(nn.Module):
    """Calls torch.batch_norm / torch.instance_norm / torch.layer_norm directly (not through F)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3, 4))
        self.bias = nn.Parameter(torch.zeros(3, 4))
        self.ln_weight = nn.Parameter(torch.ones(5))
        self.ln_bias = nn.Parameter(torch.zeros(5))

    def forward(self, x):
        x = torch.batch_norm(x, self.weight[0], self.bias[0], None, None, True, 0.1, 1e-5, False)
        x = torch.instance_norm(x, self.weight[1], self.bias[1], None, None, True, 0.1, 1e-5, False)
        return torch.layer_norm(x, [5], self.ln_weight, self.ln_bias, 1e-5, False)


LAYERS = {
    "torch_level_norms": TorchLevelNorms,
    "batchnorm2d": lambda: nn.BatchNorm2d(4, track_running_stats=False),
    "batchnorm2d_running": lambda: nn.BatchNorm2d(4),  # train mode: batch statistics
    "instancenorm2d": lambda: nn.InstanceNorm2d(4, affine=True),
    "layernorm": lambda: nn.LayerNorm([4, 5, 5]),
    "groupnorm": lambda: nn.GroupNorm(2, 4),
    "localresponsenorm": lambda: nn.LocalResponseNorm(2),
    "maxpool": lambda: nn.MaxPool2d(2, stride=1, padding=0),
    "avgpool": lambda: nn.AvgPool2d(2, stride=1),
    "dropout_eval": lambda: nn.Dropout(0.0),
}


def model_with(layer: str) -> nn.Module:
    torch.manual_seed(0)
    body = LAYERS[layer]()
    with torch.no_grad():
        for p in body.parameters():  # non-trivial affine weights
            p.add_(0.3 * torch.randn_like(p))
    side = 5 if "pool" not in layer else 4
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), body, nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * side * side, 3)).double()


def episode(tasks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tasks, 12, 1, 5, 5, generator=g, dtype=torch.float64)
    y = torch.arange(3).repeat(4)[None].expand(tasks, -1)
    return TaskBatch(x[:, :6], y[:, :6], x[:, 6:], y[:, 6:])


def meta_grad(model, batch, strategy, steps=2):
    learner = mamlkit.MAML(model, inner_lr=0.3, inner_steps=steps, loss_fn="cross_entropy", strategy=strategy)
    model.zero_grad()
    learner.meta_loss(batch)[0].backward()
    return flat(p.grad for p in model.parameters()), learner


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_vmap_second_order_is_exact_for_every_layer(layer):
    batch = episode()
    model = model_with(layer)
    g_vmap, learner = meta_grad(model, batch, "vmap")
    g_loop, _ = meta_grad(model, batch, "loop")
    assert torch.allclose(g_vmap, g_loop, rtol=1e-10, atol=1e-12), (g_vmap - g_loop).abs().max()
    # FD on the first conv's bias, the layer's own parameters and the head's bias keeps the test cheap
    sub = [model[0].bias, *model[1].parameters(), model[4].bias]
    numeric = finite_difference_grad(lambda: learner.meta_loss(batch)[0], sub)
    g_sub = flat(p.grad for p in sub)
    assert torch.allclose(g_sub, numeric, rtol=1e-5, atol=1e-8), (g_sub - numeric).abs().max()


def test_native_vmap_batch_norm_is_inexact_without_the_fix():
    """Guards the reason ExactNorms exists: if torch fixes the batching rule, this test says so."""
    model = model_with("batchnorm2d")
    batch = episode()
    params = dict(model.named_parameters())
    fn = make_task_fn(model, params, {}, loss_fn=torch.nn.functional.cross_entropy, rule=sgd(0.3), steps=2,
                      first_order=False)
    args = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    native = torch.vmap(fn)(*args)[0].mean()
    g_native = flat(torch.autograd.grad(native, list(params.values())))
    g_exact = flat(torch.autograd.grad(map_tasks(fn, batch, mamlkit.exec.strategies.Strategy(False))[0].mean(),
                                       list(params.values())))
    rel = ((g_native - g_exact).norm() / g_exact.norm()).item()
    if rel < 1e-9:
        pytest.skip("this torch batches native batch_norm exactly at second order; ExactNorms is harmless")
    assert rel > 1e-6


def test_conv4_with_batchnorm_vmap_equals_loop():
    from mamlkit.models import conv4

    torch.manual_seed(0)
    model = conv4(in_channels=1, out_features=3, hidden=8, image_size=12).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 1, 12, 12, generator=g, dtype=torch.float64)
    y = torch.arange(3).repeat(4)[None].expand(2, -1)
    batch = TaskBatch(x[:, :6], y[:, :6], x[:, 6:], y[:, 6:])
    g_vmap, _ = meta_grad(model, batch, "vmap", steps=1)
    g_loop, _ = meta_grad(model, batch, "loop", steps=1)
    assert torch.allclose(g_vmap, g_loop, rtol=1e-10, atol=1e-12)


def test_running_statistics_are_never_written():
    model = model_with("batchnorm2d_running")
    before = {k: v.clone() for k, v in model.named_buffers()}
    for strategy in ("vmap", "loop"):
        meta_grad(model, episode(), strategy)
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), k
