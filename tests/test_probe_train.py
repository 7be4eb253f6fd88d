"""Probe training: schedule, holdout, streaming, one pass vs separate runs, determinism, selection."""

from __future__ import annotations

import math

import pytest
import torch

from vitprobe.errors import ProbeError
from vitprobe.heads import HeadSpec
from vitprobe.probe import ProbeConfig, train_probes
from vitprobe.probe.protocols import Schedule, lr_factor, plan_schedule
from vitprobe.probe.selection import holdout_fraction, stratified_holdout
from vitprobe.sources import MemorySource
from vitprobe.tokens import Split, iter_batches


def blobs(n: int, *, classes: int = 4, dim: int = 8, patches: int = 4, seed: int = 0) -> MemorySource:
    """Gaussian class blobs: [cls] = class mean + noise; patches = [cls] + noise."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 2
    labels = torch.arange(n) % classes
    cls = means[labels] + torch.randn(n, dim, generator=g)
    tokens = cls[:, None] + torch.randn(n, patches, dim, generator=g)  # (n, P, D)
    return MemorySource({"cls": cls, "patches": tokens, "labels": labels})


def small_cfg(**kw: object) -> ProbeConfig:
    base = {
        "pools": ("cls", "mean", "abmilp"),
        "epochs": 4,
        "min_steps": 0,
        "batch_size": 32,
        "warmup_epochs": 1.0,
        "lr_grid": (0.5, 2.0),
        "optimizer": "sgd",
        "holdout": 0.2,
        "eval_every": 1,
        "weight_decay": (0.0,),  # one head per lr (curves keyed by blr)
    }
    return ProbeConfig.from_protocol("auto", **{**base, **kw})


def specs_of(cfg: ProbeConfig) -> list[HeadSpec]:
    return [cfg.head_spec(p) for p in cfg.pools]


def test_lr_schedule_is_mae_warmup_then_half_cosine() -> None:
    schedule = Schedule(
        batch_size=8,
        steps_per_epoch=10,
        epochs=20,
        total_steps=200,
        warmup_epochs=5,
        eval_every=1,
        scaled=False,
    )
    assert lr_factor(0, schedule) == 0.0
    assert lr_factor(25, schedule) == pytest.approx(2.5 / 5)
    assert lr_factor(50, schedule) == pytest.approx(1.0)
    assert lr_factor(125, schedule) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7.5 / 15)))
    assert lr_factor(200, schedule) == pytest.approx(0.0, abs=1e-12)
    assert ProbeConfig().lr(0.1, 1024) == pytest.approx(0.4)  # lr = blr × batch / 256


def test_schedule_grows_epochs_to_the_minimum_number_of_steps() -> None:
    """auto: 1,000 train rows at batch 256 give 3 full batches an epoch, so 25,000 steps take 8,334 epochs;
    ImageNet-1k's 1,281,167 rows give 5,004 steps an epoch and keep the 10-epoch minimum."""
    cfg = ProbeConfig.from_protocol("auto")
    small = plan_schedule(cfg, 1000)
    assert (small.batch_size, small.steps_per_epoch, small.epochs) == (256, 3, 8334)
    assert small.total_steps >= 25_000 and small.scaled and small.eval_every == 84
    imagenet = plan_schedule(cfg, 1_281_167)
    assert (imagenet.epochs, imagenet.steps_per_epoch, imagenet.scaled) == (10, 5004, False)
    mae = plan_schedule(ProbeConfig.from_protocol("mae"), 1_281_167)  # the paper's recipe, unscaled
    assert (mae.batch_size, mae.steps_per_epoch, mae.epochs, mae.total_steps) == (16384, 78, 90, 7020)
    tiny = plan_schedule(ProbeConfig.from_protocol("mae"), 100)  # batch capped at the rows
    assert (tiny.batch_size, tiny.steps_per_epoch, tiny.epochs) == (100, 1, 90)


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


