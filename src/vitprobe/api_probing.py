"""The public Python API, probing: `vp.fit_probes` (read-outs with a named protocol) and `vp.knn_accuracy`
(DINO's weighted k-NN), on token caches or on tokens kept in memory."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitprobe.api import Tokens, _path
from vitprobe.errors import ProbeError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vitprobe.probe.protocols import ProbeConfig
    from vitprobe.results import KnnResults, ProbeResults, Readout
    from vitprobe.sources import TokenSource


# ------------------------------------------------------------------------------------------------ probing


@dataclass
class ProbeRun:
    """What `vp.fit_probes` trained: each read-out's typed result (top-1, lr, epoch, health) and its head."""

    readouts: dict[str, Readout]  # vitprobe.results.Readout: top1, top5, blr, lr, epoch, verdict, health...
    heads: dict[str, nn.Module]  # the reported heads, CPU, eval mode: head(Tokens) -> logits
    config: ProbeConfig
    results: ProbeResults | None = None  # the whole results.json (probing from caches)
    out: Path | None = None  # where results.json and heads/ went (caches with `out`)

    @property
    def top1(self) -> dict[str, float]:
        """Test top-1 (a fraction) per read-out. Check `flagged` before quoting one."""
        return {name: r.top1 for name, r in self.readouts.items()}

    @property
    def flagged(self) -> dict[str, list[str]]:
        """Read-outs with a probe-health warning: name -> the warnings with their fixes."""
        return {
            n: [f"{c.message} — fix: {c.fix}" for c in r.warnings]
            for n, r in self.readouts.items()
            if r.flagged
        }


def fit_probes(
    train: Tokens,
    test: Tokens,
    *,
    protocol: str = "auto",
    pools: Sequence[str] | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    **overrides: Any,
) -> ProbeRun:
    """Train read-outs (cls, mean, abmilp, ...) with a named protocol and select and test them, as
    `vitprobe probe` does, on caches or in-memory tokens.

    Args:
        train, test: token caches (paths or TokenCache) or in-memory tokens from `vp.extract_tokens`.
        protocol: auto, mae, ep or logreg (vitprobe.choices.PROTOCOL).
        pools: the read-outs (default: the protocol's: cls, mean, abmilp).
        out: for caches, RUN_DIR for results.json and heads/ (None: a temporary folder, results returned).
        overwrite: replace an earlier probe run in `out`.
        **overrides: ProbeConfig fields on top of the protocol (epochs, min_steps, lr_grid, batch_size,
            device, seed, ...).
    """
    from vitprobe.probe import ProbeConfig
    from vitprobe.sources import MemorySource

    cfg = ProbeConfig.from_protocol(protocol, pools=tuple(pools) if pools else None, **overrides)
    if isinstance(train, MemorySource) or isinstance(test, MemorySource):
        return _probe_memory(train, test, cfg, explicit=pools is not None)
    return _probe_caches(train, test, cfg, out, overwrite=overwrite, explicit=pools is not None)


def _probe_caches(
    train: Tokens, test: Tokens, cfg: ProbeConfig, out: str | Path | None, *, overwrite: bool, explicit: bool
) -> ProbeRun:
    from vitprobe import results as R
    from vitprobe.probe import load_head, run_probe

    with tempfile.TemporaryDirectory(prefix="vitprobe-probe-") as tmp:
        run_dir = Path(out) if out is not None else Path(tmp)
        written = run_probe(
            _path(train), _path(test), cfg, run_dir, explicit_pools=explicit, overwrite=overwrite
        )
        results = R.ProbeResults.from_dict(written)
        heads = {name: load_head(run_dir / r.head)[0] for name, r in results.readouts.items()}
    return ProbeRun(dict(results.readouts), heads, cfg, results, None if out is None else Path(out))


