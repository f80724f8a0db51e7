"""Bring your own model to the CLI: --model package.module:factory, --model-args, a Hugging Face folder, --adapt."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import pytest
import torch

from mamlkit import checkpoint
from mamlkit.engine.inner import check_patterns, name_filter

FAST = ["--iterations", "3", "--meta-batch", "2", "--log-every", "1", "--val-every", "3", "--val-tasks", "2",
        "--eval-tasks", "4", "--eval-query", "5", "--eval-steps", "0", "1", "--eval-shots", "5",
        "--no-compare-pretrained", "--no-progress", "--no-tensorboard", "--strategy", "loop"]

FACTORY = textwrap.dedent("""
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(1, width), nn.Tanh())
            self.head = nn.Linear(width, 1)

        def forward(self, x):
            return self.head(self.body(x))


    def make(width=8):
        return Net(width)


    def wrong_shape():
        return nn.Linear(1, 3)
""")


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield pkg
    for name in [m for m in sys.modules if m.startswith("userpkg")]:
        del sys.modules[name]


def test_factory_model_trains_and_the_checkpoint_records_it(cli, tmp_path, user_package):
    code, out, err = cli("train", "sinusoid", "--model", "userpkg.nets:make", "--model-args", '{"width": 12}',
                         "--out-dir", str(tmp_path / "runs"), *FAST)
    assert code == 0, err
    run = tmp_path / "runs" / "sinusoid-maml"
    tensors, state = checkpoint.load(run / "checkpoint.safetensors")
    assert state["model_spec"] == {"name": "factory", "factory": "userpkg.nets:make", "args": {"width": 12}}
    assert tensors["meta/body.0.weight"].shape == (12, 1)  # the user's module, not the default MLP (40, 1)
    code, out, err = cli("eval", str(run), "--eval-tasks", "4", "--overwrite", "--model", "userpkg.nets:make")
    assert code == 0, err


def test_eval_of_a_factory_that_cannot_be_imported_exits_2(cli, tmp_path, user_package):
    code, _, err = cli("train", "sinusoid", "--model", "userpkg.nets:make", "--out-dir", str(tmp_path / "runs"), *FAST)
    assert code == 0, err
    (user_package / "nets.py").unlink()
    del sys.modules["userpkg.nets"]
    code, _, err = cli("eval", str(tmp_path / "runs" / "sinusoid-maml"), "--model", "userpkg.nets:make")
    assert code == 2
    assert "cannot import 'userpkg.nets'" in err and "PYTHONPATH" in err and "Traceback" not in err
    (tmp_path / "s.csv").write_text("x,y\n0.1,0.2\n0.5,0.4\n")
    (tmp_path / "q.csv").write_text("x\n0.3\n")
    code, _, err = cli("adapt", str(tmp_path / "runs" / "sinusoid-maml"), "--support", str(tmp_path / "s.csv"),
                       "--query", str(tmp_path / "q.csv"), "--trust-model-code")
    assert code == 2 and "cannot import 'userpkg.nets'" in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--model", "nopkg_here.nets:make"], "cannot import 'nopkg_here.nets'"),
    (["--model", "userpkg.nets:missing"], "has no 'missing'"),
    (["--model", "userpkg.nets:make", "--model-args", '{"depth": 2}'], "unexpected keyword argument 'depth'"),
    (["--model", "userpkg.nets:make", "--model-args", "[1, 2]"], "model_args must be a JSON object"),
    (["--model-args", '{"width": 3}'], "--model-args applies to --model package.module:factory"),
    (["--model", "conv4"], "this task builds mamlkit's 'mlp'"),
    (["--model", "no-such-thing"], "neither a package.module:factory"),
    (["--model", "userpkg.nets:wrong_shape"], "maps inputs [10, 1] to [10, 3]; this task needs [10, 1]"),
    (["--adapt", "nothing.*"], "--adapt 'nothing.*' matches no parameter"),
    (["--adapt", "head.*", "--algo", "anil"], "--adapt works with --algo maml"),
])
def test_a_model_that_cannot_be_built_is_refused(cli, tmp_path, user_package, args, message):
    code, _, err = cli("train", "sinusoid", *args, "--out-dir", str(tmp_path / "runs"), *FAST)
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err


def test_adapt_patterns_choose_the_adapted_parameters(cli, tmp_path, user_package):
    code, _, err = cli("train", "sinusoid", "--model", "userpkg.nets:make", "--adapt", "head.*", "--adapt",
                       r"body\.0\.b.*", "--out-dir", str(tmp_path / "runs"), *FAST)
    assert code == 0, err
    _, state = checkpoint.load(tmp_path / "runs" / "sinusoid-maml" / "checkpoint.safetensors")
    assert state["config"]["adapt"] == ["head.*", r"body\.0\.b.*"]
    from mamlkit.loop import train

    learner = train.load_trainer(tmp_path / "runs" / "sinusoid-maml", model="userpkg.nets:make").learner
    x, y = torch.linspace(-1, 1, 5).unsqueeze(1), torch.ones(5, 1)
    before = dict(learner.model.named_parameters())
    after = learner.adapt(x, y)
    changed = {k for k in before if not torch.equal(after[k], before[k].detach())}
    assert changed == {"head.weight", "head.bias", "body.0.bias"}


def test_name_filter_takes_globs_and_regexes():
    names = ["encoder.layer.4.attn.weight", "encoder.layer.5.attn.weight", "head.weight", "pooler.dense.bias"]
    assert [n for n in names if name_filter(["*.layer.5.*", "head.*"])(n)] == names[1:3]
    assert [n for n in names if name_filter([r"encoder\.layer\.[45]\..*"])(n)] == names[:2]
    assert name_filter([]) is None
    with pytest.raises(ValueError, match="'decoder.*' matches no parameter"):
        check_patterns(names, ["head.*", "decoder.*"])


# --- Hugging Face ------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_bert(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "tiny-bert")
    return tmp_path / "tiny-bert"


def test_hugging_face_folder_trains_offline_adapting_the_last_block(cli, tmp_path, tiny_bert, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = cli("train", "sinusoid", "--model", str(tiny_bert), "--adapt", "head.*",
                         "--adapt", "backbone.encoder.layer.1.*", "--out-dir", str(tmp_path / "runs"), *FAST)
    assert code == 0, err
    run = tmp_path / "runs" / "sinusoid-maml"
    tensors, state = checkpoint.load(run / "checkpoint.safetensors")
    spec = state["model_spec"]
    assert spec["name"] == "hf" and spec["path"] == str(tiny_bert) and spec["out_features"] == 1
    from safetensors.torch import load_file

    saved = load_file(tiny_bert / "model.safetensors")
    key = next(k for k in saved if k.endswith("embeddings.word_embeddings.weight"))
    # the encoder starts from the saved weights: the word embeddings, which features never reach, keep them
    assert torch.equal(tensors["meta/backbone.embeddings.word_embeddings.weight"].float()[5:], saved[key][5:])
    code, _, err = cli("eval", str(run), "--eval-tasks", "4", "--overwrite")
    assert code == 0, err


def test_missing_hugging_face_model_is_refused(cli, tmp_path):
    pytest.importorskip("transformers")
    code, _, err = cli("train", "sinusoid", "--model", "hf:nobody/no-such-model", "--out-dir", str(tmp_path), *FAST)
    assert code == 2  # a message, not a crash (the hub's client may log warnings of its own before it)
    assert "--model nobody/no-such-model: no Hugging Face model there or in the local cache" in err
    assert "requesting" not in err  # found missing locally, without asking the hub


def test_model_args_are_recorded_in_the_config(tmp_path):
    from mamlkit.config import TrainConfig

    cfg = TrainConfig(model="userpkg.nets:make", model_args=json.dumps({"width": 4}))
    assert cfg.model_kwargs == {"width": 4}


# --- models that vmap cannot run, and input widths the weights do not tell -------------------------------

ODD_MODELS = textwrap.dedent("""
    import torch
    from torch import nn


    class LSTMRegressor(nn.Module):
        # aten::lstm has no batching rule: torch.func.vmap alone cannot run it
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(1, 8, batch_first=True)
            self.head = nn.Linear(8, 1)

        def forward(self, x):
            out, _ = self.rnn(x.unsqueeze(1))
            return self.head(out[:, -1])


    class Branchy(nn.Module):
        # reads a tensor's value in Python: data-dependent control flow, which vmap refuses
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(1, 16)
            self.head = nn.Linear(16, 1)

        def forward(self, x):
            h = torch.tanh(self.body(x))
            if h.mean() > 0:
                h = h * 2
            return self.head(h)


    class FiLMFirst(nn.Module):
        # a 2-D table declared before the first layer: its width (16) is not the input's (1)
        def __init__(self):
            super().__init__()
            self.film = nn.Parameter(torch.ones(4, 16))
            self.body = nn.Linear(1, 16)
            self.head = nn.Linear(16, 1)

        def forward(self, x):
            return self.head(torch.tanh(self.body(x)) * self.film[0])


    def lstm():
        return LSTMRegressor()


    def branchy():
        return Branchy()


    def dropout():
        # in train mode: random draws in every forward, which vmap refuses in its default randomness mode
        return nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1)).train()


    def film_first():
        return FiLMFirst()