def test_min_holdout_raises_a_small_sets_fraction_to_the_first_whole_percent_that_holds_enough() -> None:
    two = torch.arange(120) // 60  # lfw's train split: 60 images in each of 2 classes
    assert holdout_fraction(two, torch.arange(120), 0.1, 30) == 0.25  # 10 % would be 12 images
    assert len(stratified_holdout(two, torch.arange(120), 0.25, seed=3)[1]) == 30
    ten = torch.arange(1200) % 10  # 120 images at 10 %: the minimum does not bind
    assert holdout_fraction(ten, torch.arange(1200), 0.1, 30) == 0.1
    assert holdout_fraction(two, torch.arange(120), 0.1, 0) == 0.1  # --min-holdout 0: off
    assert holdout_fraction(two, torch.arange(120), 0.5, 30) == 0.5  # a larger --holdout is kept
    tiny = torch.arange(40) % 4  # 30 images cannot be held out of 40 at <= 0.3: the cap
    assert holdout_fraction(tiny, torch.arange(40), 0.1, 30) == 0.3
    uneven = torch.tensor([0] * 7 + [1] * 50 + [2] * 13)  # counted per class, as the split rounds them
    f = holdout_fraction(uneven, torch.arange(70), 0.1, 15)
    assert len(stratified_holdout(uneven, torch.arange(70), f, seed=0)[1]) >= 15
    assert len(stratified_holdout(uneven, torch.arange(70), f - 0.01, seed=0)[1]) < 15
    views = torch.arange(240) // 2  # two views per image: images are counted, not rows
    assert holdout_fraction(two[views], views, 0.1, 30) == 0.25


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


def test_one_pass_equals_each_readout_trained_alone() -> None:
    """Banks share nothing but the batches: a read-out among others ends bit-identical to it alone."""
    train, test = blobs(160), blobs(40, seed=1)
    cfg = small_cfg()
    together = train_probes(train, test, cfg, specs_of(cfg), keys=["cls", "patches"])
    for pool in cfg.pools:
        alone_cfg = small_cfg(pools=(pool,))
        alone = train_probes(train, test, alone_cfg, specs_of(alone_cfg), keys=["cls", "patches"])
        a, b = together.readouts[pool], alone.readouts[pool]
        assert a.curves == b.curves and (a.blr, a.epoch) == (b.blr, b.epoch)
        for (ka, va), (kb, vb) in zip(a.head.state_dict().items(), b.head.state_dict().items(), strict=True):
            assert ka == kb and torch.equal(va, vb), (pool, ka)
        assert a.test.top1 == b.test.top1


def test_an_lr_grid_in_one_bank_equals_each_lr_trained_alone() -> None:
    """The K heads of a bank end where K single-lr runs end (batched ops: equal to rounding)."""
    train, test = blobs(160), blobs(40, seed=1)
    cfg = small_cfg(pools=("cls", "abmilp"), lr_grid=(0.5, 2.0))
    grid = train_probes(train, test, cfg, specs_of(cfg), keys=["cls", "patches"])
    for blr in cfg.lr_grid:
        one_cfg = small_cfg(pools=("cls", "abmilp"), lr_grid=(blr,))
        one = train_probes(train, test, one_cfg, specs_of(one_cfg), keys=["cls", "patches"])
        for pool in cfg.pools:
            ours, alone = grid.readouts[pool].curves[f"{blr:g}"], one.readouts[pool].curves[f"{blr:g}"]
            for name in ("train_loss", "holdout_loss", "test_loss"):
                assert ours[name] == pytest.approx(alone[name], rel=1e-4, abs=1e-5), (pool, blr, name)


def test_results_are_deterministic_for_a_seed() -> None:
    train, test = blobs(160), blobs(40, seed=1)
    cfg = small_cfg(pools=("abmilp",), optimizer="lars", lr_grid=(1.0,))
    first = train_probes(train, test, cfg, specs_of(cfg), keys=["patches"]).readouts["abmilp"]
    second = train_probes(train, test, cfg, specs_of(cfg), keys=["patches"]).readouts["abmilp"]
    other = train_probes(
        train,
        test,
        small_cfg(pools=("abmilp",), optimizer="lars", lr_grid=(1.0,), seed=1),
        specs_of(cfg),
        keys=["patches"],
    ).readouts["abmilp"]
    for k, v in first.head.state_dict().items():
        assert torch.equal(v, second.head.state_dict()[k])
    assert first.curves == second.curves
    assert not torch.equal(first.head.linear.weight, other.head.linear.weight)