def _probe_memory(train: TokenSource, test: TokenSource, cfg: ProbeConfig, *, explicit: bool) -> ProbeRun:
    from vitprobe import results as R
    from vitprobe.devices import resolve_device
    from vitprobe.probe.runs import clean, needed_keys, readout_json, resolve_specs
    from vitprobe.probe.train import train_probes

    available = frozenset(train.keys) & frozenset(test.keys)
    specs, _ = resolve_specs(
        cfg, available, explicit=explicit, where="the in-memory tokens", fix="extract with tokens='all'"
    )
    keys = needed_keys(specs, available, cfg.final_norm)
    outcome = train_probes(train, test, cfg, specs, keys=keys, device=resolve_device(cfg.device))
    readouts = {
        name: R.Readout.from_dict(clean(readout_json(r, train.class_names, Path("(in memory)"))), where=name)
        for name, r in outcome.readouts.items()
    }
    heads = {name: r.head for name, r in outcome.readouts.items()}
    return ProbeRun(readouts, heads, cfg)


# ------------------------------------------------------------------------------------------------ k-NN


@dataclass
class KnnScores:
    """Weighted k-NN accuracy per k (fractions), the k that voted, and knn.json for caches."""

    top1: dict[int, float]
    top5: dict[int, float]
    k_used: dict[int, int]
    results: KnnResults | None = None
    warnings: list[str] = field(default_factory=list)


def knn_accuracy(
    train: Tokens,
    test: Tokens,
    *,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    pool: str = "cls",
    device: str = "auto",
    out: str | Path | None = None,
    overwrite: bool = False,
) -> KnnScores:
    """DINO's weighted k-NN (cosine similarity, exp(sim / T) votes) of test tokens against train tokens.

    Args:
        train, test: token caches (paths or TokenCache) or in-memory tokens from `vp.extract_tokens`.
        ks: neighbour counts (a k beyond the train rows is clipped, and `k_used` and `warnings` say so).
        temperature: T of the vote weights.
        pool: the feature per image: cls, or mean (of the patch tokens).
        device: where the similarities are computed.
        out: for caches, the folder knn.json goes to (None: not written).
        overwrite: replace an earlier knn.json in `out` (refused otherwise).
    """
    from vitprobe.knn import KnnConfig, clipped_k_warnings, knn_evaluate, run_knn
    from vitprobe.sources import MemorySource

    cfg = KnnConfig(ks=tuple(ks), temperature=temperature, pool=pool, device=device)
    if not (isinstance(train, MemorySource) or isinstance(test, MemorySource)):
        from vitprobe import results as R

        written = R.KnnResults.from_dict(run_knn(_path(train), _path(test), cfg, out, overwrite=overwrite))
        entries = {int(k): e for k, e in written.knn.items()}
        return KnnScores(
            {k: e.top1 for k, e in entries.items()},
            {k: e.top5 for k, e in entries.items()},
            {k: e.k_used for k, e in entries.items()},
            written,
            list(written.warnings),
        )
    from vitprobe.devices import resolve_device

    dev = resolve_device(device)
    x_train, y_train = _features(train, pool)
    x_test, y_test = _features(test, pool)
    metrics = knn_evaluate(
        x_train.to(dev),
        y_train,
        x_test.to(dev),
        y_test,
        num_classes=train.num_classes,
        ks=cfg.ks,
        temperature=temperature,
    )
    return KnnScores(
        {k: m["top1"] for k, m in metrics.items()},
        {k: m["top5"] for k, m in metrics.items()},
        {k: m["k_used"] for k, m in metrics.items()},
        None,
        clipped_k_warnings(cfg.ks, len(y_train)),
    )


def _features(source: TokenSource, pool: str) -> tuple[torch.Tensor, torch.Tensor]:
    t = source.tensors  # type: ignore[attr-defined]
    if pool == "cls":
        if "cls" not in t:
            raise ProbeError("the tokens have no [cls]", "use pool='mean'")
        return t["cls"].float(), t["labels"]
    feats = t["patches"].float().mean(dim=1) if "patches" in t else t["mean"].float()  # (n, P, D) -> (n, D)
    return feats, t["labels"]