""")


@pytest.fixture
def odd_models(user_package):
    (user_package / "odd.py").write_text(ODD_MODELS)
    return user_package


def _support_and_query(tmp_path):
    (tmp_path / "s.csv").write_text("x,y\n0.1,0.2\n0.5,0.4\n1.0,0.8\n-0.5,-0.4\n")
    (tmp_path / "q.csv").write_text("x\n0.3\n0.7\n")
    return str(tmp_path / "s.csv"), str(tmp_path / "q.csv")


@pytest.mark.parametrize("factory", ["lstm", "branchy", "dropout"])
def test_a_model_vmap_cannot_run_trains_evaluates_and_adapts(cli, tmp_path, odd_models, factory):
    """Training chooses a strategy that runs the model (auto); the report, `mamlkit eval` and `mamlkit adapt`
    run on the same executor, not on bare vmap, which cannot run these models."""
    model = f"userpkg.odd:{factory}"
    code, out, err = cli("train", "sinusoid", "--model", model, "--out-dir", str(tmp_path / "runs"), *FAST,
                         "--strategy", "auto")
    assert code == 0, err
    assert "Traceback" not in err
    run = tmp_path / "runs" / "sinusoid-maml"
    record = json.loads((run / "eval.json").read_text())
    cells = [c for by_k in record["mse"].values() for by_s in by_k.values() for c in by_s.values()]
    assert len(cells) == 2 and all(isinstance(c["mean"], float) and c["mean"] >= 0 for c in cells), cells
    code, _, err = cli("eval", str(run), "--eval-tasks", "4", "--overwrite", "--model", model)
    assert code == 0, err
    support, query = _support_and_query(tmp_path)
    code, out, err = cli("adapt", str(run), "--support", support, "--query", query, "--model", model)
    assert code == 0, err
    rows = out.strip().splitlines()
    assert rows[0] == "x0,prediction" and len(rows) == 3
    assert all(math.isfinite(float(r.split(",")[1])) for r in rows[1:])


def test_adapt_reads_the_input_width_the_checkpoint_records(cli, tmp_path, odd_models):
    """A 2-D table declared first (16 wide) is not the input (1 column): the width is recorded at training."""
    model = "userpkg.odd:film_first"
    code, _, err = cli("train", "sinusoid", "--model", model, "--out-dir", str(tmp_path / "runs"), *FAST)
    assert code == 0, err
    run = tmp_path / "runs" / "sinusoid-maml"
    _, state = checkpoint.load(run / "checkpoint.safetensors")
    assert state["input"] == {"type": "vector", "features": 1, "shape": [1], "dtype": "float32", "tokens": False}
    support, query = _support_and_query(tmp_path)
    code, out, err = cli("adapt", str(run), "--support", support, "--query", query, "--model", model)
    assert code == 0, err
    assert len(out.strip().splitlines()) == 3


def test_hugging_face_model_adapts_from_a_csv_of_its_input_width(cli, tmp_path, tiny_bert, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = cli("train", "sinusoid", "--model", str(tiny_bert), "--out-dir", str(tmp_path / "runs"), *FAST)
    assert code == 0, err
    run = tmp_path / "runs" / "sinusoid-maml"
    support, query = _support_and_query(tmp_path)
    code, out, err = cli("adapt", str(run), "--support", support, "--query", query)
    assert code == 0, err
    assert [r.split(",")[0] for r in out.strip().splitlines()] == ["x0", "0.3", "0.7"]