def test_streaming_run_is_deterministic_and_learns() -> None:
    train, test = blobs(200), blobs(60, seed=1)
    train.blocks = [(s, min(s + 25, 200)) for s in range(0, 200, 25)]
    cfg = small_cfg(pools=("cls",), load="stream", epochs=6, lr_grid=(1.0,), shuffle_shards=2)
    a = train_probes(train, test, cfg, specs_of(cfg), keys=["cls"])
    b = train_probes(train, test, cfg, specs_of(cfg), keys=["cls"])
    assert a.timing["in_memory"] is False
    assert torch.equal(a.readouts["cls"].head.linear.weight, b.readouts["cls"].head.linear.weight)
    assert a.readouts["cls"].test.top1 > 0.9


def test_selection_picks_best_holdout_epoch_and_refit_trains_on_everything() -> None:
    train, test = blobs(160), blobs(40, seed=1)
    cfg = small_cfg(pools=("cls",), refit=True)
    out = train_probes(train, test, cfg, specs_of(cfg), keys=["cls"])
    r = out.readouts["cls"]
    chosen = r.curves[f"{r.blr:g}"]
    curve = chosen["holdout_top1"]
    assert r.selection_top1 == pytest.approx(max(curve))
    best_epochs = [e for e, v in zip(chosen["epoch"], curve, strict=True) if v == max(curve)]
    assert r.epoch in best_epochs  # ties go to the lower holdout loss
    loss_at = dict(zip(chosen["epoch"], chosen["holdout_loss"], strict=True))
    assert loss_at[r.epoch] == min(loss_at[e] for e in best_epochs)
    assert all(r.selection_top1 >= max(c["holdout_top1"]) for c in r.curves.values())
    assert out.selection["holdout_rows"] == 32 and out.selection["train_rows"] == 128
    assert r.refit and r.test_top1_before_refit is not None
    on_test_cfg = small_cfg(pools=("cls",), select_on="test")  # refit needs the holdout
    on_test = train_probes(train, test, on_test_cfg, specs_of(cfg), keys=["cls"])
    assert on_test.selection["optimistic"] is True and on_test.selection["holdout_rows"] == 0
    assert on_test.selection["refit"] is False and not on_test.readouts["cls"].refit


def test_selecting_the_last_epoch_compares_the_heads_at_the_end_of_their_schedule() -> None:
    train, test = blobs(160, classes=6), blobs(60, classes=6, seed=1)
    cfg = small_cfg(pools=("cls", "abmilp"), select_epoch="last", lr_grid=(0.05, 0.5, 5.0), epochs=6)
    out = train_probes(train, test, cfg, specs_of(cfg), keys=["cls", "patches"])
    assert "at the last epoch of each head" in out.selection["rule"]
    for r in out.readouts.values():
        assert r.epoch == 6
        finals = {k: (c["holdout_top1"][-1], c["holdout_loss"][-1]) for k, c in r.curves.items()}
        best = max(finals.values(), key=lambda v: (v[0], -v[1]))
        assert (r.selection_top1, r.curves[f"{r.blr:g}"]["holdout_loss"][-1]) == pytest.approx(best)
        assert r.test.top1 == pytest.approx(r.curves[f"{r.blr:g}"]["test_top1"][-1])
    with pytest.raises(ProbeError, match="--select-epoch"):
        small_cfg(select_epoch="middle")


def test_refit_with_selection_on_test_is_refused() -> None:
    """Refit retrains with the lr and epoch chosen on a holdout; selecting on test leaves no holdout."""
    with pytest.raises(ProbeError, match="--refit with --select-on test") as info:
        small_cfg(refit=True, select_on="test")
    assert "there is no holdout" in info.value.message and "drop --refit" in info.value.hint


def test_lr_scales_with_the_batch_actually_used_when_the_cache_is_smaller() -> None:
    train, test = blobs(100), blobs(20, seed=1)
    cfg = small_cfg(pools=("cls",), batch_size=1024, lr_grid=(0.1,), min_holdout=0)  # 80 fit rows < 1024
    out = train_probes(train, test, cfg, specs_of(cfg), keys=["cls"])
    assert out.selection["train_rows"] == 80 and out.selection["batch_size"] == 80
    assert out.readouts["cls"].lr == pytest.approx(0.1 * 80 / 256)
    big = train_probes(
        train, test, small_cfg(pools=("cls",), batch_size=32, lr_grid=(0.1,)), specs_of(cfg), keys=["cls"]
    )
    assert big.selection["batch_size"] == 32
    assert big.readouts["cls"].lr == pytest.approx(0.1 * 32 / 256)


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
    cfg = small_cfg(
        pools=("mean", "abmilp"),
        epochs=30,
        batch_size=64,
        warmup_epochs=2.0,
        optimizer="adamw",
        lr_grid=(0.01,),
        holdout=0.1,
    )
    out = train_probes(train, test, cfg, specs_of(cfg), keys=["patches"])
    mean, abmilp = out.readouts["mean"].test.top1, out.readouts["abmilp"].test.top1
    assert abmilp > 0.9, abmilp
    assert mean < 0.45, mean
    assert abmilp > mean + 0.4


