"""Weighted k-NN: equal to DINO's knn_classifier (written out here) and to a brute-force definition, whatever
the batching; non-finite features are refused with the rows named."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vitprobe.errors import CacheError, ProbeError
from vitprobe.knn import KnnConfig, check_finite, clipped_k_warnings, knn_evaluate, knn_scores, ranked, top_k


def dino_knn_classifier(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int,
    T: float,
    num_classes: int,
    chunk: int,
) -> tuple[float, float]:
    """The reference: `knn_classifier` of facebookresearch/dino eval_knn.py (commit 7c446df), step by step,
    on features its caller L2-normalised (DINO's main does, with nn.functional.normalize).

    For each chunk of test rows: similarities to all train rows by one matmul; the k largest with
    `topk(k, largest=True, sorted=True)`; their labels; a (B·k, C) one-hot of those labels; each neighbour's
    weight exp(sim / T) (computed as sim.clone().div_(T).exp_()); class scores = the one-hot rows times
    their weights, summed over the k neighbours; predictions = `scores.sort(1, True)` indices; top-1 counts
    the first prediction, top-5 the first min(5, k). Returns percentages.
    """
    hits1 = hits5 = 0.0
    bank = train_features.t()  # (D, N)
    for start in range(0, len(test_labels), chunk):
        feats, targets = test_features[start : start + chunk], test_labels[start : start + chunk]
        b = len(targets)
        distances, indices = torch.mm(feats, bank).topk(k, largest=True, sorted=True)  # (b, k)
        retrieved = torch.gather(train_labels.view(1, -1).expand(b, -1), 1, indices)  # (b, k)
        one_hot = torch.zeros(b * k, num_classes)
        one_hot.scatter_(1, retrieved.view(-1, 1), 1)
        weights = distances.clone().div_(T).exp_()
        probs = torch.sum(torch.mul(one_hot.view(b, -1, num_classes), weights.view(b, -1, 1)), 1)  # (b, C)
        _, predictions = probs.sort(1, True)
        correct = predictions.eq(targets.view(-1, 1))
        hits1 += correct.narrow(1, 0, 1).sum().item()
        hits5 += correct.narrow(1, 0, min(5, k)).sum().item()
    return hits1 * 100.0 / len(test_labels), hits5 * 100.0 / len(test_labels)


def clustered(classes: int, seed: int, n_train: int = 600, n_test: int = 200, dim: int = 16) -> tuple:
    """fp32 features around per-class means (DINO's dtype), normalised as DINO's main does."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g)
    y_train = torch.randint(0, classes, (n_train,), generator=g)
    y_test = torch.randint(0, classes, (n_test,), generator=g)
    x_train = means[y_train] + 1.5 * torch.randn(n_train, dim, generator=g)
    x_test = means[y_test] + 1.5 * torch.randn(n_test, dim, generator=g)
    unit = torch.nn.functional.normalize
    return unit(x_train, dim=1), y_train, unit(x_test, dim=1), y_test


@pytest.mark.parametrize("classes", [5, 37, 100, 250])
def test_knn_evaluate_equals_dino_knn_classifier_top1_and_top5(classes: int) -> None:
    """Sixteen settings (4 class counts × k = 1, 3, 10, 20): top-1 and top-5 equal DINO's exactly, also
    where fewer than five classes got votes and DINO's sort orders the tied zero scores."""
    x_train, y_train, x_test, y_test = clustered(classes, seed=classes)
    ks = (1, 3, 10, 20)
    ours = knn_evaluate(
        x_train, y_train, x_test, y_test, num_classes=classes, ks=ks, temperature=0.07, batch_size=64,
        train_chunk=256,
    )
    for k in ks:
        top1, top5 = dino_knn_classifier(x_train, y_train, x_test, y_test, k, 0.07, classes, chunk=50)
        assert 100 * ours[k]["top1"] == pytest.approx(top1, abs=1e-9), k
        assert 100 * ours[k]["top5"] == pytest.approx(top5, abs=1e-9), k


def test_topk_predictions_would_not_match_dino_so_the_reference_test_can_fail() -> None:
    """What the DINO test guards against: `topk` ranks tied zero-vote classes unlike DINO's sort."""
    differs = 0
    for classes in (37, 100, 250):
        x_train, y_train, x_test, y_test = clustered(classes, seed=classes)
        scores = knn_scores(x_train, y_train, x_test, num_classes=classes, ks=(3,), temperature=0.07)[3]
        by_topk = scores.topk(3, dim=1).indices
        by_sort = scores.sort(dim=1, descending=True).indices[:, :3]
        differs += int((by_topk != by_sort).any(dim=1).sum())
    assert differs > 0


@pytest.mark.parametrize(("n", "k"), [(20000, 200), (1000, 10), (1003, 37), (997, 200), (50, 20), (64, 1)])
def test_grouped_top_k_gives_topks_values_and_their_columns(n: int, k: int) -> None:
    """`top_k` selects among the k groups with the largest maxima (n = 1003: 3 tail columns past the last
    group; n = 50 and 64 with k = 1: nothing to skip or one column a group); its values equal topk's."""
    g = torch.Generator().manual_seed(n + k)
    for sims in (torch.randn(40, n, generator=g), torch.randint(0, 30, (40, n), generator=g).float() / 30):
        values, cols = top_k(sims, k)  # the second block: every value is tied with many others
        expected = sims.topk(k, dim=1).values
        assert torch.equal(values, expected)
        assert torch.equal(sims.gather(1, cols), values)  # the columns hold those values
        assert all(len(set(row)) == k for row in cols.tolist())  # k distinct columns per row


def test_grouped_top_k_finds_maxima_crowded_into_one_group() -> None:
    """The k largest values all in one group (columns w·G + g for one g) are still all found."""
    n, k = 4000, 20
    groups = math.isqrt(k * n)  # 282 groups of 14 columns
    sims = torch.zeros(3, n)
    crowded = torch.arange(n // groups) * groups + 5  # every column of group 5
    sims[:, crowded] = torch.linspace(2, 1, len(crowded))
    values, cols = top_k(sims, k)
    assert torch.equal(values, sims.topk(k, dim=1).values)
    assert set(crowded.tolist()) <= set(cols[0].tolist())


def test_ranked_is_the_sort_order_with_and_without_ties() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(200, 12, generator=g)
    scores[:80, 6:] = 0  # classes nobody voted for: tied zeros
    scores[100:120, 3] = scores[100:120, 1]  # a tie between voted classes
    scores[150:, :] = 0.5  # every class tied
    for width in (1, 3, 5, 12):
        assert torch.equal(ranked(scores, width), scores.sort(dim=1, descending=True).indices[:, :width])


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
            hits5 += int(test_labels[i] in order[: min(5, k)])  # DINO: top-5 of k < 5 is top-k
        assert metrics[k]["top1"] == pytest.approx(hits1 / len(test))
        assert metrics[k]["top5"] == pytest.approx(hits5 / len(test))
    assert metrics[500]["top5"] == 1.0  # five classes: top-5 always hits
    assert [metrics[k]["k_used"] for k in ks] == [3, 10, 120]  # the k that voted, not the one asked for


def test_a_k_beyond_the_train_rows_is_named_in_a_warning() -> None:
    assert clipped_k_warnings((10, 120, 500), 120) == [
        "--k 500 is more than the 120 train rows: k = 120 was used (every train sample votes)"
    ]
    assert clipped_k_warnings((10, 20), 120) == []


def test_non_finite_features_are_refused_naming_their_rows() -> None:
    feats = torch.randn(30, 4)
    feats[7, 2] = float("nan")
    feats[21, 0] = float("inf")
    rows = torch.arange(30) * 2  # view-0 rows of a two-view cache
    indices = torch.arange(60) // 2
    with pytest.raises(CacheError) as info:
        check_finite(feats, rows, indices, where="cache c (block 3, --pool cls)")
    assert "2 of 30 feature rows are not finite (NaN or Inf): cache rows [14, 42]" in info.value.message
    assert "dataset indices [7, 21]" in info.value.message and "re-extract" in info.value.hint
    check_finite(torch.randn(5, 4), torch.arange(5), torch.arange(5), where="x")  # finite: no error
    huge = torch.full((5, 4), 3e38)  # finite, but each row sums past fp32's range
    check_finite(huge, torch.arange(5), torch.arange(5), where="x")
    huge[3, 1] = float("-inf")  # inf - inf: the row sums to NaN
    with pytest.raises(CacheError, match="1 of 5 feature rows"):
        check_finite(huge, torch.arange(5), torch.arange(5), where="x")


def test_knn_config_refuses_bad_values() -> None:
    with pytest.raises(ProbeError):
        KnnConfig(pool="abmilp")
    with pytest.raises(ProbeError):
        KnnConfig(ks=(0,))
    with pytest.raises(ProbeError):
        KnnConfig(temperature=0)


def test_a_cache_with_a_nan_row_is_refused_by_knn_naming_the_row(tmp_path: Path) -> None:
    """One NaN row would silently take part in every search (29 → 25 % top-1 in the issue): refused."""
    from vitprobe.cache import (
        FORMAT_NAME,
        FORMAT_VERSION,
        shard_entries,
        write_final_norm,
        write_manifest,
        write_shard,
    )
    from vitprobe.knn import KnnConfig, run_knn

    def cache(path: Path, nan_row: int | None) -> Path:
        g = torch.Generator().manual_seed(0)
        cls = torch.randn(12, 4, generator=g).half()
        if nan_row is not None:
            cls[nan_row, 1] = float("nan")
        shards = [
            write_shard(path, i, s, {"cls": cls[s : s + 6], "labels": torch.arange(s, s + 6) % 3,
                                     "indices": torch.arange(s, s + 6) + 100})
            for i, s in enumerate((0, 6))
        ]
        write_manifest(path, {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "model": {"spec": "toy", "timm_name": "toy", "checkpoint": "x", "random_init": False,
                      "source": "x"},
            "layers": [3], "grid": [1, 1], "dim": 4, "num_prefix_tokens": 1, "has_cls": True,
            "num_reg_tokens": 0, "tokens": "cls", "store_dtype": "fp16", "views": 0, "seed": 0,
            "dataset": {"spec": str(path), "split": "x", "fingerprint": str(path), "num_classes": 3,
                        "class_names": ["a", "b", "c"]},
            "num_samples": 12, "shard_size": 6, "shards": shard_entries(shards),
            "final_norm": write_final_norm(path, torch.nn.Identity()), "complete": True,
        })
        return path

    test = cache(tmp_path / "test", None)
    assert run_knn(cache(tmp_path / "clean", None), test, KnnConfig(ks=(3,), device="cpu"))["num_train"] == 12
    refused = r"1 of 12 feature rows are not finite.*cache rows \[8\].*indices \[108\]"
    with pytest.raises(CacheError, match=refused):
        run_knn(cache(tmp_path / "train", 8), test, KnnConfig(ks=(3,), device="cpu"))
