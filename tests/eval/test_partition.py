"""The paper's 9-client layout: sizes, batch sizes, disjointness, IID vs Dirichlet, determinism."""
from __future__ import annotations

import numpy as np
import pytest

from gradguard.eval.partition import PAPER_LAYOUT, ClientLayout, partition_clients, scaled_sizes


def _labels(n: int = 3000, p1: float = 0.7, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p1).astype(np.int64)


def test_paper_layout_at_full_scale():
    clients = partition_clients(_labels(), seed=0)
    assert [c.client_id for c in clients] == [f"client{i}" for i in range(1, 10)]
    assert [len(c) for c in clients] == [8, 32, 128, 512, 8, 32, 128, 512, 1]
    assert [c.batch_size for c in clients] == [4, 4, 4, 4, 8, 8, 8, 8, 1]
    every = [i for c in clients for i in c.indices]
    assert len(every) == len(set(every)) == 1361
    assert 0 <= min(every) and max(every) < 3000


def test_scale_shrinks_datasets_and_caps_batch_sizes():
    assert scaled_sizes(PAPER_LAYOUT, 0.25) == [2, 8, 32, 128, 2, 8, 32, 128, 1]
    assert scaled_sizes(PAPER_LAYOUT, 2.0)[-1] == 1  # the single-image client stays single
    clients = partition_clients(_labels(), scale=0.25)
    assert [len(c) for c in clients] == [2, 8, 32, 128, 2, 8, 32, 128, 1]
    assert [c.batch_size for c in clients] == [2, 4, 4, 4, 2, 8, 8, 8, 1]
    assert [len(c) for c in partition_clients(_labels(), scale=0.001)] == [1] * 9


def test_a_split_too_small_for_the_layout_is_refused_with_the_largest_scale():
    with pytest.raises(ValueError, match=r"needs 1361 images but the split has 1000; lower scale to at most 0\.73"):
        partition_clients(_labels(1000))
    with pytest.raises(ValueError, match="scale must be > 0"):
        partition_clients(_labels(), scale=0)


def test_same_seed_same_partition_other_seed_other_partition():
    for distribution in ("iid", "dirichlet"):
        a = partition_clients(_labels(), distribution=distribution, seed=3)
        b = partition_clients(_labels(), distribution=distribution, seed=3)
        c = partition_clients(_labels(), distribution=distribution, seed=4)
        assert a == b
        assert a != c


def _class1_share(labels, clients):
    return np.array([labels[list(c.indices)].mean() for c in clients if len(c) >= 128])


def test_iid_clients_follow_the_split_while_dirichlet_clients_are_skewed():
    labels = _labels()
    iid = _class1_share(labels, partition_clients(labels, distribution="iid", seed=0))
    skewed = _class1_share(labels, partition_clients(labels, distribution="dirichlet", alpha=0.1, seed=0))
    assert np.abs(iid - labels.mean()).max() < 0.1
    assert np.abs(skewed - labels.mean()).mean() > 0.2


def test_dirichlet_tops_up_from_other_classes_when_one_runs_out():
    labels = np.zeros(1400, dtype=np.int64)
    labels[:40] = 1  # class 1 can fill at most 40 of the 1361 places
    clients = partition_clients(labels, distribution="dirichlet", alpha=0.05, seed=1)
    every = [i for c in clients for i in c.indices]
    assert [len(c) for c in clients] == [8, 32, 128, 512, 8, 32, 128, 512, 1]
    assert len(set(every)) == 1361


def test_layout_validation():
    with pytest.raises(ValueError, match="one batch size per client"):
        ClientLayout(batch_sizes=(4, 4), dataset_sizes=(8,))
    with pytest.raises(ValueError, match="'iid' or 'dirichlet'"):
        partition_clients(_labels(), distribution="label-skew")