def test_named_protocols_resolve_to_the_references_recipes() -> None:
    mae = ProbeConfig.from_protocol("mae")
    assert (mae.optimizer, mae.lr_grid, mae.batch_size, mae.epochs, mae.warmup_epochs, mae.weight_decay) == (
        "lars",
        (0.1,),
        16384,
        90,
        10.0,
        (0.0,),
    )
    assert mae.min_steps == 0 and mae.momentum == 0.9 and mae.overrides == ()
    ep = ProbeConfig.from_protocol("ep")
    assert (ep.batch_size, ep.queries, ep.optimizer) == (4096, 32, "lars")
    # beyond_cls's --optimizer sgd is SGD(head.parameters(), lr, weight_decay): no momentum, decay everything
    plain = ProbeConfig.from_protocol("mae", optimizer="sgd", weight_decay=(1e-4,))
    assert (plain.momentum, plain.decay_vectors) == (0.0, True) and plain.overrides == (
        "optimizer",
        "weight_decay",
    )
    assert ProbeConfig.from_protocol("mae", optimizer="sgd", momentum=0.9).momentum == 0.9  # explicit wins
    auto = ProbeConfig.from_protocol("auto")
    assert auto.optimizer == "sgd" and len(auto.lr_grid) == 13 and auto.min_steps == 25_000
    assert ProbeConfig.from_protocol("auto", epochs=10).overrides == ()  # the protocol's own value


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("lr_grid", (float("nan"),)),
        ("lr_grid", (float("inf"),)),
        ("lr_grid", (-0.1,)),
        ("lr_grid", (0.1, 0.1)),
        ("holdout", float("nan")),
        ("warmup_epochs", float("inf")),
        ("momentum", 1.0),
        ("c_grid", (0.0,)),
    ],
)
def test_impossible_options_are_refused_before_any_work(option: str, value: object) -> None:
    with pytest.raises(ProbeError):
        ProbeConfig.from_protocol("auto", **{option: value})


def test_logreg_protocol_refuses_token_read_outs() -> None:
    with pytest.raises(ProbeError, match="pooled features only") as info:
        ProbeConfig.from_protocol("logreg", pools=("cls", "abmilp"))
    assert "another --protocol for abmilp" in info.value.hint


def test_bf16_autocast_trains_on_the_cpu_close_to_fp32() -> None:
    """The CUDA path's bf16 autocast, exercised on the CPU (torch supports CPU autocast in bf16)."""
    train, test = blobs(200), blobs(60, seed=1)
    fp32 = train_probes(
        train, test, small_cfg(pools=("abmilp",), lr_grid=(1.0,)), [HeadSpec("abmilp")], keys=["patches"]
    )
    bf16 = train_probes(
        train,
        test,
        small_cfg(pools=("abmilp",), lr_grid=(1.0,), amp="bf16"),
        [HeadSpec("abmilp")],
        keys=["patches"],
    )
    assert bf16.readouts["abmilp"].test.top1 == pytest.approx(fp32.readouts["abmilp"].test.top1, abs=0.05)
    assert bf16.readouts["abmilp"].head.linear.weight.dtype == torch.float32  # the saved head stays fp32


def test_load_decision_keeps_caches_on_the_gpu_when_they_fit_and_pins_host_memory_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vitprobe.probe.train import load_decision

    source = blobs(100)
    cfg = small_cfg()
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10**12, 10**12))
    assert load_decision(cfg, [source], ["cls"], cuda)[:3] == (True, cuda, False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10, 10**12))
    in_memory, store, pin, why = load_decision(cfg, [source], ["cls"], cuda)
    assert (in_memory, store, pin) == (True, torch.device("cpu"), True) and "pinned host memory" in why
    assert load_decision(small_cfg(load="stream"), [source], ["cls"], cuda)[:3] == (
        False,
        torch.device("cpu"),
        False,
    )


