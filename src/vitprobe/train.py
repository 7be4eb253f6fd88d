"""Probe training: fit every read-out × learning rate in one pass over a token cache, then select.

Each batch is read once and fed to every head (DINOv2-eval style); heads are independent modules, each with
its own optimizer, so a head trained beside others ends bit-identical to the same head trained alone with the
same seed and data order. Selection picks each read-out's learning rate and epoch on a stratified holdout of
the train cache (or on test, which is optimistic), reports the test accuracy of that choice, and can refit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vitprobe.errors import CacheError, ProbeError
from vitprobe.heads import HeadSpec, ProbeHead, Tokens, apply_final_norm, build_head
from vitprobe.progress import make_progress
from vitprobe.provenance import versions

if TYPE_CHECKING:
    from rich.console import Console

    from vitprobe.cache import TokenCache

RESULTS_FORMAT = "vitprobe-probe-results"
HEAD_FORMAT = "vitprobe-head"
FORMAT_VERSION = 1
OPTIMIZERS = ("lars", "sgd", "adamw")
SELECT_ON = ("holdout", "test")
LOAD_MODES = ("auto", "memory", "stream")


@dataclass(frozen=True)
class ProbeConfig:
    """How a probe run is made; written whole into results.json."""

    pools: tuple[str, ...] = (
        "cls",
        "mean",
        "abmilp",
    )  # read-outs to train (Beyond [cls] compares these three)
    layer: int | None = None  # block to probe when the cache holds several; None = the deepest one stored
    final_norm: bool = False  # apply the backbone's final LayerNorm to tokens first (timm forward_features)
    abmilp_depth: int = 0  # extra Linear+act layers before the AbMILP score (0 = paper's D+1-param score)
    abmilp_act: str = "tanh"  # activation of those layers (the Beyond [cls] reference default)
    abmilp_content: str = "patch"  # pool patch tokens only (paper's MAE setting) or "all" tokens
    queries: int = 4  # learnable queries of the attentive read-out (efficient probing uses a few)
    epochs: int = 90  # MAE linear-probe schedule (MAE §A.2, Beyond [cls])
    batch_size: int = 1024  # per-step batch; lr scales with it
    optimizer: str = "lars"  # MAE linear probing uses LARS (You et al., 2017), here timm.optim.Lars
    blr: float = 0.1  # base lr; lr = blr × batch_size / 256 (MAE main_linprobe.py default)
    lr_grid: tuple[float, ...] = ()  # base lrs trained side by side; empty = (blr,)
    warmup_epochs: int = 10  # linear warm-up, then cosine to 0, per step (MAE)
    weight_decay: float = 0.0  # MAE linear probing uses none
    momentum: float = 0.9  # LARS / SGD momentum (MAE's LARS default)
    select_on: str = "holdout"  # pick lr and epoch on a held-out train split; "test" is optimistic
    holdout: float = 0.1  # stratified fraction of the train cache held out for selection
    refit: bool = False  # after selection, retrain on the full train cache with the chosen lr and epochs
    eval_every: int = 1  # evaluate every N epochs (and at the last) for curves and selection
    seed: int = 0  # head init, data order and holdout split
    device: str = "auto"  # auto = CUDA when available
    load: str = "auto"  # "memory" loads the caches whole, "stream" reads shard by shard, auto decides by size
    preload_gb: float = 8.0  # auto: load whole when the rows needed fit in this many GB
    shuffle_shards: int = 4  # streaming: shards mixed in one shuffle buffer (memory = this many shards)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ProbeError(f"unknown --optimizer {self.optimizer!r}", f"use one of {', '.join(OPTIMIZERS)}")
        if self.select_on not in SELECT_ON:
            raise ProbeError(f"unknown --select-on {self.select_on!r}", "use holdout or test")
        if self.load not in LOAD_MODES:
            raise ProbeError(f"unknown load mode {self.load!r}", f"use one of {', '.join(LOAD_MODES)}")
        if self.refit and self.select_on == "test":
            raise ProbeError(
                "--refit with --select-on test: refit retrains with the lr and epoch chosen on a train "
                "holdout, and with --select-on test there is no holdout",
                "drop --refit, or select on the holdout (--select-on holdout, the default)",
            )
        if self.select_on == "holdout" and not 0.0 < self.holdout < 1.0:
            raise ProbeError(f"--holdout {self.holdout} must lie in (0, 1)", "use e.g. --holdout 0.1")
        if self.epochs < 1 or self.batch_size < 2 or self.eval_every < 1:
            raise ProbeError("--epochs, --eval-every must be >= 1 and --batch-size >= 2", "fix the values")
        if not self.pools:
            raise ProbeError("no read-out to train", "pass --pool cls / mean / cls+mean / abmilp / attentive")
        for pool in self.pools:
            self.head_spec(pool)  # validates names and options

    @property
    def base_lrs(self) -> tuple[float, ...]:
        return tuple(self.lr_grid) or (self.blr,)

    def lr(self, blr: float, rows: int | None = None) -> float:
        """Absolute lr for a base lr (MAE: lr = blr × batch / 256).

        The batch is the one actually used: `min(batch_size, rows)` when an epoch has fewer rows than
        `batch_size` (small datasets), so the linear scaling rule is not inflated by rows that do not exist.
        """
        return blr * self.effective_batch(rows) / 256

    def effective_batch(self, rows: int | None = None) -> int:
        """Rows per step: `batch_size`, or all rows of an epoch when there are fewer."""
        return self.batch_size if rows is None else max(1, min(self.batch_size, rows))

    def head_spec(self, pool: str) -> HeadSpec:
        return HeadSpec(
            pool=pool,
            abmilp_depth=self.abmilp_depth,
            abmilp_act=self.abmilp_act,
            abmilp_content=self.abmilp_content,
            queries=self.queries,
        )


# ------------------------------------------------------------------------------------------ token sources


class TokenSource:
    """Rows of tokens for one block, grouped in blocks (cache shards) that are read one at a time.

    Attributes:
        labels: (N,) int64 class of each row, in source order.
        indices: (N,) int64 dataset index of each row (views of one image share it).
        views: (N,) int64 view number of each row, or None when every image has one row.
        blocks: (start, stop) row range of each block.
    """

    num_rows: int
    dim: int
    grid: tuple[int, int]
    num_classes: int
    class_names: list[str]
    labels: torch.Tensor
    indices: torch.Tensor
    views: torch.Tensor | None
    blocks: list[tuple[int, int]]
    keys: frozenset[str]  # token keys present: cls, patches, reg, mean

    def read_block(self, i: int, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Block i's tensors for `keys` (plus "labels"), each (n, ...) with the layer already picked."""
        raise NotImplementedError

    def row_bytes(self, keys: Sequence[str]) -> int:
        """Bytes one row of `keys` takes in memory."""
        first = self.read_block(0, keys)
        n = self.blocks[0][1] - self.blocks[0][0]
        return sum(t.element_size() * t.numel() for t in first.values()) // max(n, 1)


