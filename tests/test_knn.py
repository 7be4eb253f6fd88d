"""Weighted k-NN: equal to a brute-force DINO k-NN written out here, whatever the batching."""

from __future__ import annotations

import math

import pytest
import torch

from vitprobe.errors import ProbeError
from vitprobe.knn import KnnConfig, clipped_k_warnings, knn_evaluate, knn_scores


def brute_force_dino_knn(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    query: torch.Tensor,
    *,
    k: int,
    temperature: float,
    num_classes: int,
) -> list[float]:
    """DINO eval_knn.py, one query at a time: cosine similarity to every train sample, the k most similar
    vote for their class with weight exp(sim / T), votes summed per class."""

    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / math.sqrt(float((v * v).sum()))

    q = unit(query)
    sims = [(float(unit(t) @ q), int(y)) for t, y in zip(train, train_labels, strict=True)]
    sims.sort(key=lambda s: -s[0])
    scores = [0.0] * num_classes
    for sim, label in sims[:k]:
        scores[label] += math.exp(sim / temperature)
    return scores


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(120, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (120,), generator=g)
    test = torch.randn(17, 6, generator=g, dtype=torch.float64)
    test_labels = torch.randint(0, 5, (17,), generator=g)
    return train, labels, test, test_labels


@pytest.mark.parametrize("train_chunk", [7, 50, 1000])
def test_knn_scores_equal_brute_force(train_chunk: int) -> None:
    train, labels, test, _ = data()
    unit = torch.nn.functional.normalize
    ks, temperature = (1, 5, 20), 0.07
    scores = knn_scores(
        unit(train, dim=1),
        labels,
        unit(test, dim=1),
        num_classes=5,
        ks=ks,
        temperature=temperature,
        train_chunk=train_chunk,
    )
    for k in ks:
        for i in range(len(test)):
            expected = brute_force_dino_knn(
                train, labels, test[i], k=k, temperature=temperature, num_classes=5
            )
            torch.testing.assert_close(
                scores[k][i], torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=0
            )


def test_knn_evaluate_top1_top5_equal_brute_force_with_small_batches() -> None:
    train, labels, test, test_labels = data(1)
    ks = (3, 10, 500)  # 500 > 120 train rows: clipped to all of them
    metrics = knn_evaluate(
        train, labels, test, test_labels, num_classes=5, ks=ks, temperature=0.1, batch_size=4, train_chunk=16
    )
    for k in ks:
        hits1 = hits5 = 0
        for i in range(len(test)):
            s = torch.tensor(
                brute_force_dino_knn(train, labels, test[i], k=min(k, 120), temperature=0.1, num_classes=5)
            )
            order = s.argsort(descending=True)
            hits1 += int(order[0] == test_labels[i])
            hits5 += int(test_labels[i] in order[:5])
        assert metrics[k]["top1"] == pytest.approx(hits1 / len(test))
        assert metrics[k]["top5"] == pytest.approx(hits5 / len(test))
    assert metrics[500]["top5"] == 1.0  # five classes: top-5 always hits
    assert [metrics[k]["k_used"] for k in ks] == [3, 10, 120]  # the k that voted, not the one asked for


def test_a_k_beyond_the_train_rows_is_named_in_a_warning() -> None:
    assert clipped_k_warnings((10, 120, 500), 120) == [
        "--k 500 is more than the 120 train rows: k = 120 was used (every train sample votes)"
    ]
    assert clipped_k_warnings((10, 20), 120) == []


def test_knn_config_refuses_bad_values() -> None:
    with pytest.raises(ProbeError):
        KnnConfig(pool="abmilp")
    with pytest.raises(ProbeError):
        KnnConfig(ks=(0,))
    with pytest.raises(ProbeError):
        KnnConfig(temperature=0)