def test_lowshot_subsets_are_class_stratified_seeded_and_keep_views_together() -> None:
    from vitprobe.probe.lowshot import subset

    labels = torch.arange(400) % 4
    groups = torch.arange(400) // 2  # two views per image
    view_labels = labels[groups]
    rows, notes = subset(view_labels, groups, shots=5, fraction=None, seed=0)
    assert torch.bincount(view_labels[rows]).tolist() == [10, 10, 10, 10]  # 5 images × 2 views
    assert notes == []
    assert set(groups[rows].tolist()) == {int(g) for g in groups[rows]}  # whole images only
    again, _ = subset(view_labels, groups, shots=5, fraction=None, seed=0)
    other, _ = subset(view_labels, groups, shots=5, fraction=None, seed=1)
    assert torch.equal(rows, again) and not torch.equal(rows, other)
    part, _ = subset(labels, torch.arange(400), shots=None, fraction=0.1, seed=0)
    assert torch.bincount(labels[part]).tolist() == [10, 10, 10, 10]
    few, notes = subset(labels, torch.arange(400), shots=200, fraction=None, seed=0)
    assert len(few) == 400 and "fewer than 200" in notes[0]


def test_lowshot_reports_mean_and_std_over_seeds_with_each_seeds_value() -> None:
    train, test = blobs(400, seed=0), blobs(100, seed=1)
    cfg = small_cfg(pools=("cls",), lr_grid=(0.5, 2.0), shots=5, seeds=3)
    out = train_probes(train, test, cfg, specs_of(cfg), keys=["cls"])
    r = out.readouts["cls"]
    values = [s["top1"] for s in r.seeds]
    assert [s["seed"] for s in r.seeds] == [0, 1, 2] and len(set(values)) > 1  # different subsets
    assert r.test.top1 == pytest.approx(sum(values) / 3)
    assert r.top1_std == pytest.approx(torch.tensor(values).std().item())
    lowshot = out.selection["lowshot"]
    assert lowshot["train_rows"] == [16, 16, 16] and lowshot["holdout_rows"] == [4, 4, 4]  # 1 of 5 per class
    with pytest.raises(ProbeError, match="no subset was asked for"):
        small_cfg(seeds=3)


def test_one_shot_cannot_select_and_says_so() -> None:
    train, test = blobs(400, seed=0), blobs(100, seed=1)
    cfg = small_cfg(pools=("cls",), lr_grid=(0.1, 1.0, 10.0), shots=1)
    out = train_probes(train, test, cfg, specs_of(cfg), keys=["cls"])
    r = out.readouts["cls"]
    assert out.selection["holdout_rows"] == 0 and out.selection["split"] == "none"
    assert r.blr == 1.0 and r.epoch == cfg.epochs  # the grid's middle, the last epoch
    assert r.selection_top1 is None
    assert "no_holdout" in {c.code for c in r.health} and r.verdict == "warning"
    logreg_cfg = ProbeConfig.from_protocol("logreg", pools=("cls",), c_grid=(0.01, 1.0, 100.0), shots=1)
    lr = train_probes(train, test, logreg_cfg, specs_of(logreg_cfg), keys=["cls"]).readouts["cls"]
    assert lr.C == 1.0 and "no_holdout" in {c.code for c in lr.health}


def test_a_holdout_that_leaves_few_train_rows_and_a_warmup_as_long_as_training_are_warnings() -> None:
    train, test = blobs(160), blobs(40, seed=1)
    cfg = small_cfg(pools=("cls",), holdout=0.9, warmup_epochs=4.0)
    out = train_probes(train, test, cfg, specs_of(cfg), keys=["cls"])
    warnings = " | ".join(out.selection["warnings"])
    expected = "the holdout (0.9 of each class) leaves 16 train images for 4 classes (and holds out 144)"
    assert expected in warnings
    assert "--warmup-epochs 4 is as long as the 4 epochs run" in warnings
    fine = train_probes(train, test, small_cfg(pools=("cls",)), specs_of(cfg), keys=["cls"])
    assert not fine.selection["warnings"]
