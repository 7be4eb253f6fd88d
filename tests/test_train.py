"""Probe training: schedule, LARS, holdout, streaming, one-pass multi-head equality, determinism, accuracy."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from vitprobe.errors import ProbeError
from vitprobe.heads import HeadSpec, ProbeHead, build_head
from vitprobe.train import (
    MemorySource,
    ProbeConfig,
    Split,
    iter_batches,
    lr_factor,
    make_optimizer,
    stratified_holdout,
    train_probes,
)


def blobs(n: int, *, classes: int = 4, dim: int = 8, patches: int = 4, seed: int = 0) -> MemorySource:
    """Gaussian class blobs: [cls] = class mean + noise; patches = [cls] + noise."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 2
    labels = torch.arange(n) % classes
    cls = means[labels] + torch.randn(n, dim, generator=g)
    tokens = cls[:, None] + torch.randn(n, patches, dim, generator=g)  # (n, P, D)
    return MemorySource({"cls": cls, "patches": tokens, "labels": labels})


def small_cfg(**kw: object) -> ProbeConfig:
    base = ProbeConfig(pools=("cls", "mean", "abmilp"), epochs=4, batch_size=32, warmup_epochs=1,
                       lr_grid=(0.5, 2.0), optimizer="sgd", holdout=0.2)
    return replace(base, **kw)


def specs_of(cfg: ProbeConfig) -> list[HeadSpec]:
    return [cfg.head_spec(p) for p in cfg.pools]


def test_lr_schedule_is_mae_warmup_then_half_cosine() -> None:
    steps, epochs, warmup = 10, 20, 5
    assert lr_factor(0, steps, epochs, warmup) == 0.0
    assert lr_factor(25, steps, epochs, warmup) == pytest.approx(2.5 / 5)
    assert lr_factor(50, steps, epochs, warmup) == pytest.approx(1.0)
    assert lr_factor(125, steps, epochs, warmup) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7.5 / 15)))
    assert lr_factor(200, steps, epochs, warmup) == pytest.approx(0.0, abs=1e-12)
    assert ProbeConfig(batch_size=1024, blr=0.1).lr(0.1) == pytest.approx(0.4)  # lr = blr × batch / 256


def test_lars_step_is_maes_lars() -> None:
    """MAE util/lars.py: matrices get trust 0.001·|w|/|g| (even at weight decay 0), biases plain SGD."""
    torch.manual_seed(0)
    head: ProbeHead = build_head(HeadSpec(pool="cls"), 6, 3)
    cfg = ProbeConfig(optimizer="lars", momentum=0.9, weight_decay=0.0)
    lr = 0.7
    opt = make_optimizer(head, cfg, lr)
    w0, b0 = head.linear.weight.detach().clone(), head.linear.bias.detach().clone()
    head.linear.weight.grad = torch.randn_like(w0)
    head.linear.bias.grad = torch.randn_like(b0)
    gw, gb = head.linear.weight.grad.clone(), head.linear.bias.grad.clone()
    opt.step()
    trust = 0.001 * w0.norm() / gw.norm()
    torch.testing.assert_close(head.linear.weight.detach(), w0 - lr * trust * gw)
    torch.testing.assert_close(head.linear.bias.detach(), b0 - lr * gb)


def test_stratified_holdout_holds_out_each_class_and_keeps_views_together() -> None:
    labels = torch.arange(200) % 4
    train, held = stratified_holdout(labels, torch.arange(200), 0.1, seed=0)
    assert len(train) + len(held) == 200 and not set(train.tolist()) & set(held.tolist())
    assert torch.bincount(labels[held]).tolist() == [5, 5, 5, 5]
    again, _ = stratified_holdout(labels, torch.arange(200), 0.1, seed=0)
    assert torch.equal(train, again)
    # two views per image: rows 2i and 2i+1 share dataset index i, and stay on one side
    groups = torch.arange(400) // 2
    view_labels = labels[groups]
    train, held = stratified_holdout(view_labels, groups, 0.1, seed=0)
    assert set(groups[train].tolist()).isdisjoint(groups[held].tolist())
    assert len(held) == 40