class MemorySource(TokenSource):
    """Tokens already in memory (tests, small experiments), cut into blocks of `block_size` rows."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        *,
        class_names: Sequence[str] | None = None,
        grid: tuple[int, int] | None = None,
        block_size: int | None = None,
    ) -> None:
        self.tensors = dict(tensors)
        self.labels = self.tensors["labels"].long()
        self.num_rows = len(self.labels)
        self.indices = self.tensors.get("indices", torch.arange(self.num_rows)).long()
        self.views = self.tensors["views"].long() if "views" in self.tensors else None
        self.keys = frozenset(k for k in ("cls", "patches", "reg", "mean") if k in self.tensors)
        self.dim = int(
            next(self.tensors[k] for k in ("cls", "patches", "mean") if k in self.tensors).shape[-1]
        )
        self.num_classes = len(class_names) if class_names else int(self.labels.max()) + 1
        self.class_names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]
        if grid is None and "patches" in self.tensors:
            side = int(math.isqrt(self.tensors["patches"].shape[1]))
            grid = (side, side)
        self.grid = grid or (0, 0)
        size = block_size or self.num_rows
        self.blocks = [(s, min(s + size, self.num_rows)) for s in range(0, self.num_rows, size)]

    def read_block(self, i: int, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        start, stop = self.blocks[i]
        return {k: self.tensors[k][start:stop] for k in (*keys, "labels")}


class CacheSource(TokenSource):
    """A token cache (vitprobe.cache) read shard by shard at one layer.

    With `verify` (the default), each shard's sha256 is checked against the manifest the first time it is
    read, so a corrupted shard stops the run with a CacheError instead of feeding garbage to the heads; this
    reads each shard once more in full.
    """

    def __init__(self, cache: TokenCache, layer: int, *, verify: bool = True) -> None:
        self.cache = cache
        self.verify = verify
        self.layer = layer
        self.layer_pos = list(cache.layers).index(layer)
        self.multi_layer = len(cache.layers) > 1
        self.num_rows = cache.num_samples
        self.dim = cache.dim
        self.grid = tuple(cache.grid)
        self.class_names = list(cache.class_names)
        self.num_classes = cache.num_classes
        self.labels = cache.labels().long()
        self.indices = cache.indices().long()
        self.blocks = [(s.start, s.stop) for s in cache.shards]
        self.keys = frozenset(cache_token_keys(cache))
        self.views = cache.view_ids().long() if cache.views > 1 else None

    def read_block(self, i: int, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.verify:
            self.cache.verify_shard(i)
        out = dict(self.cache.read_shard(i, keys=[*keys, "labels"]))
        if self.multi_layer:
            for k in keys:
                out[k] = out[k][:, self.layer_pos]  # (n, L, ...) -> (n, ...)
        return out


def cache_token_keys(cache: TokenCache) -> set[str]:
    """Token keys a cache's shards hold, from its manifest (tokens = all | cls | pooled)."""
    keys = {"cls"} if cache.has_cls else set()
    if cache.tokens == "all":
        keys.add("patches")
        if cache.num_reg_tokens:
            keys.add("reg")
    elif cache.tokens == "pooled":
        keys.add("mean")
    return keys


@dataclass
class Split:
    """The rows of a source used for one purpose (train, holdout, test)."""

    name: str
    source: TokenSource
    rows: torch.Tensor  # (n,) sorted row positions in the source
    memory: dict[str, torch.Tensor] | None = None  # the whole source in memory, when it was loaded

    def epoch_rows(self, epoch: int | None) -> torch.Tensor:
        """Rows seen in a training epoch (one view per image: view epoch mod V) or in evaluation (view 0)."""
        views = self.source.views
        if views is None:
            return self.rows
        num_views = int(views.max()) + 1
        want = 0 if epoch is None else epoch % num_views
        return self.rows[views[self.rows] == want]


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """Batches an epoch of n rows gives: full batches only when dropping, but never zero."""
    if drop_last and n >= batch_size:
        return n // batch_size
    return max(1, math.ceil(n / batch_size))


