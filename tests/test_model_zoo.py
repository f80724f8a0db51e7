"""The model zoo: MAML's meta-gradient for the models people bring, under every strategy, against a plain
``torch.autograd`` loop (create_graph, torch's math attention kernel) in float64.

Each family is tiny (a few hundred parameters, 2 tasks, 2 inner steps), so a case runs in about a second.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import mamlkit
from mamlkit.engine.exact import ExactOpsError, recurrent
from mamlkit.tasks import TaskBatch

TOL = 1e-10
INNER_LR, STEPS, TASKS, SHOTS = 0.1, 2, 2, 4


# --- the models --------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Feature embedding, two pre-norm nn.TransformerEncoder layers, mean-pooled regression head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 1)

    def forward(self, x):  # [B, L, 3] -> [B, 1]
        return self.head(self.encoder(self.embed(x)).mean(1))


class Attention(nn.Module):
    """nn.MultiheadAttention both ways (with and without weights) and an nn.TransformerDecoderLayer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.decoder = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        h = self.embed(x)
        a, _ = self.attn(h, h, h, need_weights=False)  # F.scaled_dot_product_attention inside
        b, _ = self.attn(a, h, h)  # explicit softmax(QKᵀ)V, averaged weights returned
        return self.head(self.decoder(b, h).mean(1))


def bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return mamlkit.models.hf_classifier(transformers.BertModel(config), out_features=3, pooling="first")


def gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=20, n_embd=8, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    return mamlkit.models.hf_classifier(transformers.GPT2Model(config), out_features=3, pooling="last")


class LSTM(nn.Module):
    """Two stacked LSTM layers with projections; the last hidden state → linear."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 6, num_layers=2, batch_first=True, proj_size=4)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class GRU(nn.Module):
    """A bidirectional GRU (time-major) into an nn.RNN with ReLU; both final states → linear."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 5, bidirectional=True)
        self.rnn = nn.RNN(10, 4, nonlinearity="relu", bias=False)
        self.head = nn.Linear(4 + 10, 1)

    def forward(self, x):
        out, h = self.gru(x.transpose(0, 1))
        _, h2 = self.rnn(out)
        return self.head(torch.cat([h2[-1], h.transpose(0, 1).flatten(1)], -1))


class ResBlock(nn.Module):
    """ResNet-12's block (Lee et al. 2019, MetaOptNet): 3 × [conv3×3, BN, LeakyReLU], a 1×1 shortcut, max-pool."""

    def __init__(self, cin, cout):
        super().__init__()
        self.body = nn.Sequential(*[m for i in range(3) for m in (
            nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout, track_running_stats=False), nn.LeakyReLU(0.1))][:-1])
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False),
                                      nn.BatchNorm2d(cout, track_running_stats=False))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        return self.pool(F.leaky_relu(self.body(x) + self.shortcut(x), 0.1))


class ResNet12(nn.Module):
    def __init__(self, widths=(3, 4, 4, 5)):
        super().__init__()
        self.blocks = nn.Sequential(*[ResBlock(a, b) for a, b in zip((3, *widths), widths)])
        self.head = nn.Linear(widths[-1], 3)

    def forward(self, x):  # [B, 3, 16, 16] -> [B, 3]
        return self.head(self.blocks(x).mean((2, 3)))


class ViT(nn.Module):
    """A vision transformer (Dosovitskiy et al. 2021): 4×4 patches, class token, learned positions."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 8) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 5, 8) * 0.1)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # [B, 3, 8, 8] -> [B, 3]
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1) + self.pos
        return self.head(self.norm(self.encoder(tokens))[:, 0])


class UnusedFrozen(nn.Module):
    """A frozen input layer (requires_grad=False), an adapted body, and a layer the forward never calls."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(3, 6).requires_grad_(False)
        self.body = nn.Linear(6, 6)
        self.unused = nn.Linear(6, 6)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.body(torch.tanh(self.frozen(x)))))