def test_streaming_yields_every_row_once_in_shuffled_order_and_memory_path_agrees() -> None:
    source = blobs(103)
    source.blocks = [(s, min(s + 10, 103)) for s in range(0, 103, 10)]  # 11 "shards"
    rows = torch.arange(0, 103, 2)  # a split: every other row
    split = Split("train", source, rows)
    g = torch.Generator().manual_seed(0)
    batches = list(iter_batches(split, ["cls"], 8, generator=g, shuffle_shards=3))
    seen = torch.cat([b["cls"] for b in batches])
    assert len(seen) == len(rows)
    # each yielded row is one of the split's rows, each exactly once
    expected = source.tensors["cls"][rows]
    matches = (seen[:, None, :] == expected[None]).all(-1)  # (n, n)
    assert torch.equal(matches.sum(0), torch.ones(len(rows), dtype=torch.long))
    assert not torch.equal(seen, expected)  # shuffled
    dropped = list(iter_batches(split, ["cls"], 8, generator=g, drop_last=True))
    assert all(len(b["labels"]) == 8 for b in dropped) and len(dropped) == len(rows) // 8
    in_memory = Split("train", source, rows, memory={k: v for k, v in source.tensors.items()})
    mem = torch.cat([b["cls"] for b in iter_batches(in_memory, ["cls"], 8)])
    torch.testing.assert_close(mem, expected)


def test_views_rotate_per_epoch_and_evaluation_uses_view_zero() -> None:
    source = blobs(12)
    source.views = torch.arange(12) % 3
    split = Split("train", source, torch.arange(12))
    assert split.epoch_rows(0).tolist() == [0, 3, 6, 9]
    assert split.epoch_rows(4).tolist() == [1, 4, 7, 10]
    assert split.epoch_rows(None).tolist() == [0, 3, 6, 9]


def test_one_pass_multi_head_equals_each_head_trained_alone() -> None:
    train, test = blobs(160), blobs(40, seed=1)
    cfg = small_cfg()
    together = train_probes(train, test, cfg, specs_of(cfg), keys=["cls", "patches"])
    for pool in cfg.pools:
        alone_cfg = replace(cfg, pools=(pool,))
        alone = train_probes(train, test, alone_cfg, specs_of(alone_cfg), keys=["cls", "patches"])
        a, b = together["readouts"][pool], alone["readouts"][pool]
        for run_a, run_b in zip(a["runs"], b["runs"], strict=True):
            assert run_a.blr == run_b.blr
            assert run_a.curves == run_b.curves
            for (ka, va), (kb, vb) in zip(run_a.head.state_dict().items(), run_b.head.state_dict().items(),
                                          strict=True):
                assert ka == kb and torch.equal(va, vb), (pool, run_a.blr, ka)
        assert a["test"].top1 == b["test"].top1


def test_results_are_deterministic_for_a_seed() -> None:
    train, test = blobs(160), blobs(40, seed=1)
    cfg = small_cfg(pools=("abmilp",), optimizer="lars", lr_grid=(1.0,))
    first = train_probes(train, test, cfg, specs_of(cfg), keys=["patches"])["readouts"]["abmilp"]
    second = train_probes(train, test, cfg, specs_of(cfg), keys=["patches"])["readouts"]["abmilp"]
    other = train_probes(train, test, replace(cfg, seed=1), specs_of(cfg), keys=["patches"])
    other = other["readouts"]["abmilp"]
    for k, v in first["head"].state_dict().items():
        assert torch.equal(v, second["head"].state_dict()[k])
    assert first["run"].curves == second["run"].curves
    assert not torch.equal(first["head"].linear.weight, other["head"].linear.weight)


def test_streaming_run_is_deterministic_and_learns() -> None:
    train, test = blobs(200), blobs(60, seed=1)
    train.blocks = [(s, min(s + 25, 200)) for s in range(0, 200, 25)]
    cfg = small_cfg(pools=("cls",), load="stream", epochs=6, lr_grid=(1.0,), shuffle_shards=2)
    a = train_probes(train, test, cfg, specs_of(cfg), keys=["cls"])
    b = train_probes(train, test, cfg, specs_of(cfg), keys=["cls"])
    assert a["timing"]["in_memory"] is False
    assert torch.equal(a["readouts"]["cls"]["head"].linear.weight, b["readouts"]["cls"]["head"].linear.weight)
    assert a["readouts"]["cls"]["test"].top1 > 0.9


