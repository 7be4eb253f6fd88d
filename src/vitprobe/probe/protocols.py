"""Probe protocols: named recipes (auto, mae, ep, logreg) and the resolved `ProbeConfig` a run records.

A protocol is data: optimiser, learning-rate grid, batch, schedule and step budget, each with the source it
comes from. `ProbeConfig.from_protocol(name, **overrides)` starts from a protocol and applies the options a
user gave; the resolved config (and which fields were overridden) is written whole into results.json.
`plan_schedule` turns a config and a train-set size into the run's batch, epochs and evaluation cadence.
Why the default (`auto`) is what it is: docs/probing.md, "Converged by default".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from vitprobe.choices import AMP_MODES, LOAD_MODES, LOGREG_POOLS, SELECT_EPOCHS, SELECT_ONS
from vitprobe.errors import ProbeError
from vitprobe.heads import POOLS, HeadSpec
from vitprobe.probe.optim import OPTIMIZERS, OptimizerSpec
from vitprobe.probe.selection import MIN_HOLDOUT_ROWS
from vitprobe.tokens import num_batches

SELECT_ON = SELECT_ONS
SELECT_EPOCH = SELECT_EPOCHS
AUTO_WD_GRID = (0.0, 1e-4, 1e-3)  # weight decays of auto's heads (× AUTO_LR_GRID)
# Base lrs (at batch 256) of the default grid: 13 values over four decades in 1-2-5 steps. DINOv2's linear
# evaluation trains a 13-value grid side by side (dinov2/eval/linear.py: 1e-5 .. 0.1 on raw features); on
# BatchNorm-standardised features the optimum sits higher (0.01 .. 10 on small real data: docs/probing.md).
AUTO_LR_GRID = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
# C of the logistic-regression protocol: DINOv2's log_regression.py sweeps 10 ** linspace(-6, 5, 45);
# this is every other value of that grid (23 values, same range).
LOGREG_C_GRID = tuple(10 ** (-6 + 11 * i / 22) for i in range(23))


@dataclass(frozen=True)
class Protocol:
    """A named probing recipe; every field is a `ProbeConfig` default it sets."""

    description: str
    source: str
    values: dict[str, Any] = field(default_factory=dict)
    # What the reference's other optimiser choices mean, applied when the user picks that --optimizer and
    # does not set the fields: beyond_cls / efficient-probing build `SGD(head.parameters(), lr, weight_decay)`
    # (no momentum, decay on every parameter) and `AdamW(head.parameters(), ...)` (decay on every parameter).
    optimizer_values: dict[str, dict[str, Any]] = field(default_factory=dict)


PROTOCOLS: dict[str, Protocol] = {
    "auto": Protocol(
        description="converged by default: SGD + momentum, 13 lrs (4 decades) x 3 weight decays trained side "
        "by side, at least 25,000 optimiser steps (epochs scaled up for small train sets), the heads at the "
        "end of their schedule compared on a train holdout",
        source="DINOv2 linear evaluation (SGD momentum 0.9, cosine, 13 lrs; twice its 12,500 iterations); "
        "the weight decay path as scikit-learn's C sweep; vitprobe's choice of grid, budget and selection "
        "(docs/probing.md)",
        values={
            "optimizer": "sgd",
            "momentum": 0.9,
            "weight_decay": AUTO_WD_GRID,
            "select_epoch": "last",
            "decay_vectors": False,
            "lr_grid": AUTO_LR_GRID,
            "batch_size": 256,
            "epochs": 10,
            "min_steps": 25_000,
            "warmup_epochs": 0.0,
        },
    ),
    "mae": Protocol(
        description="MAE / Beyond [cls] linear probing: LARS, blr 0.1, batch 16384, 90 epochs, 10 warm-up, "
        "wd 0",
        source="facebookresearch/mae main_linprobe.py + util/lars.py; gmum/beyond_cls README "
        "(2048 x accum 2 x 4 GPUs = 16384)",
        values={
            "optimizer": "lars",
            "momentum": 0.9,
            "weight_decay": (0.0,),
            "decay_vectors": False,
            "lr_grid": (0.1,),
            "batch_size": 16384,
            "epochs": 90,
            "min_steps": 0,
            "warmup_epochs": 10.0,
            "select_epoch": "best",
        },
        optimizer_values={
            "sgd": {"momentum": 0.0, "decay_vectors": True},
            "adamw": {"decay_vectors": True},
        },
    ),
    "ep": Protocol(
        description="efficient probing: LARS, blr 0.1, batch 4096, 90 epochs, 10 warm-up, wd 0, 32 queries",
        source="billpsomas/efficient-probing README commands (--blr 0.1 --batch_size 512 x 8 GPUs, "
        "--ep_queries 32) and main_linprobe.py defaults",
        values={
            "optimizer": "lars",
            "momentum": 0.9,
            "weight_decay": (0.0,),
            "decay_vectors": False,
            "lr_grid": (0.1,),
            "batch_size": 4096,
            "epochs": 90,
            "min_steps": 0,
            "warmup_epochs": 10.0,
            "select_epoch": "best",
            "queries": 32,
        },
        optimizer_values={
            "sgd": {"momentum": 0.0, "decay_vectors": True},
            "adamw": {"decay_vectors": True},
        },
    ),
    "logreg": Protocol(
        description="logistic regression on pooled features: full-batch L-BFGS on standardised features, "
        "the L2 strength C chosen on the train holdout",
        source="DINOv2 log_regression.py (L-BFGS, C grid 10^[-6, 5]); CLIP's linear-probe evaluation",
        values={"pools": ("cls", "mean", "cls+mean"), "weight_decay": (0.0,)},
    ),
}


@dataclass(frozen=True)
class ProbeConfig:
    """How a probe run is made; written whole into results.json (build it with `from_protocol`)."""

    protocol: str = "auto"  # the named recipe the defaults came from (PROTOCOLS)
    overrides: tuple[str, ...] = ()  # fields the user set on top of the protocol
    pools: tuple[str, ...] = ("cls", "mean", "abmilp")  # read-outs (Beyond [cls] compares these three)
    # block(s) to probe: one block (negative counts from the last), a tuple of blocks or "all" (a per-layer
    # sweep: every read-out on every block, named pool@block); None = the deepest block stored
    layer: int | tuple[int, ...] | str | None = None
    n_last_blocks: int = 4  # cls-cat read-outs: [cls] of the last n stored blocks (DINOv2 linear eval: 4)
    final_norm: bool = False  # apply the backbone's final LayerNorm to tokens first (timm forward_features)
    abmilp_depth: int = 0  # extra Linear+act layers before the AbMILP score (0 = paper's D+1-param score)
    abmilp_act: str = "tanh"  # activation of those layers (the Beyond [cls] reference default)
    abmilp_content: str = "patch"  # pool patch tokens only (paper's MAE setting) or "all" tokens
    queries: int = 4  # learnable queries of the attentive read-out
    optimizer: str = "sgd"  # lars | sgd | adamw (vitprobe.probe.optim)
    momentum: float = 0.9  # LARS / SGD momentum
    weight_decay: tuple[float, ...] = AUTO_WD_GRID  # weight decays trained side by side (× lr_grid); mae: 0
    decay_vectors: bool = False  # decay biases too (beyond_cls's plain SGD does)
    lr_grid: tuple[float, ...] = AUTO_LR_GRID  # base lrs trained side by side; lr = blr × batch / 256
    batch_size: int = 256  # rows per step (capped at the train rows); lr scales with the batch used
    epochs: int = 10  # minimum epochs
    min_steps: int = 25_000  # minimum optimiser steps: epochs grow until the run has this many
    warmup_epochs: float = 0.0  # linear warm-up (epochs), then half-cosine to 0, per step
    select_on: str = "holdout"  # pick lr and epoch on a held-out train split; "test" is optimistic
    # which epoch of each head counts: "best" = its best evaluation on the selection split (early stopping,
    # the papers' max over epochs), "last" = the end of its schedule (a regularisation path, as a C sweep)
    select_epoch: str = "last"
    holdout: float = 0.1  # stratified fraction of the train cache held out for selection (at least)
    # the holdout fraction grows (up to selection.MAX_AUTO_HOLDOUT, 0.3) until the holdout has this many
    # images: on a tiny train set 10 % is a dozen images and the choice among the heads is noise
    min_holdout: int = MIN_HOLDOUT_ROWS
    refit: bool = False  # after selection, retrain on the full train cache with the chosen lr and epochs
    eval_every: int = 0  # evaluate every N epochs (and at the last); 0 = about 100 evaluations per run
    shots: int | None = None  # low-shot: train on K images per class (docs/probing.md, "Low-shot")
    train_fraction: float | None = None  # low-shot: train on this class-stratified fraction of the images
    seeds: int = 1  # low-shot: subsets (and head inits) drawn; mean ± std over them is reported
    c_grid: tuple[float, ...] = LOGREG_C_GRID  # logreg protocol: L2 strengths C (sklearn's convention)
    max_iter: int = 1000  # logreg protocol: L-BFGS iterations per C
    seed: int = 0  # head init, data order and holdout split
    device: str = "auto"  # auto = CUDA when available
    amp: str = "auto"  # bf16 autocast for the heads: auto = on CUDA only
    load: str = "auto"  # "memory" loads the caches whole, "stream" reads shard by shard, auto decides by size
    preload_gb: float = 8.0  # auto: load whole when the rows needed fit in this many GB
    shuffle_shards: int = 4  # streaming: shards mixed in one shuffle buffer (memory = this many shards)

    @classmethod
    def from_protocol(cls, name: str = "auto", **overrides: Any) -> ProbeConfig:
        """The config of protocol `name` with `overrides` (ProbeConfig fields; None values are ignored)."""
        if name not in PROTOCOLS:
            raise ProbeError(f"unknown --protocol {name!r}", f"use one of {', '.join(PROTOCOLS)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"ProbeConfig has no field {', '.join(unknown)}")
        protocol = PROTOCOLS[name]
        implied = protocol.optimizer_values.get(given.get("optimizer", ""), {})
        values = {**protocol.values, **implied, **given}
        changed = tuple(sorted(k for k in given if PROTOCOLS[name].values.get(k, _default(k)) != given[k]))
        return cls(protocol=name, overrides=changed, **values)

    def __post_init__(self) -> None:
        _check(self)

    @property
    def optimizer_spec(self) -> OptimizerSpec:
        return OptimizerSpec(
            kind=self.optimizer,
            momentum=self.momentum,
            decay_vectors=self.decay_vectors,
        )

    @property
    def grid(self) -> list[tuple[float, float]]:
        """The (base lr, weight decay) of every head of a read-out's bank, lr-major."""
        return [(blr, wd) for blr in self.lr_grid for wd in self.weight_decay]

    @property
    def lowshot(self) -> bool:
        return self.shots is not None or self.train_fraction is not None

    def lr(self, blr: float, batch: int) -> float:
        """Absolute lr of a base lr at the batch actually used (MAE: lr = blr × batch / 256)."""
        return blr * batch / 256

    def head_spec(self, pool: str) -> HeadSpec:
        return HeadSpec(
            pool=pool,
            abmilp_depth=self.abmilp_depth,
            abmilp_act=self.abmilp_act,
            abmilp_content=self.abmilp_content,
            queries=self.queries,
            n_last_blocks=self.n_last_blocks,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _default(name: str) -> Any:
    return next(f.default for f in fields(ProbeConfig) if f.name == name)


def _finite_positive(values: tuple[float, ...], option: str, example: str) -> None:
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ProbeError(
            f"{option} {', '.join(f'{v:g}' for v in bad)}: values must be finite and > 0",
            f"e.g. {option} {example}",
        )


def _check(cfg: ProbeConfig) -> None:
    """Refuse an impossible config before any cache is read."""
    if cfg.protocol not in PROTOCOLS:
        raise ProbeError(f"unknown --protocol {cfg.protocol!r}", f"use one of {', '.join(PROTOCOLS)}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ProbeError(f"unknown --optimizer {cfg.optimizer!r}", f"use one of {', '.join(OPTIMIZERS)}")
    for name, value, allowed in (
        ("--select-on", cfg.select_on, SELECT_ON),
        ("--select-epoch", cfg.select_epoch, SELECT_EPOCH),
        ("--load", cfg.load, LOAD_MODES),
        ("--amp", cfg.amp, AMP_MODES),
    ):
        if value not in allowed:
            raise ProbeError(f"unknown {name} {value!r}", f"use one of {', '.join(allowed)}")
    if cfg.refit and cfg.select_on == "test":
        raise ProbeError(
            "--refit with --select-on test: refit retrains with the lr and epoch chosen on a train "
            "holdout, and with --select-on test there is no holdout",
            "drop --refit, or select on the holdout (--select-on holdout, the default)",
        )
    if cfg.select_on == "holdout" and not (math.isfinite(cfg.holdout) and 0.0 < cfg.holdout < 1.0):
        raise ProbeError(f"--holdout {cfg.holdout} must lie in (0, 1)", "use e.g. --holdout 0.1")
    if cfg.min_holdout < 0:
        raise ProbeError(
            f"--min-holdout {cfg.min_holdout} must be >= 0", "use e.g. --min-holdout 30 (0: off)"
        )
    if cfg.shots is not None and cfg.train_fraction is not None:
        raise ProbeError("--shots and --train-fraction both choose the train subset", "pass one of them")
    if cfg.shots is not None and cfg.shots < 1:
        raise ProbeError(f"--shots {cfg.shots} must be >= 1", "e.g. --shots 5")
    if cfg.train_fraction is not None and not (
        math.isfinite(cfg.train_fraction) and 0 < cfg.train_fraction <= 1
    ):
        raise ProbeError(
            f"--train-fraction {cfg.train_fraction} must lie in (0, 1]", "e.g. --train-fraction 0.01"
        )
    if cfg.seeds < 1:
        raise ProbeError(f"--seeds {cfg.seeds} must be >= 1", "e.g. --seeds 5")
    if cfg.seeds > 1 and cfg.shots is None and cfg.train_fraction is None:
        raise ProbeError(
            "--seeds draws several train subsets, and no subset was asked for",
            "add --shots K or --train-fraction F",
        )
    if cfg.epochs < 1 or cfg.batch_size < 2 or cfg.eval_every < 0 or cfg.min_steps < 0:
        raise ProbeError(
            "--epochs must be >= 1, --batch-size >= 2, --eval-every and --min-steps >= 0", "fix the values"
        )
    if not (math.isfinite(cfg.warmup_epochs) and cfg.warmup_epochs >= 0):
        raise ProbeError(
            f"--warmup-epochs {cfg.warmup_epochs} must be finite and >= 0", "e.g. --warmup-epochs 10"
        )
    if not cfg.weight_decay or any(not (math.isfinite(v) and v >= 0) for v in cfg.weight_decay):
        raise ProbeError(
            f"--weight-decay {cfg.weight_decay}: values must be finite and >= 0",
            "e.g. --weight-decay 0,1e-4",
        )
    if len(set(cfg.weight_decay)) != len(cfg.weight_decay):
        raise ProbeError(f"--weight-decay {cfg.weight_decay} repeats a value", "list each value once")
    if not (math.isfinite(cfg.momentum) and 0 <= cfg.momentum < 1):
        raise ProbeError(f"--momentum {cfg.momentum} must lie in [0, 1)", "e.g. --momentum 0.9")
    if not cfg.lr_grid:
        raise ProbeError("--lr-grid is empty", "e.g. --lr-grid 0.01,0.1,1")
    _finite_positive(cfg.lr_grid, "--lr-grid", "0.01,0.1,1")
    if len(set(cfg.lr_grid)) != len(cfg.lr_grid):
        raise ProbeError(f"--lr-grid {cfg.lr_grid} repeats a value", "list each base lr once")
    _finite_positive(cfg.c_grid, "--c-grid", "0.01,1,100")
    if not cfg.pools:
        raise ProbeError("no read-out to train", f"pass --pool {' / '.join(POOLS)}")
    if isinstance(cfg.layer, str) and cfg.layer != "all":
        raise ProbeError(f"--layer {cfg.layer!r}", "pass a block (e.g. -1), a list (3,7,11) or all")
    if isinstance(cfg.layer, tuple) and (not cfg.layer or len(set(cfg.layer)) != len(cfg.layer)):
        raise ProbeError(f"--layer {cfg.layer} is empty or names a block twice", "list each block once")
    if cfg.protocol == "logreg":
        wrong = [p for p in cfg.pools if p not in LOGREG_POOLS]
        if wrong:
            raise ProbeError(
                f"--protocol logreg fits pooled features only, not {', '.join(wrong)}",
                f"use --pool {' / '.join(LOGREG_POOLS)} with logreg, or another --protocol for {wrong[0]}",
            )
    for pool in cfg.pools:
        cfg.head_spec(pool)  # validates names and options


@dataclass(frozen=True)
class Schedule:
    """What a run does with its train rows: batch, steps, epochs, warm-up, evaluation cadence."""

    batch_size: int  # rows per step actually used
    steps_per_epoch: int
    epochs: int  # epochs run (>= cfg.epochs; more when min_steps asks for it)
    total_steps: int
    warmup_epochs: float
    eval_every: int  # evaluate every N epochs, and at the last
    scaled: bool  # epochs were raised to reach cfg.min_steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_schedule(cfg: ProbeConfig, rows: int) -> Schedule:
    """The schedule for `rows` train rows per epoch: the batch is capped at the rows, epochs grow until the
    run has `min_steps` steps, and evaluation happens about 100 times (every epoch for short runs)."""
    batch = max(1, min(cfg.batch_size, rows))
    per_epoch = num_batches(rows, batch, drop_last=True)
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / per_epoch))
    every = cfg.eval_every or max(1, math.ceil(epochs / 100))
    return Schedule(
        batch_size=batch,
        steps_per_epoch=per_epoch,
        epochs=epochs,
        total_steps=epochs * per_epoch,
        warmup_epochs=min(cfg.warmup_epochs, float(epochs)),
        eval_every=every,
        scaled=epochs > cfg.epochs,
    )


def lr_factor(step: int, schedule: Schedule) -> float:
    """MAE's per-step schedule: linear warm-up to 1, then half-cosine to 0 at the last step."""
    e = step / schedule.steps_per_epoch
    warm = schedule.warmup_epochs
    if e < warm:
        return e / warm
    if schedule.epochs <= warm:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (e - warm) / (schedule.epochs - warm)))