def iter_batches(
    split: Split,
    keys: Sequence[str],
    batch_size: int,
    *,
    epoch: int | None = None,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    shuffle_shards: int = 4,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of `keys` + "labels" over a split's rows; shuffled when a generator is given.

    In memory: one permutation of all rows. Streaming: shards in shuffled order, `shuffle_shards` at a time
    in a buffer that is shuffled again, so memory stays at a few shards whatever the cache size. With
    `drop_last`, a trailing partial batch is dropped (as MAE's loader does) unless it would be the only one.
    """
    rows = split.epoch_rows(epoch)
    if split.memory is not None:
        order = rows[torch.randperm(len(rows), generator=generator)] if generator is not None else rows
        count = num_batches(len(order), batch_size, drop_last)
        store = next(iter(split.memory.values())).device
        for b in range(count):
            take = order[b * batch_size : (b + 1) * batch_size].to(store)
            yield {k: split.memory[k][take] for k in (*keys, "labels")}
        return

    member = torch.zeros(split.source.num_rows, dtype=torch.bool)
    member[rows] = True
    blocks = list(range(len(split.source.blocks)))
    if generator is not None:
        blocks = [blocks[i] for i in torch.randperm(len(blocks), generator=generator).tolist()]
    groups = [blocks[g : g + shuffle_shards] for g in range(0, len(blocks), shuffle_shards)]

    def read_group(group: list[int]) -> list[dict[str, torch.Tensor]]:
        parts = []
        for i in group:
            start, stop = split.source.blocks[i]
            keep = member[start:stop]
            if keep.any():
                parts.append({k: v[keep] for k, v in split.source.read_block(i, keys).items()})
        return parts

    carry: dict[str, torch.Tensor] | None = None
    yielded = 0
    # One reader thread loads the next group of shards while the current one is trained on; the order and
    # the permutations are drawn here, in the caller's thread, so the batches do not depend on timing.
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(read_group, groups[0]) if groups else None
        for g in range(len(groups)):
            parts = pending.result()
            pending = reader.submit(read_group, groups[g + 1]) if g + 1 < len(groups) else None
            if carry is not None:
                parts.insert(0, carry)
            if not parts:
                continue
            buffer = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            n = len(buffer["labels"])
            if generator is not None:
                perm = torch.randperm(n, generator=generator)
                buffer = {k: v[perm] for k, v in buffer.items()}
            full = n // batch_size
            for b in range(full):
                yield {k: v[b * batch_size : (b + 1) * batch_size] for k, v in buffer.items()}
                yielded += 1
            carry = {k: v[full * batch_size :] for k, v in buffer.items()} if n > full * batch_size else None
    if carry is not None and (not drop_last or yielded == 0):
        yield carry


def to_tokens(batch: dict[str, torch.Tensor], device: torch.device, norm: dict[str, Any] | None) -> Tokens:
    """A batch dict as fp32 `Tokens` on `device`, with the final norm applied when asked."""
    tokens = Tokens(
        cls=batch.get("cls"), patches=batch.get("patches"), reg=batch.get("reg"), mean=batch.get("mean")
    ).to(device)
    if norm is not None:
        tokens = apply_final_norm(tokens, norm["weight"], norm["bias"], norm["eps"])
    return tokens


def load_whole(source: TokenSource, keys: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Every row of `keys` + labels, concatenated in source order, on `device`."""
    parts = [source.read_block(i, keys) for i in range(len(source.blocks))]
    return {k: torch.cat([p[k] for p in parts]).to(device) for k in parts[0]}


def stratified_holdout(
    labels: torch.Tensor, groups: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split rows into (train, holdout) positions, holding out `fraction` of each class's groups.

    Groups are dataset indices, so the views of one image never straddle the split. Each class keeps at
    least one group on the train side.
    """
    generator = torch.Generator().manual_seed(seed)
    uniq, first = _first_occurrence(groups)
    group_labels = labels[first]
    held = []
    for c in torch.unique(group_labels).tolist():
        members = uniq[group_labels == c]
        count = min(round(fraction * len(members)), len(members) - 1)
        if count > 0:
            held.append(members[torch.randperm(len(members), generator=generator)[:count]])
    held_groups = torch.cat(held) if held else groups[:0]
    is_held = torch.isin(groups, held_groups)
    positions = torch.arange(len(labels))
    return positions[~is_held], positions[is_held]


def _first_occurrence(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique values and the position of each one's first occurrence."""
    uniq, inverse = torch.unique(values, return_inverse=True)
    first = torch.full((len(uniq),), len(values), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(values)), reduce="amin")
    return uniq, first


# ---------------------------------------------------------------------------------------------- optimisation


def lr_factor(step: int, steps_per_epoch: int, epochs: int, warmup_epochs: float) -> float:
    """MAE's per-step schedule: linear warm-up to 1, then half-cosine to 0 at the last step."""
    e = step / steps_per_epoch
    if e < warmup_epochs:
        return e / warmup_epochs
    if epochs <= warmup_epochs:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (e - warmup_epochs) / (epochs - warmup_epochs)))