class Tied(nn.Module):
    """Embedding and output layer share one weight (Press & Wolf 2017)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 6)
        self.mix = nn.Linear(6, 6)
        self.out = nn.Linear(6, 7)
        self.out.weight = self.embed.weight

    def forward(self, ids):  # [B, L] -> [B, 7]
        return self.out(torch.tanh(self.mix(self.embed(ids).mean(1))))


def _seq(n):
    return torch.randn(n, 4, 3)


def _ids(n):
    return torch.randint(0, 7, (n, 5))


def _image(side):
    return lambda n: torch.randn(n, 3, side, side)


# name: (build, inputs of n examples, loss, number of classes or 0 for regression)
ZOO = {
    "transformer-encoder": (Encoder, _seq, "mse", 0),
    "multihead-attention": (Attention, _seq, "mse", 0),
    "bert": (bert, _ids, "cross_entropy", 3),
    "gpt2": (gpt2, _ids, "cross_entropy", 3),
    "lstm": (LSTM, _seq, "mse", 0),
    "gru-rnn": (GRU, _seq, "mse", 0),
    "resnet12": (ResNet12, _image(16), "cross_entropy", 3),
    "vit": (ViT, _image(8), "cross_entropy", 3),
    "unused-frozen": (lambda: UnusedFrozen(), lambda n: torch.randn(n, 3), "mse", 0),
    "weight-tying": (Tied, _ids, "cross_entropy", 7),
}


def make(name: str, seed: int = 0) -> tuple[nn.Module, TaskBatch, str]:
    build, inputs, loss, classes = ZOO[name]
    torch.manual_seed(seed)
    model = build().double()
    g = torch.Generator().manual_seed(seed + 1)

    def xs(n):
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31, (), generator=g)))
            x = inputs(n)
        return x.double() if x.is_floating_point() else x

    def ys(n):
        if classes:
            return torch.randint(0, classes, (n,), generator=g)
        return torch.randn(n, 1, generator=g, dtype=torch.float64)

    batch = TaskBatch(torch.stack([xs(SHOTS) for _ in range(TASKS)]), torch.stack([ys(SHOTS) for _ in range(TASKS)]),
                      torch.stack([xs(SHOTS) for _ in range(TASKS)]), torch.stack([ys(SHOTS) for _ in range(TASKS)]))
    return model, batch, loss


# --- the reference: a plain autograd loop ------------------------------------------------------------------


def reference(model: nn.Module, batch: TaskBatch, loss_name: str, first_order: bool, adapt=None
              ) -> dict[str, torch.Tensor]:
    """Meta-gradient of the mean query loss after STEPS SGD steps (on the parameters ``adapt`` passes), task by
    task, with torch.autograd."""
    loss_fn = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}[loss_name]
    meta = {k: p for k, p in model.named_parameters() if p.requires_grad}
    total = 0.0
    with sdpa_kernel([SDPBackend.MATH]):
        for t in range(batch.num_tasks):
            fast = {k: p for k, p in meta.items() if adapt is None or adapt(k)}
            for _ in range(STEPS):
                out = torch.func.functional_call(model, fast, (batch.support_x[t],), strict=False)
                grads = torch.autograd.grad(loss_fn(out, batch.support_y[t]), list(fast.values()),
                                            create_graph=not first_order, allow_unused=True)
                fast = {k: v if g is None else v - INNER_LR * g for (k, v), g in zip(fast.items(), grads)}
            out = torch.func.functional_call(model, fast, (batch.query_x[t],), strict=False)
            total = total + loss_fn(out, batch.query_y[t])
        grads = torch.autograd.grad(total / batch.num_tasks, list(meta.values()), allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(meta.items(), grads)}


def meta_grad(model: nn.Module, batch: TaskBatch, loss: str, first_order: bool, strategy: str, adapt=None
              ) -> dict[str, torch.Tensor]:
    learner = mamlkit.MAML(model, inner_lr=INNER_LR, inner_steps=STEPS, first_order=first_order, loss_fn=loss,
                           strategy=strategy, adapt_filter=adapt)
    if strategy == "auto":  # as the trainer does: the candidates run the first batch, the fastest is kept
        learner.executor.settle(learner.work(), batch, iterations=10, say=lambda _: None)
    for p in model.parameters():
        p.grad = None
    learner.meta_backward(batch)
    return {k: torch.zeros_like(p) if p.grad is None else p.grad for k, p in model.named_parameters()
            if p.requires_grad}


def rel_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys()
    g = torch.cat([got[k].reshape(-1) for k in want])
    w = torch.cat([want[k].reshape(-1) for k in want])
    return ((g - w).abs().max() / w.abs().max()).item()


STRATEGIES = ["auto", "vmap", "loop", "threads"]


@pytest.mark.parametrize("order", ["second", "first"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(ZOO))
def test_meta_gradient_matches_autograd_reference(name, strategy, order):
    model, batch, loss = make(name)
    want = reference(model, batch, loss, first_order=order == "first")
    assert torch.cat([w.reshape(-1) for w in want.values()]).abs().max() > 0
    got = meta_grad(model, batch, loss, order == "first", strategy)
    assert rel_error(got, want) < TOL


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lora_adapters_on_a_frozen_bert(strategy):
    """LoRA (Hu et al. 2022) through peft: the pretrained weights frozen, the adapters adapt (--adapt '*lora_*'),
    the head is meta-learned only."""
    peft = pytest.importorskip("peft")
    from mamlkit.engine.inner import name_filter

    model, batch, loss = make("bert")
    torch.manual_seed(1)
    config = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["query", "value"],
                             init_lora_weights=False)  # random A and B: both get a meta-gradient at once
    model.backbone = peft.get_peft_model(model.backbone, config).double()
    adapt = name_filter(["*lora_*"])
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in k or k.startswith("head.") for k in trainable)
    want = reference(model, batch, loss, first_order=False, adapt=adapt)
    got = meta_grad(model, batch, loss, False, strategy, adapt=adapt)
    assert rel_error(got, want) < TOL
    assert all(p.grad is None for k, p in model.named_parameters() if not p.requires_grad)


def test_the_second_order_terms_are_there():
    """The matrix would pass for a meta-gradient that ignores the inner Hessian if the two orders agreed."""
    model, batch, loss = make("transformer-encoder")
    second, first = reference(model, batch, loss, False), reference(model, batch, loss, True)
    assert rel_error(first, second) > 1e-4


@pytest.mark.parametrize("name", ["transformer-encoder", "lstm"])
def test_compiled_meta_gradient_matches_reference(name):
    pytest.importorskip("torch._inductor")
    model, batch, loss = make(name)
    want = reference(model, batch, loss, first_order=False)
    try:
        got = meta_grad(model, batch, loss, False, "compile")
    except Exception as err:  # noqa: BLE001 - no C++ compiler for torch.compile on this machine
        if "compiler" in str(err).lower() or "InvalidCxxCompiler" in type(err).__name__:
            pytest.skip(f"torch.compile unavailable: {err}")
        raise
    assert rel_error(got, want) < TOL


# --- unused and frozen parameters --------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_frozen_parameters_stay_frozen_and_unused_ones_get_zero(strategy):
    model, batch, loss = make("unused-frozen")
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    learner = mamlkit.MAML(model, inner_lr=INNER_LR, inner_steps=STEPS, loss_fn=loss, strategy=strategy)
    learner.meta_backward(batch)
    assert model.frozen.weight.grad is None and model.frozen.bias.grad is None
    assert model.unused.weight.grad is None or not model.unused.weight.grad.any()
    assert model.body.weight.grad.abs().max() > 0
    adapted = learner.adapt(batch.support_x[0], batch.support_y[0])
    assert torch.equal(adapted["frozen.weight"], before["frozen.weight"])  # never adapts
    assert torch.equal(adapted["unused.weight"], before["unused.weight"])  # adapts to itself: zero gradient
    assert not torch.equal(adapted["body.weight"], before["body.weight"])


def test_frozen_parameters_get_no_meta_gradient_when_compiled():
    model, batch, loss = make("unused-frozen")
    learner = mamlkit.MAML(model, inner_lr=INNER_LR, inner_steps=1, loss_fn=loss, strategy="compile")
    try:
        learner.meta_backward(batch)
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"torch.compile unavailable: {err}")
    assert model.frozen.weight.grad is None


# --- recurrent layers as cell equations --------------------------------------------------------------------


@pytest.mark.parametrize("module", [
    nn.LSTM(3, 5, num_layers=2, bidirectional=True, batch_first=True),
    nn.LSTM(3, 5, proj_size=2, bias=False),
    nn.GRU(3, 4, num_layers=2, bidirectional=True),
    nn.RNN(3, 4, nonlinearity="tanh", batch_first=True),
    nn.RNN(3, 4, nonlinearity="relu", num_layers=2, bidirectional=True),
])
def test_recurrent_decomposition_equals_the_fused_kernel(module):
    module = module.double()
    x = torch.randn(2, 6, 3, dtype=torch.float64)  # 2 sequences of 6 steps
    if not module.batch_first:
        x = x.transpose(0, 1)
    want = module(x)
    kind = {"LSTM": "lstm", "GRU": "gru"}.get(type(module).__name__) or f"rnn_{module.nonlinearity}"
    dirs = 2 if module.bidirectional else 1
    h_size = module.proj_size or module.hidden_size
    h0 = torch.zeros(module.num_layers * dirs, 2, h_size, dtype=torch.float64)
    c0 = torch.zeros(module.num_layers * dirs, 2, module.hidden_size, dtype=torch.float64)
    hx = (h0, c0) if kind == "lstm" else h0
    got = recurrent(kind, x, hx, module._flat_weights, module.bias, module.num_layers, 0.0, False,
                    module.bidirectional, module.batch_first)
    assert torch.allclose(got[0], want[0], atol=1e-13, rtol=0)
    states = want[1] if kind == "lstm" else (want[1],)
    for g, w in zip(got[1:], states):
        assert torch.allclose(g, w, atol=1e-13, rtol=0)


class Packed(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        packed = nn.utils.rnn.pack_padded_sequence(x, [x.shape[1]] * len(x), batch_first=True)
        return self.head(self.rnn(packed)[1][-1])


def test_packed_sequences_are_refused_by_vmap_with_a_strategy_that_works():
    torch.manual_seed(0)
    model = Packed().double()
    batch = TaskBatch(*(torch.randn(2, 4, 5, 3, dtype=torch.float64) if i % 2 == 0
                        else torch.randn(2, 4, 1, dtype=torch.float64) for i in range(4)))
    learner = mamlkit.MAML(model, inner_lr=INNER_LR, inner_steps=1, loss_fn="mse", strategy="vmap")
    message = r"nn\.GRU \(GRU\(3, 4, batch_first=True\)\) with a PackedSequence.*--strategy loop or threads"
    with pytest.raises(ExactOpsError, match=message):
        learner.meta_backward(batch)
    loop = mamlkit.MAML(model, inner_lr=INNER_LR, inner_steps=1, loss_fn="mse", strategy="loop")
    loop.meta_backward(batch)
    assert all(math.isfinite(p.grad.abs().sum().item()) for p in model.parameters())


def test_auto_drops_vmap_for_a_packed_sequence_and_runs_the_loop(caplog):
    torch.manual_seed(0)
    model = Packed().double()
    batch = TaskBatch(*(torch.randn(2, 4, 5, 3, dtype=torch.float64) if i % 2 == 0
                        else torch.randn(2, 4, 1, dtype=torch.float64) for i in range(4)))
    said = []
    learner = mamlkit.MAML(model, inner_lr=INNER_LR, inner_steps=1, loss_fn="mse", strategy="auto")
    learner.executor.settle(learner.work(), batch, iterations=10, say=said.append)
    assert learner.executor.strategy.name == "loop"
    assert any("strategy vmap unavailable for this model (ExactOpsError: nn.GRU" in s for s in said), said
    learner.meta_backward(batch)
    loop = mamlkit.MAML(model, inner_lr=INNER_LR, inner_steps=1, loss_fn="mse", strategy="loop")
    grads = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    loop.meta_backward(batch)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def test_attention_rerouting_is_logged_once(caplog):
    from mamlkit.engine import exact

    exact._ATTENTION_LOGGED = False
    with caplog.at_level("INFO", logger="mamlkit"):
        for _ in range(2):
            model, batch, loss = make("transformer-encoder")
            mamlkit.MAML(model, inner_lr=INNER_LR, inner_steps=1, loss_fn=loss, strategy="loop").meta_backward(batch)
    notes = [r.getMessage() for r in caplog.records if "math kernel" in r.getMessage()]
    assert len(notes) == 1 and "MultiheadAttention" in notes[0]
