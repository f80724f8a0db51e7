"""The generic N-way K-shot sampler: structure of the episodes, label permutation, determinism."""

from __future__ import annotations

import itertools

import pytest
import torch

from mamlkit.base.batch import task_generator
from mamlkit.tasks.episodes import EpisodeSampler

torch.set_num_threads(1)

C, M = 12, 9


def ids_dataset(c: int = C, m: int = M) -> torch.Tensor:
    """``[c, m, 2, 3]`` int64 encoding (class, example): x[..., 0, 0] = class, x[..., 1, 0] = example."""
    data = torch.zeros(c, m, 2, 3, dtype=torch.long)
    data[:, :, 0, :] = torch.arange(c)[:, None, None]
    data[:, :, 1, :] = torch.arange(m)[None, :, None]
    return data


def decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 0, 0], x[..., 1, 0]


def test_episode_structure():
    T, N, K, Q = 40, 5, 3, 4
    sampler = EpisodeSampler(ids_dataset(), N, K, Q, scale=None)
    batch = sampler.sample(T, torch.Generator().manual_seed(1))
    assert batch.support_x.shape == (T, N * K, 2, 3) and batch.query_x.shape == (T, N * Q, 2, 3)
    assert batch.support_y.dtype == torch.long and batch.support_y.shape == (T, N * K)
    s_cls, s_ex = decode(batch.support_x)
    q_cls, q_ex = decode(batch.query_x)
    for t in range(T):
        # labels 0..N-1, K (Q) of each, in label order
        assert batch.support_y[t].tolist() == [j for j in range(N) for _ in range(K)]
        assert batch.query_y[t].tolist() == [j for j in range(N) for _ in range(Q)]
        classes = []
        for j in range(N):
            sc, qc = s_cls[t][batch.support_y[t] == j], q_cls[t][batch.query_y[t] == j]
            # every example of label j comes from one class, in support and query alike
            assert len(set(sc.tolist()) | set(qc.tolist())) == 1
            classes.append(sc[0].item())
            se, qe = s_ex[t][batch.support_y[t] == j], q_ex[t][batch.query_y[t] == j]
            # distinct examples, and support and query disjoint
            assert len(set(se.tolist()) | set(qe.tolist())) == K + Q
        assert len(set(classes)) == N  # distinct classes per task


def test_labels_are_permuted_per_task():
    # With N == C every task holds every class; the class -> label map must be a uniform permutation.
    N = 3
    sampler = EpisodeSampler(ids_dataset(c=N), N, 1, 1, scale=None)
    batch = sampler.sample(600, torch.Generator().manual_seed(0))
    cls, _ = decode(batch.support_x)                     # [T, N]: class of label j
    counts = {p: 0 for p in itertools.permutations(range(N))}
    for row in cls.tolist():
        counts[tuple(row)] += 1
    assert len(counts) == 6 and all(70 <= v <= 130 for v in counts.values()), counts  # 100 expected each


def test_classes_and_examples_cover_uniformly():
    sampler = EpisodeSampler(ids_dataset(), 4, 2, 2, scale=None)
    batch = sampler.sample(3000, torch.Generator().manual_seed(3))
    cls, ex = decode(torch.cat([batch.support_x, batch.query_x], 1))
    c_counts = torch.bincount(cls.flatten(), minlength=C).double()
    e_counts = torch.bincount(ex.flatten(), minlength=M).double()
    # 3000 tasks x 16 images: expected 4000 per class, 5333 per example index; 5 sigma bounds
    assert ((c_counts - 4000).abs() < 5 * 4000 ** 0.5).all(), c_counts
    assert ((e_counts - 48000 / M).abs() < 5 * (48000 / M) ** 0.5).all(), e_counts


def test_deterministic_from_seed_split_index():
    sampler = EpisodeSampler(torch.randint(0, 256, (20, 10, 1, 5, 5), dtype=torch.uint8), 5, 1, 3)
    a = sampler.sample(8, task_generator(0, "train", 7))
    b = sampler.sample(8, task_generator(0, "train", 7))
    c = sampler.sample(8, task_generator(0, "train", 8))
    d = sampler.sample(8, task_generator(0, "val", 7))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert not torch.equal(a.support_x, c.support_x) and not torch.equal(a.support_x, d.support_x)


def test_scale_to_float():
    data = torch.full((6, 4, 1, 2, 2), 255, dtype=torch.uint8)
    batch = EpisodeSampler(data, 3, 1, 2).sample(2, torch.Generator().manual_seed(0))
    assert batch.support_x.dtype == torch.float32 and torch.all(batch.support_x == 1.0)


@pytest.mark.parametrize("n_way,k,q", [(13, 1, 1), (5, 5, 5), (0, 1, 1)])
def test_impossible_episodes_are_rejected(n_way, k, q):
    with pytest.raises(ValueError):
        EpisodeSampler(ids_dataset(), n_way, k, q)