def make_optimizer(head: ProbeHead, cfg: ProbeConfig, lr: float) -> torch.optim.Optimizer:
    """The head's optimizer. Matrices get weight decay (and LARS adaptation); biases and vectors neither.

    LARS follows MAE's `util/lars.py`: trust ratio 0.001·|w|/|g| on every matrix even with weight decay 0
    (timm's `always_adapt=True`), plain momentum SGD on 1-D parameters.
    """
    matrices = [p for p in head.parameters() if p.ndim > 1]
    vectors = [p for p in head.parameters() if p.ndim <= 1]
    if cfg.optimizer == "lars":
        from timm.optim import Lars

        groups = [
            {"params": matrices, "always_adapt": True},
            {"params": vectors, "always_adapt": False, "weight_decay": 0.0},
        ]
        return Lars(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    groups = [{"params": matrices}, {"params": vectors, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)


def head_seed(seed: int, spec: HeadSpec) -> int:
    """Seed of a head's initial weights: depends on the run seed and the read-out only, never on which other
    heads train beside it, so a head alone and a head among many start the same."""
    return (seed * 1_000_003 + sum((i + 1) * ord(ch) for i, ch in enumerate(spec.pool))) % (2**63)


def init_head(spec: HeadSpec, dim: int, num_classes: int, seed: int) -> ProbeHead:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(head_seed(seed, spec))
        return build_head(spec, dim, num_classes)


@dataclass
class Metrics:
    """Accuracy of one head on one split."""

    top1: float
    top5: float
    per_class: list[float]  # accuracy per class (NaN for classes without samples)
    num_samples: int
    loss: float


@dataclass
class HeadRun:
    """One head trained at one learning rate, with its curves and its best state on the selection split."""

    spec: HeadSpec
    blr: float
    lr: float
    head: ProbeHead
    optimizer: torch.optim.Optimizer
    stop_epoch: int  # train up to and including this epoch (1-based)
    curves: dict[str, list[float]] = field(default_factory=dict)  # "epoch", "train_loss", "<split>_top1"
    best_score: float = -1.0
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    _loss_sum: Any = 0.0  # a device tensor while training: no host sync per step
    _loss_count: int = 0

    @property
    def key(self) -> str:
        return f"{self.spec.name}@blr={self.blr:g}"


def _state_copy(head: ProbeHead) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


@torch.no_grad()
def evaluate(
    heads: Sequence[ProbeHead],
    split: Split,
    keys: Sequence[str],
    *,
    batch_size: int,
    device: torch.device,
    norm: dict[str, Any] | None,
    num_classes: int,
    shuffle_shards: int = 4,
) -> list[Metrics]:
    """Top-1, top-5, per-class accuracy and loss of each head on a split (view 0 of each image)."""
    for head in heads:
        head.eval()
    k5 = min(5, num_classes)
    correct1 = [torch.zeros(num_classes, device=device) for _ in heads]
    correct5 = [torch.zeros((), device=device) for _ in heads]
    loss_sum = [torch.zeros((), device=device) for _ in heads]
    counts = torch.zeros(num_classes, device=device)
    for batch in iter_batches(split, keys, batch_size, shuffle_shards=shuffle_shards):
        tokens = to_tokens(batch, device, norm)
        labels = batch["labels"].to(device).long()
        counts += torch.bincount(labels, minlength=num_classes)
        for i, head in enumerate(heads):
            logits = head(tokens)  # (B, C)
            top = logits.topk(k5, dim=1).indices  # (B, k5)
            hit1 = top[:, 0] == labels
            correct1[i] += torch.bincount(labels[hit1], minlength=num_classes)
            correct5[i] += (top == labels[:, None]).any(dim=1).sum()
            loss_sum[i] += F.cross_entropy(logits, labels, reduction="sum")
    n = counts.sum().clamp(min=1)
    out = []
    for i in range(len(heads)):
        per_class = torch.where(counts > 0, correct1[i] / counts.clamp(min=1), torch.nan)
        out.append(
            Metrics(
                top1=float(correct1[i].sum() / n),
                top5=float(correct5[i] / n),
                per_class=per_class.tolist(),
                num_samples=int(counts.sum()),
                loss=float(loss_sum[i] / n),
            )
        )
    return out


def fit(
    runs: Sequence[HeadRun],
    train: Split,
    evals: Sequence[Split],
    cfg: ProbeConfig,
    *,
    keys: Sequence[str],
    device: torch.device,
    norm: dict[str, Any] | None,
    num_classes: int,
    select: str | None = None,
    console: Console | None = None,
    description: str = "probing",
) -> None:
    """Train every run in one pass per epoch: each batch is read once and fed to every head.

    Heads are evaluated on each split of `evals` every `cfg.eval_every` epochs (and at each run's last
    epoch); with `select`, each run keeps its best state on that split (earliest epoch on ties). A run
    stops after its `stop_epoch`; without `select`, the state at `stop_epoch` becomes `best_state`.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    last_epoch = max(r.stop_epoch for r in runs)
    steps_per_epoch = num_batches(len(train.epoch_rows(0)), cfg.batch_size, drop_last=True)
    progress = make_progress(console, transient=True)
    step = 0
    with progress:
        task = progress.add_task(description, total=steps_per_epoch * last_epoch)
        for epoch in range(last_epoch):
            active = [r for r in runs if epoch < r.stop_epoch]
            for r in active:
                r.head.train()
            for batch in iter_batches(
                train,
                keys,
                cfg.batch_size,
                epoch=epoch,
                generator=generator,
                drop_last=True,
                shuffle_shards=cfg.shuffle_shards,
            ):
                factor = lr_factor(step, steps_per_epoch, cfg.epochs, cfg.warmup_epochs)
                tokens = to_tokens(batch, device, norm)
                labels = batch["labels"].to(device).long()
                for r in active:
                    for group in r.optimizer.param_groups:
                        group["lr"] = r.lr * factor
                    loss = F.cross_entropy(r.head(tokens), labels)
                    r.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    r.optimizer.step()
                    r._loss_sum = r._loss_sum + loss.detach()
                    r._loss_count += 1
                step += 1
                progress.advance(task)
            done = epoch + 1
            evaluating = [r for r in active if done % cfg.eval_every == 0 or done == r.stop_epoch]
            if not evaluating:
                continue
            scores = {
                s.name: evaluate(
                    [r.head for r in evaluating],
                    s,
                    keys,
                    batch_size=cfg.batch_size,
                    device=device,
                    norm=norm,
                    num_classes=num_classes,
                    shuffle_shards=cfg.shuffle_shards,
                )
                for s in evals
            }
            for i, r in enumerate(evaluating):
                r.curves.setdefault("epoch", []).append(done)
                r.curves.setdefault("train_loss", []).append(float(r._loss_sum) / max(r._loss_count, 1))
                r._loss_sum, r._loss_count = 0.0, 0
                for name, metrics in scores.items():
                    r.curves.setdefault(f"{name}_top1", []).append(metrics[i].top1)
                if select is not None and scores[select][i].top1 > r.best_score:
                    r.best_score, r.best_epoch, r.best_state = (
                        scores[select][i].top1,
                        done,
                        _state_copy(r.head),
                    )
                if select is None and done == r.stop_epoch:
                    r.best_epoch, r.best_state = done, _state_copy(r.head)


# ------------------------------------------------------------------------------------------------ probe runs


def needed_keys(
    specs: Sequence[HeadSpec], available: frozenset[str] | set[str], final_norm: bool
) -> list[str]:
    """Token keys the read-outs read from the cache."""
    keys: set[str] = set()
    for spec in specs:
        if spec.needs_cls:
            keys.add("cls")
        if spec.pool in ("mean", "cls+mean"):
            keys.add("patches" if "patches" in available or final_norm else "mean")
        if spec.needs_patches:
            keys.add("patches")
        if spec.pool == "abmilp" and spec.abmilp_content == "all":
            keys |= {"cls", "reg"} & set(available)
    return sorted(keys)


def resolve_specs(
    cfg: ProbeConfig,
    available: frozenset[str],
    *,
    explicit: bool,
    where: str = "the cache",
    fix: str = "extract the cache with --tokens all, or drop this --pool",
) -> tuple[list[HeadSpec], list[str]]:
    """The read-outs the caches can feed (`available` token keys), and notes for those skipped.

    `where` names the cache(s) in messages, `fix` is the hint of a refusal.

    A missing [cls] token always skips `cls` / `cls+mean` with a note (models without one). Read-outs that
    need patch tokens on a cache without them are skipped with a note when the pools were defaulted, refused
    when asked for explicitly.
    """
    specs, notes = [], []
    for pool in dict.fromkeys(cfg.pools):
        spec = cfg.head_spec(pool)
        if spec.needs_cls and "cls" not in available:
            notes.append(f"skipped {pool}: the backbone has no [cls] token")
            continue
        wants_patches = spec.needs_patches or (cfg.final_norm and pool in ("mean", "cls+mean"))
        if wants_patches and "patches" not in available:
            why = (
                "--final-norm on a mean read-out needs per-token patches"
                if not spec.needs_patches
                else f"the {pool} read-out needs patch tokens"
            )
            if explicit:
                raise ProbeError(
                    f"{why}, and {where} holds only {sorted(available)}", fix
                )
            notes.append(f"skipped {pool}: {why} ({where} holds {sorted(available)})")
            continue
        if pool in ("mean", "cls+mean") and not available & {"patches", "mean"}:
            notes.append(f"skipped {pool}: {where} holds no patch tokens or mean")
            continue
        specs.append(spec)
    if not specs:
        raise ProbeError(
            f"no read-out can be trained on {where} (" + "; ".join(notes) + ")",
            "extract the caches with --tokens all",
        )
    return specs, notes


def resolve_layer(cache: TokenCache, layer: int | None) -> int:
    """The block to probe: `layer` (negative counts from the model's last block, as `extract --layers`
    does: -1 = last) if the cache holds it, else the deepest block stored when `layer` is None."""
    layers = list(cache.layers)
    if layer is None:
        return max(layers)
    depth = cache.manifest.get("depth")
    block = layer + int(depth) if layer < 0 and depth is not None else layer
    if block in layers:
        return block
    given = f"{layer} (block {block} of {depth})" if block != layer else str(layer)
    raise ProbeError(
        f"layer {given} is not in the cache {cache.path} (it holds blocks {layers})",
        f"pass --layer with one of {layers}, or extract that block with `vitprobe extract --layers`",
    )


def backbone_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """What identifies the backbone a cache came from: timm name, checkpoint id, random-init flag, and for
    random weights the seed that drew them (two random-init caches of one model differ unless it matches)."""
    model = manifest.get("model", {})
    random_init = bool(model.get("random_init", False))
    return {
        "timm_name": model.get("timm_name"),
        "checkpoint": model.get("checkpoint"),
        "random_init": random_init,
        "seed": manifest.get("seed") if random_init else None,
    }


def token_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """`backbone_identity` plus what a head depends on: token dim and the class names, in order."""
    dataset = manifest.get("dataset", {})
    return {**backbone_identity(manifest), "dim": manifest.get("dim"),
            "class_names": list(dataset.get("class_names", []))}


def identity_mismatch(ours: dict[str, Any], theirs: dict[str, Any]) -> tuple[str, str] | None:
    """How two `token_identity` dicts first disagree, as (what differs, how to fix it); None if they match.

    A key missing on one side (heads saved by an older vitprobe have no seed) is not compared.
    """
    if ours["timm_name"] != theirs["timm_name"]:
        return (f"different backbones ({ours['timm_name']} vs {theirs['timm_name']})",
                "use tokens extracted with the same --model")
    if ours["checkpoint"] != theirs["checkpoint"] or ours["random_init"] != theirs["random_init"]:
        return (f"different checkpoints ({ours['checkpoint']} vs {theirs['checkpoint']})",
                "use tokens extracted from the same weights")
    if ours.get("seed", theirs.get("seed")) != theirs.get("seed", ours.get("seed")):
        return (f"different random weights (random-init seeds {ours['seed']} vs {theirs['seed']})",
                "extract both with the same --random-init --seed")
    if int(ours["dim"]) != int(theirs["dim"]):
        return f"token dims differ ({ours['dim']} vs {theirs['dim']})", "use tokens of one backbone"
    if list(ours["class_names"]) != list(theirs["class_names"]):
        a, b = ours["class_names"], theirs["class_names"]
        diff = sorted(set(a) ^ set(b))[:5] or ["same names, other order"]
        return (f"class sets differ ({len(a)} vs {len(b)} classes; differing: {', '.join(diff)})",
                "use splits of one dataset (same class folders)")
    return None


def pair_warnings(train: TokenCache, test: TokenCache) -> list[str]:
    """Warnings for a train/test pair's results: random weights, test images that were trained on."""
    warnings = []
    if backbone_identity(train.manifest)["random_init"]:
        warnings.append("the backbone was randomly initialised: these accuracies measure nothing pretrained")
    a, b = train.manifest["dataset"], test.manifest["dataset"]
    if a.get("fingerprint") and a.get("fingerprint") == b.get("fingerprint"):
        warnings.append(
            f"the train and test caches hold the same images ({a['spec']}, split {a['split']}, fingerprint "
            f"{str(a['fingerprint'])[:12]}): the test accuracy is a training accuracy"
        )
    return warnings


def check_pair(train: TokenCache, test: TokenCache, layer: int) -> None:
    """Refuse a train/test pair from different backbones, weights, layers, dims or class sets."""
    where = f"train cache {train.path} vs test cache {test.path}"
    problem = identity_mismatch(token_identity(train.manifest), token_identity(test.manifest))
    if problem is not None:
        raise CacheError(f"{where}: {problem[0]}", problem[1])
    if layer not in test.layers:
        raise CacheError(
            f"{where}: block {layer} is in the train cache but not the test cache "
            f"(it holds {list(test.layers)})",
            "extract the same --layers for both splits",
        )


def final_norm_state(cache: TokenCache, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The backbone's final LayerNorm as {"weight", "bias" (fp32, on `device`), "eps"} from the cache."""
    state = cache.final_norm_state()
    info = cache.manifest.get("final_norm", {})
    if "weight" not in state or "bias" not in state:
        raise ProbeError(
            f"--final-norm: the cache {cache.path} stores no final LayerNorm (type {info.get('type')!r})",
            "drop --final-norm for this backbone",
        )
    eps = info.get("eps")
    return {
        "weight": state["weight"].float().to(device),
        "bias": state["bias"].float().to(device),
        "eps": float(1e-6 if eps is None else eps),
    }


def _load_decision(
    cfg: ProbeConfig, sources: Sequence[TokenSource], keys: Sequence[str], device: torch.device
) -> tuple[bool, torch.device]:
    """Whether to load the caches whole, and where (GPU when they fit in half its free memory)."""
    if cfg.load == "stream":
        return False, torch.device("cpu")
    need = sum(s.row_bytes(keys) * s.num_rows for s in sources)
    if cfg.load == "auto" and need > cfg.preload_gb * 2**30:
        return False, torch.device("cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need < free // 2:
            return True, device
    return True, torch.device("cpu")


def train_probes(
    train_src: TokenSource,
    test_src: TokenSource,
    cfg: ProbeConfig,
    specs: Sequence[HeadSpec],
    *,
    keys: Sequence[str],
    norm: dict[str, Any] | None = None,
    device: torch.device | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Train every read-out × base lr in one pass, select, optionally refit; the library core of `probe`.

    Returns a dict with "readouts" (per read-out: chosen lr/epoch, test metrics, curves per lr, the trained
    `head` module), "selection" and "timing"; `run_probe` turns it into results.json and saved heads.
    """
    device = device or torch.device("cpu")
    start = time.perf_counter()
    in_memory, store = _load_decision(cfg, [train_src, test_src], keys, device)
    train_memory = load_whole(train_src, keys, store) if in_memory else None
    test_memory = load_whole(test_src, keys, store) if in_memory else None
    all_rows = torch.arange(train_src.num_rows)
    test_split = Split("test", test_src, torch.arange(test_src.num_rows), test_memory)
    if norm is not None:
        norm = {"weight": norm["weight"].to(device), "bias": norm["bias"].to(device), "eps": norm["eps"]}

    if cfg.select_on == "holdout":
        fit_rows, held_rows = stratified_holdout(train_src.labels, train_src.indices, cfg.holdout, cfg.seed)
        if len(held_rows) == 0:  # selection on nothing would silently pick epoch 1 of the first lr
            images = len(torch.unique(train_src.indices))
            raise ProbeError(
                f"--holdout {cfg.holdout:g} holds out no image: the train cache has {images} images in "
                f"{train_src.num_classes} classes, and {cfg.holdout:g} of each class rounds to 0 "
                "(a class keeps at least one image for training)",
                "pass a larger --holdout (e.g. 0.2), or --select-on test (optimistic)",
            )
        selection = Split("holdout", train_src, held_rows, train_memory)
    else:
        fit_rows, held_rows = all_rows, all_rows[:0]
        selection = test_split
    fit_split = Split("train", train_src, fit_rows, train_memory)
    evals = [selection, test_split] if selection is not test_split else [test_split]

    dim, num_classes = train_src.dim, train_src.num_classes
    epoch_rows = len(fit_split.epoch_rows(0))
    runs = []
    for spec in specs:
        for blr in cfg.base_lrs:
            head = init_head(spec, dim, num_classes, cfg.seed).to(device)
            lr = cfg.lr(blr, epoch_rows)
            runs.append(HeadRun(spec, blr, lr, head, make_optimizer(head, cfg, lr), cfg.epochs))
    common = {"keys": keys, "device": device, "norm": norm, "num_classes": num_classes}
    fit(
        runs,
        fit_split,
        evals,
        cfg,
        select=selection.name,
        console=console,
        description=f"{len(runs)} heads × {cfg.epochs} epochs",
        **common,
    )

    readouts: dict[str, dict[str, Any]] = {}
    for spec in specs:
        mine = [r for r in runs if r.spec == spec]
        best = max(mine, key=lambda r: r.best_score)  # first in lr-grid order on ties
        best.head.load_state_dict(best.best_state)
        readouts[spec.name] = {"spec": spec, "run": best, "runs": mine}

    if cfg.refit:  # ProbeConfig refuses --refit with --select-on test
        refits = []
        for spec in specs:
            chosen: HeadRun = readouts[spec.name]["run"]
            head = init_head(spec, dim, num_classes, cfg.seed).to(device)
            refits.append(
                HeadRun(
                    spec,
                    chosen.blr,
                    chosen.lr,
                    head,
                    make_optimizer(head, cfg, chosen.lr),
                    stop_epoch=chosen.best_epoch,
                )
            )
        full = Split("train", train_src, all_rows, train_memory)
        fit(refits, full, [test_split], cfg, select=None, console=console, description="refit", **common)
        for r in refits:
            r.head.load_state_dict(r.best_state)
            readouts[r.spec.name]["refit"] = r

    final_heads = [readouts[s.name].get("refit", readouts[s.name]["run"]).head for s in specs]
    test_metrics = evaluate(
        final_heads,
        test_split,
        keys,
        batch_size=cfg.batch_size,
        device=device,
        norm=norm,
        num_classes=num_classes,
        shuffle_shards=cfg.shuffle_shards,
    )
    for spec, metrics, head in zip(specs, test_metrics, final_heads, strict=True):
        readouts[spec.name]["test"] = metrics
        readouts[spec.name]["head"] = head
    return {
        "readouts": readouts,
        "selection": {
            "split": cfg.select_on,
            "rule": (
                "max top-1 over (lr, epoch) on a stratified holdout of the train cache; test reported at "
                "that choice"
                if cfg.select_on == "holdout"
                else "max test top-1 over (lr, epoch): optimistic, as papers that report the best test epoch"
            ),
            "optimistic": cfg.select_on == "test",
            "train_rows": len(fit_rows),
            "batch_size": cfg.effective_batch(epoch_rows),  # rows per step; the lr scales with it
            "holdout_rows": len(held_rows),
            "test_rows": test_src.num_rows,
            "refit": cfg.refit,
        },
        "timing": {
            "seconds": time.perf_counter() - start,
            "in_memory": in_memory,
            "store_device": str(store),
            "device": str(device),
            "heads": len(runs),
        },
    }


def run_probe(
    train_path: str | Path,
    test_path: str | Path,
    cfg: ProbeConfig,
    out_dir: str | Path,
    *,
    explicit_pools: bool = True,
    overwrite: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """`vitprobe probe`: train heads on a train cache, select, test, write results.json and heads/.

    An earlier probe run in `out_dir` is never lost by accident: without `overwrite` it is refused before
    any training; with it, the new heads/ and results.json replace the old ones only once all are written.

    Args:
        train_path: token cache of the train split.
        test_path: token cache of the test split (same backbone, layer, dim and classes).
        cfg: the protocol; recorded whole in results.json.
        out_dir: RUN_DIR; gets results.json and heads/<pool>.safetensors + heads/<pool>.json.
        explicit_pools: whether the user named the pools (unavailable ones then raise instead of a note).
        overwrite: replace an earlier probe run's results.json and heads/ in `out_dir`.
        console: where the progress bar goes (none when not a terminal).

    Returns:
        The results dict written to results.json.
    """
    import shutil
    import tempfile

    from vitprobe.cache import open_cache
    from vitprobe.devices import resolve_device
    from vitprobe.files import write_json

    out_dir = Path(out_dir)
    if (out_dir / "results.json").exists() and not overwrite:
        raise ProbeError(
            f"{out_dir} already holds results.json of an earlier probe run",
            "pass --overwrite to replace it (and its heads/), or choose another --out",
        )
    train_cache = open_cache(train_path)
    test_cache = open_cache(test_path)
    layer = resolve_layer(train_cache, cfg.layer)
    check_pair(train_cache, test_cache, layer)
    available = frozenset(cache_token_keys(train_cache)) & frozenset(cache_token_keys(test_cache))
    partial = [f"{name} cache {c.path} (--tokens {c.tokens})"
               for name, c in (("train", train_cache), ("test", test_cache)) if c.tokens != "all"]
    where = " and ".join(partial) or "the caches"
    specs, notes = resolve_specs(cfg, available, explicit=explicit_pools, where=where)
    keys = needed_keys(specs, available, cfg.final_norm)
    device = resolve_device(cfg.device)
    norm = final_norm_state(train_cache, device) if cfg.final_norm else None
    train_src, test_src = CacheSource(train_cache, layer), CacheSource(test_cache, layer)
    out = train_probes(train_src, test_src, cfg, specs, keys=keys, norm=norm, device=device, console=console)

    identity = backbone_identity(train_cache.manifest)
    warnings = pair_warnings(train_cache, test_cache)
    if cfg.select_on == "test":
        warnings.append(
            "--select-on test: lr and epoch were picked on the test set; accuracies are optimistic"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".heads-", dir=out_dir))  # swapped in once results are complete
    readouts = {}
    try:
        for spec in specs:
            entry = out["readouts"][spec.name]
            head_file = save_head(
                entry["head"],
                staging / f"{spec.name}.safetensors",
                spec=spec,
                cache=train_cache,
                layer=layer,
                final_norm=cfg.final_norm,
                blr=entry["run"].blr,
                lr=entry["run"].lr,
                epoch=entry["run"].best_epoch,
            )
            readouts[spec.name] = _readout_json(
                entry, cfg, train_cache.class_names, Path("heads") / head_file.name
            )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    results = {
        "format": RESULTS_FORMAT,
        "version": FORMAT_VERSION,
        "kind": "probe",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "random_init": identity["random_init"],
        "warnings": warnings,
        "notes": notes,
        "layer": layer,
        "final_norm": cfg.final_norm,
        "num_classes": train_cache.num_classes,
        "class_names": list(train_cache.class_names),
        "selection": out["selection"],
        "readouts": readouts,
        "config": asdict(cfg),
        "train_cache": {"path": str(train_cache.path), "provenance": train_cache.provenance()},
        "test_cache": {"path": str(test_cache.path), "provenance": test_cache.provenance()},
        "timing": out["timing"],
    }
    heads_dir, retired = out_dir / "heads", out_dir / f".heads-old-{staging.name}"
    if heads_dir.exists():
        heads_dir.rename(retired)
    staging.chmod(0o755)
    staging.rename(heads_dir)
    write_json(out_dir / "results.json", results)
    shutil.rmtree(retired, ignore_errors=True)
    return results


def _readout_json(
    entry: dict[str, Any], cfg: ProbeConfig, class_names: Sequence[str], head_file: Path
) -> dict[str, Any]:
    run: HeadRun = entry["run"]
    test: Metrics = entry["test"]
    refit: HeadRun | None = entry.get("refit")
    return {
        "options": run.spec.options(),
        "blr": run.blr,
        "lr": run.lr,
        "epoch": run.best_epoch,
        "selection_top1": run.best_score,
        "top1": test.top1,
        "top5": test.top5,
        "test_loss": test.loss,
        "num_test_samples": test.num_samples,
        "per_class": {
            name: (None if math.isnan(acc) else acc)
            for name, acc in zip(class_names, test.per_class, strict=True)
        },
        "test_top1_before_refit": (
            run.curves.get("test_top1", [None])[run.curves["epoch"].index(run.best_epoch)]
            if refit is not None
            else None
        ),
        "refit": refit is not None,
        "head": str(head_file),
        "curves": {f"{r.blr:g}": {"blr": r.blr, "lr": r.lr, **r.curves} for r in entry["runs"]},
    }


# ---------------------------------------------------------------------------------------------- saved heads


def save_head(
    head: ProbeHead,
    path: str | Path,
    *,
    spec: HeadSpec,
    cache: TokenCache,
    layer: int,
    final_norm: bool,
    blr: float | None = None,
    lr: float | None = None,
    epoch: int | None = None,
) -> Path:
    """Write a head's weights (safetensors) and, beside them, JSON saying what it was trained on."""
    from safetensors.torch import save_file

    from vitprobe.files import atomic_path, write_json

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": HEAD_FORMAT, "pool": spec.pool})
    model = cache.manifest.get("model", {})
    meta = {
        "format": HEAD_FORMAT,
        "version": FORMAT_VERSION,
        "weights": path.name,
        "pool": spec.pool,
        "options": spec.options(),
        "spec": asdict(spec),
        "backbone": {"spec": model.get("spec"), **backbone_identity(cache.manifest)},
        "layer": layer,
        "final_norm": final_norm,
        "final_norm_eps": float(cache.manifest.get("final_norm", {}).get("eps", 1e-6))
        if final_norm
        else None,
        "num_classes": cache.num_classes,
        "class_names": list(cache.class_names),
        "dim": cache.dim,
        "grid": list(cache.grid),
        "num_prefix_tokens": cache.num_prefix_tokens,
        "blr": blr,
        "lr": lr,
        "epoch": epoch,
    }
    write_json(path.with_suffix(".json"), meta)
    return path


def load_head(path: str | Path) -> tuple[ProbeHead, dict[str, Any]]:
    """A saved head (weights + JSON) as a module in eval mode, and its JSON."""
    from safetensors.torch import load_file

    from vitprobe.files import read_json

    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise ProbeError(
            f"saved head {path} (and {meta_path.name} beside it) not found",
            "pass RUN_DIR/heads/<pool>.safetensors from a `vitprobe probe` run",
        )
    meta = read_json(meta_path)
    if meta.get("format") != HEAD_FORMAT:
        raise ProbeError(
            f"{meta_path} is not a vitprobe head (format {meta.get('format')!r})",
            "pass a heads/<pool>.json written by `vitprobe probe`",
        )
    head = build_head(HeadSpec(**meta["spec"]), int(meta["dim"]), int(meta["num_classes"]))
    try:
        head.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as exc:
        raise ProbeError(
            f"weights in {path} do not match the head its JSON describes: {exc}",
            "re-run `vitprobe probe`; the files were mixed up or edited",
        ) from exc
    return head.eval(), meta


def check_head_matches_cache(meta: dict[str, Any], cache: TokenCache) -> None:
    """Refuse a cache from another backbone, weights, layer, dim or class set than the head's."""
    where = f"head ({meta['pool']}, {meta['backbone']['timm_name']}) on cache {cache.path}"
    head = {**meta["backbone"], "dim": meta["dim"], "class_names": meta["class_names"]}
    problem = identity_mismatch(head, token_identity(cache.manifest))
    if problem is not None:
        raise ProbeError(f"{where}: {problem[0]}", problem[1])
    if meta["layer"] not in cache.layers:
        raise ProbeError(
            f"{where}: the head was trained on block {meta['layer']}, the cache holds {list(cache.layers)}",
            "extract that block with --layers",
        )


@dataclass(frozen=True)
class PredictConfig:
    """How a saved head is evaluated on a cache."""

    batch_size: int = 1024  # rows per forward pass
    device: str = "auto"  # auto = CUDA when available
    shuffle_shards: int = 4  # unused order-wise (no shuffle); bounds how many shards are read at once


@torch.no_grad()
def predict(
    head_path: str | Path,
    cache_path: str | Path,
    *,
    cfg: PredictConfig = PredictConfig(),
    out_dir: str | Path | None = None,
    export_maps: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a saved head on a cache: metrics, per-row predictions, and for attention read-outs the maps.

    Args:
        head_path: heads/<pool>.safetensors (its JSON beside it).
        cache_path: a token cache from the same backbone, checkpoint, layer and class set.
        cfg: batch size and device.
        out_dir: where predictions.json goes (metrics + per-row index, label, prediction); None = not written.
        export_maps: a .safetensors file for per-patch attention maps "maps" (n, h, w) float32 and "indices"
            (n,) int64 (abmilp: the softmax scores over patches; attentive: their mean over queries).

    Returns:
        The predictions dict (also written when out_dir is given).
    """
    from vitprobe.cache import open_cache
    from vitprobe.devices import resolve_device
    from vitprobe.files import atomic_path, write_json

    head, meta = load_head(head_path)
    cache = open_cache(cache_path)
    check_head_matches_cache(meta, cache)
    spec = HeadSpec(**meta["spec"])
    if export_maps is not None and spec.pool not in ("abmilp", "attentive"):
        raise ProbeError(
            f"--export-maps needs an attention read-out, and this head is {spec.pool!r}",
            "pass a heads/abmilp.safetensors or heads/attentive.safetensors",
        )
    available = frozenset(cache_token_keys(cache))
    resolve_specs(
        replace(
            ProbeConfig(),
            pools=(spec.pool,),
            final_norm=bool(meta["final_norm"]),
            abmilp_content=spec.abmilp_content,
        ),
        available,
        explicit=True,
        where=f"cache {cache.path} (--tokens {cache.tokens})",
        fix="evaluate the head on a cache extracted with --tokens all",
    )
    keys = needed_keys([spec], available, bool(meta["final_norm"]))
    device = resolve_device(cfg.device)
    head = head.to(device)
    norm = final_norm_state(cache, device) if meta["final_norm"] else None
    source = CacheSource(cache, int(meta["layer"]))
    split = Split("cache", source, torch.arange(source.num_rows))
    positions = split.epoch_rows(None)
    num_classes = int(meta["num_classes"])
    preds, labels_all, maps = [], [], []
    for batch in iter_batches(split, keys, cfg.batch_size, shuffle_shards=cfg.shuffle_shards):
        tokens = to_tokens(batch, device, norm)
        logits, scores = head.forward_with_scores(tokens)
        preds.append(logits.topk(min(5, num_classes), dim=1).indices.cpu())  # (B, k)
        labels_all.append(batch["labels"].long())
        if export_maps is not None:
            scores = scores.mean(dim=1) if scores.ndim == 3 else scores  # (B, Q, N) -> (B, N)
            maps.append(scores.float().cpu().reshape(len(scores), *source.grid))  # (B, h, w)
    top = torch.cat(preds)  # (n, k)
    labels = torch.cat(labels_all)
    indices = source.indices[positions]
    hit1 = top[:, 0] == labels
    counts = torch.bincount(labels, minlength=num_classes).float()
    per_class = torch.bincount(labels[hit1], minlength=num_classes).float() / counts.clamp(min=1)
    result = {
        "format": "vitprobe-predictions",
        "version": FORMAT_VERSION,
        "head": str(head_path),
        "cache": str(cache.path),
        "pool": spec.pool,
        "layer": meta["layer"],
        "num_samples": len(labels),
        "top1": float(hit1.float().mean()),
        "top5": float((top == labels[:, None]).any(dim=1).float().mean()),
        "per_class": {
            name: (float(acc) if counts[c] > 0 else None)
            for c, (name, acc) in enumerate(zip(meta["class_names"], per_class.tolist(), strict=True))
        },
        "predictions": [
            {"index": int(i), "label": int(y), "pred": int(p[0]), "top5": p.tolist()}
            for i, y, p in zip(indices, labels, top, strict=True)
        ],
    }
    if export_maps is not None:
        from safetensors.torch import save_file

        tensors = {"maps": torch.cat(maps).contiguous(), "indices": indices.contiguous()}
        with atomic_path(export_maps) as tmp:
            save_file(
                tensors, str(tmp), metadata={"pool": spec.pool, "grid": f"{source.grid[0]}x{source.grid[1]}"}
            )
        result["maps"] = str(export_maps)
    if out_dir is not None:
        write_json(Path(out_dir) / "predictions.json", result)
    return result
