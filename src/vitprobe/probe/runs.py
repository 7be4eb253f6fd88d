"""Probe runs: `vitprobe probe` from two cache paths to RUN_DIR/results.json and RUN_DIR/heads/.

Opens and pairs the caches, resolves which read-outs they can feed, calls `train.train_probes`, writes one
saved head per read-out and results.json (strict JSON: no NaN), swapping them in only when complete.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitprobe.errors import ProbeError
from vitprobe.heads import HeadSpec
from vitprobe.probe import rundir
from vitprobe.probe.protocols import PROTOCOLS, ProbeConfig
from vitprobe.provenance import checkpoint_from_manifest, provenance, versions
from vitprobe.results import validate

if TYPE_CHECKING:
    from rich.console import Console

    from vitprobe.cache import TokenCache
    from vitprobe.probe.train import ReadoutResult

RESULTS_FORMAT = "vitprobe-probe-results"
FORMAT_VERSION = 2


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
                raise ProbeError(f"{why}, and {where} holds only {sorted(available)}", fix)
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


@dataclass(frozen=True)
class LayerPlan:
    """Which stored blocks a run reads and which read-out reads which.

    `blocks` are the blocks `--layer` names (one, or several for a per-layer sweep, where every
    single-block read-out is trained on each, named pool@block); `read` are the blocks the caches are
    read at, in order: `blocks`, plus every stored block when a multi-block read-out (cls-cat, fusion) is
    asked for.
    """

    blocks: list[int]
    read: list[int]

    @property
    def sweep(self) -> bool:
        return len(self.blocks) > 1

    def expand(self, specs: Sequence[HeadSpec]) -> list[HeadSpec]:
        """One spec per (single-block read-out, block) in a sweep; multi-block read-outs once."""
        if not self.sweep:
            return list(specs)
        singles = [replace(s, block=b) for s in specs if not s.multi_block for b in self.blocks]
        return singles + [s for s in specs if s.multi_block]

    def block(self, spec: HeadSpec) -> int | None:
        """The block a read-out reads (None for multi-block read-outs)."""
        if spec.multi_block:
            return None
        return spec.block if spec.block is not None else self.blocks[0]

    def position(self, spec: HeadSpec) -> int | None:
        """The read-out's position on the batch's block axis (None: the batch has one block, or it reads
        them all)."""
        block = self.block(spec)
        return None if len(self.read) == 1 or block is None else self.read.index(block)

    def summary(self, specs: Sequence[HeadSpec], readouts: dict[str, Any]) -> dict[str, Any]:
        """results.json `per_layer`: test top-1 of each single-block read-out by block, in block order."""
        out: dict[str, Any] = {}
        for spec in specs:
            if spec.block is None:
                continue
            entry = out.setdefault(spec.pool, {"layers": [], "top1": [], "top1_std": []})
            entry["layers"].append(spec.block)
            entry["top1"].append(readouts[spec.name].test.top1)
            entry["top1_std"].append(readouts[spec.name].top1_std)
        return out


def layer_plan(cache: TokenCache, cfg: ProbeConfig) -> LayerPlan:
    """The blocks `cfg.layer` names in `cache`, and those to read for `cfg.pools` (see `LayerPlan`)."""
    from vitprobe.pairing import resolve_layers

    blocks = resolve_layers(cache, cfg.layer)
    multi = [p for p in dict.fromkeys(cfg.pools) if cfg.head_spec(p).multi_block]
    stored = sorted(cache.layers)
    for pool in multi:
        need = cfg.n_last_blocks if pool.startswith("cls-cat") else 2
        if len(stored) < need:
            raise ProbeError(
                f"the {pool} read-out needs {need} or more stored blocks, and the cache {cache.path} holds "
                f"{stored}",
                "extract the cache with several --layers (e.g. --layers "
                + ",".join(str(-i) for i in range(need, 0, -1))
                + ")",
            )
    read = sorted(set(blocks) | set(stored)) if multi else blocks
    return LayerPlan(blocks=blocks, read=read)


def clean(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (results.json is strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


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
    from vitprobe.pairing import backbone_identity, check_pair, pair_warnings
    from vitprobe.probe.saved import save_head
    from vitprobe.probe.train import train_probes
    from vitprobe.sources import CacheSource, cache_token_keys
    from vitprobe.tokens import final_norm_state

    out_dir = Path(out_dir)
    repaired = rundir.recover(out_dir)  # a kill mid-swap: roll back to a consistent pair, drop debris
    if (out_dir / "results.json").exists() and not overwrite:
        raise ProbeError(
            f"{out_dir} already holds results.json of an earlier probe run",
            "pass --overwrite to replace it (and its heads/), or choose another --out",
        )
    train_cache = open_cache(train_path)
    test_cache = open_cache(test_path)
    probed = layer_plan(train_cache, cfg)
    for block in probed.read:
        check_pair(train_cache, test_cache, block)
    available = frozenset(cache_token_keys(train_cache)) & frozenset(cache_token_keys(test_cache))
    partial = [
        f"{name} cache {c.path} (--tokens {c.tokens})"
        for name, c in (("train", train_cache), ("test", test_cache))
        if c.tokens != "all"
    ]
    where = " and ".join(partial) or "the caches"
    specs, notes = resolve_specs(cfg, available, explicit=explicit_pools, where=where)
    specs = probed.expand(specs)
    keys = needed_keys(specs, available, cfg.final_norm)
    device = resolve_device(cfg.device)
    norm = final_norm_state(train_cache, device) if cfg.final_norm else None
    at = probed.read[0] if len(probed.read) == 1 else probed.read  # one block, or a block axis
    train_src, test_src = CacheSource(train_cache, at), CacheSource(test_cache, at)
    outcome = train_probes(
        train_src,
        test_src,
        cfg,
        specs,
        keys=keys,
        norm=norm,
        device=device,
        console=console,
        positions={s.name: probed.position(s) for s in specs},
        blocks=len(probed.read),
    )

    identity = backbone_identity(train_cache.manifest)
    warnings = pair_warnings(train_cache, test_cache) + outcome.selection.pop("warnings")
    if cfg.select_on == "test":
        warnings.append(
            "--select-on test: lr and epoch were picked on the test set; accuracies are optimistic"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=rundir.STAGING_PREFIX, dir=out_dir)
    )  # swapped in with results.json
    readouts = {}
    try:
        for spec in specs:
            r = outcome.readouts[spec.name]
            head_file = save_head(
                r.head,
                staging / f"{spec.name}.safetensors",
                spec=spec,
                cache=train_cache,
                layer=probed.block(spec),
                blocks=probed.read if spec.multi_block else None,
                final_norm=cfg.final_norm,
                blr=r.blr,
                lr=r.lr,
                epoch=r.epoch,
                protocol=cfg.protocol,
                C=r.C,
            )
            readouts[spec.name] = {
                **readout_json(r, train_cache.class_names, Path("heads") / head_file.name),
                "layer": probed.block(spec),
                "blocks": probed.read if spec.multi_block else None,
            }
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    flagged = [name for name, r in outcome.readouts.items() if r.verdict != "ok"]
    results = {
        "format": RESULTS_FORMAT,
        "version": FORMAT_VERSION,
        "kind": "probe",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "random_init": identity["random_init"],
        "protocol": {
            "name": cfg.protocol,
            "overrides": list(cfg.overrides),
            "description": PROTOCOLS[cfg.protocol].description,
            "source": PROTOCOLS[cfg.protocol].source,
        },
        "health": {"ok": not flagged, "flagged": flagged},
        "warnings": warnings,
        "notes": notes + repaired,
        "layer": probed.blocks[0] if not probed.sweep else None,
        "layers": probed.blocks,
        "per_layer": probed.summary(specs, outcome.readouts) if probed.sweep else None,
        "final_norm": cfg.final_norm,
        "num_classes": train_cache.num_classes,
        "class_names": list(train_cache.class_names),
        "selection": outcome.selection,
        "schedule": outcome.schedule.to_dict() if outcome.schedule else None,
        "readouts": readouts,
        "config": cfg.to_dict(),
        "train_cache": {"path": str(train_cache.path), "provenance": train_cache.provenance()},
        "test_cache": {"path": str(test_cache.path), "provenance": test_cache.provenance()},
        "timing": outcome.timing,
        "provenance": provenance(device=device, checkpoint=checkpoint_from_manifest(train_cache.manifest),
                                 dataset=test_cache.manifest["dataset"]),  # fmt: skip
    }
    results = validate("probe", clean(results))
    rundir.commit(out_dir, staging, results)
    return results


def readout_json(r: ReadoutResult, class_names: Sequence[str], head_file: Path) -> dict[str, Any]:
    """One read-out's entry of results.json (docs/results-format.md)."""
    test = r.test
    return {
        "options": r.spec.options(),
        "blr": r.blr,
        "lr": r.lr,
        "weight_decay": r.weight_decay,
        "epoch": r.epoch,
        "C": r.C,
        "selection_top1": r.selection_top1,
        "top1": test.top1,
        "top5": test.top5,
        "test_loss": test.loss,
        "num_test_samples": test.num_samples,
        "per_class": {
            name: (None if math.isnan(acc) else acc)
            for name, acc in zip(class_names, test.per_class, strict=True)
        },
        "verdict": r.verdict,
        "health": [c.to_dict() for c in r.health],
        "movement": r.movement,
        "test_top1_before_refit": r.test_top1_before_refit,
        "baseline_top1": r.baseline_top1,
        "refit": r.refit,
        "head": str(head_file),
        "curves": r.curves,
        "sweep": r.sweep,
        "top1_std": r.top1_std,
        "seeds": r.seeds,
    }