def test_selection_picks_best_holdout_epoch_and_refit_trains_on_everything() -> None:
    train, test = blobs(160), blobs(40, seed=1)
    cfg = small_cfg(pools=("cls",), refit=True)
    out = train_probes(train, test, cfg, specs_of(cfg), keys=["cls"])
    r = out["readouts"]["cls"]
    run = r["run"]
    curve = run.curves["holdout_top1"]
    assert run.best_score == max(curve) and run.best_epoch == run.curves["epoch"][curve.index(max(curve))]
    assert all(run.best_score >= max(o.curves["holdout_top1"]) for o in r["runs"])
    assert out["selection"]["holdout_rows"] == 32 and out["selection"]["train_rows"] == 128
    assert r["refit"].stop_epoch == run.best_epoch and r["head"] is r["refit"].head
    on_test_cfg = replace(cfg, select_on="test", refit=False)  # refit needs the holdout
    on_test = train_probes(train, test, on_test_cfg, specs_of(cfg), keys=["cls"])
    assert on_test["selection"]["optimistic"] is True and on_test["selection"]["holdout_rows"] == 0
    assert on_test["selection"]["refit"] is False and "refit" not in on_test["readouts"]["cls"]


def test_refit_with_selection_on_test_is_refused() -> None:
    """Refit retrains with the lr and epoch chosen on a holdout; selecting on test leaves no holdout."""
    with pytest.raises(ProbeError, match="--refit with --select-on test") as info:
        small_cfg(refit=True, select_on="test")
    assert "there is no holdout" in info.value.message and "drop --refit" in info.value.hint


def test_lr_scales_with_the_batch_actually_used_when_the_cache_is_smaller() -> None:
    train, test = blobs(100), blobs(20, seed=1)
    cfg = small_cfg(pools=("cls",), batch_size=1024, lr_grid=(0.1,))  # 80 fit rows < 1024
    out = train_probes(train, test, cfg, specs_of(cfg), keys=["cls"])
    assert out["selection"]["train_rows"] == 80 and out["selection"]["batch_size"] == 80
    assert out["readouts"]["cls"]["run"].lr == pytest.approx(0.1 * 80 / 256)
    big = train_probes(train, test, replace(cfg, batch_size=32), specs_of(cfg), keys=["cls"])
    assert big["selection"]["batch_size"] == 32
    assert big["readouts"]["cls"]["run"].lr == pytest.approx(0.1 * 32 / 256)


def one_patch_task(n: int, seed: int) -> MemorySource:
    """The label is carried by one patch (marked in the last channel); the other patches are decoys chosen so
    that every class appears equally often in every image, which makes the patch mean uninformative."""
    g = torch.Generator().manual_seed(seed)
    classes, patches, dim = 4, 16, 8
    labels = torch.randint(0, classes, (n,), generator=g)
    tokens = torch.zeros(n, patches, dim)
    for i in range(n):
        decoys = [c for c in range(classes) for _ in range(4)]
        decoys.remove(int(labels[i]))  # 15 decoys + the key patch: four patches of each class
        kinds = torch.tensor([int(labels[i]), *decoys])[torch.randperm(patches, generator=g)]
        tokens[i, torch.arange(patches), kinds] = 1.0
        key = int((kinds == labels[i]).nonzero()[torch.randint(0, 4, (1,), generator=g)])
        tokens[i, key, -1] = 3.0  # the marker
    tokens += 0.05 * torch.randn(n, patches, dim, generator=g)
    return MemorySource({"patches": tokens, "labels": labels})


def test_abmilp_learns_a_one_patch_task_that_mean_pooling_cannot() -> None:
    train, test = one_patch_task(512, 0), one_patch_task(256, 1)
    cfg = ProbeConfig(pools=("mean", "abmilp"), epochs=30, batch_size=64, warmup_epochs=2, optimizer="adamw",
                      lr_grid=(0.01,), holdout=0.1)
    out = train_probes(train, test, cfg, specs_of(cfg), keys=["patches"])
    mean, abmilp = out["readouts"]["mean"]["test"].top1, out["readouts"]["abmilp"]["test"].top1
    assert abmilp > 0.9, abmilp
    assert mean < 0.45, mean
    assert abmilp > mean + 0.4


def test_linear_probe_on_digits_is_within_two_points_of_logistic_regression() -> None:
    """scikit-learn's digits (8×8 images) as [cls] features; same split for both classifiers."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    reference = LogisticRegression(max_iter=5000).fit(x_tr, y_tr).score(x_te, y_te)
    train = MemorySource({"cls": torch.tensor(x_tr, dtype=torch.float32), "labels": torch.tensor(y_tr)})
    test = MemorySource({"cls": torch.tensor(x_te, dtype=torch.float32), "labels": torch.tensor(y_te)})
    cfg = ProbeConfig(pools=("cls",), epochs=40, batch_size=64, warmup_epochs=4, optimizer="lars",
                      lr_grid=(1.0, 10.0))
    out = train_probes(train, test, cfg, specs_of(cfg), keys=["cls"])
    ours = out["readouts"]["cls"]["test"].top1
    assert ours >= reference - 0.02, (ours, reference)
