"""The public Python API (`import vitprobe as vp`): load, extract, probe, k-NN, analyse, report, run a study.

Each function is the library call a CLI command makes, so the CLI and a script give the same numbers.
The main use beyond scripts: an SSL researcher's own pretraining loop calling `vp.knn_accuracy` /
`vp.fit_probes` on its own model object every N epochs, with tokens kept in memory (no cache on disk).
docs/api.md has runnable examples; tests/test_api.py runs them.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitprobe.errors import ModelError, ProbeError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch
    from torch import nn

    from vitprobe.cache import TokenCache
    from vitprobe.models import Backbone
    from vitprobe.probe.protocols import ProbeConfig
    from vitprobe.report import ReportOutput
    from vitprobe.results import (
        AttentionResults,
        FrequencyResults,
        KnnResults,
        LocalizationResults,
        ProbeResults,
        Readout,
    )
    from vitprobe.study import StudyResult
    from vitprobe.tokens import TokenSource

Data = Any  # a dataset spec ("cub:/data/CUB_200_2011"), a torch Dataset, or a DataLoader of (images, labels)
Tokens = Any  # a token cache (path or TokenCache) or in-memory tokens (`vp.extract_tokens(..., out=None)`)


# ------------------------------------------------------------------------------------------------ backbones


def load(
    model: str | nn.Module | Backbone,
    *,
    checkpoint: str | None = None,
    random_init: bool = False,
    branch: str | None = None,
    device: str | None = None,
    name: str | None = None,
) -> Backbone:
    """A backbone to probe: a preset (`"mae-b16"`), `"timm:NAME"`, either with a `checkpoint` file, or a
    timm ViT module you already have (e.g. the model your training loop is updating).

    Args:
        model: preset name, `timm:NAME`, an `nn.Module` (a timm VisionTransformer/Beit, possibly wrapped in
            DistributedDataParallel or torch.compile), or a `Backbone` (returned as is).
        checkpoint: weights file, URL or `hf-hub:REPO` in an official layout or timm's (presets, timm).
        random_init: random weights instead (every output says so).
        branch: which network of a multi-network file (teacher/student, target_encoder/encoder).
        device: where the model goes ("auto" = CUDA when available); None keeps it where it is.
        name: how results and reports name a module (default: "module:<class>").

    Raises:
        ModelError: an unknown name, a file without an architecture, or a module vitprobe cannot probe.
    """
    from vitprobe.models import Backbone, LoadReport, load_backbone

    if isinstance(model, Backbone):
        return model
    if isinstance(model, str):
        if Path(model).is_file() or model.endswith((".pth", ".pt", ".safetensors", ".pth.tar")):
            raise ModelError(
                f"{model!r} is a weights file, which does not say its architecture",
                f'name the architecture and pass the file: vp.load("mae-b16", checkpoint="{model}") or '
                f'vp.load("timm:vit_base_patch16_224", checkpoint="{model}")',
            )
        return load_backbone(
            model, checkpoint=checkpoint, random_init=random_init, device=device, branch=branch
        )
    module = _unwrap(model)
    for attr in ("forward_intermediates", "patch_embed", "blocks", "embed_dim"):
        if not hasattr(module, attr):
            raise ModelError(
                f"{type(module).__name__} has no `{attr}`: vitprobe probes timm ViT-style modules "
                "(forward_intermediates, patch_embed, blocks, embed_dim)",
                "build your backbone with timm (timm.create_model) or pass a preset name",
            )
    if device is not None:
        from vitprobe.devices import resolve_device

        module.to(resolve_device(device))
    report = LoadReport(
        model=name or f"module:{type(module).__name__}",
        timm_name=str(getattr(module, "default_cfg", {}).get("architecture") or type(module).__name__),
        source="in-memory module",
        sha256=state_sha256(module),
        random_init=random_init,
        num_params=sum(p.numel() for p in module.parameters()),
        notes=["weights of a module given in memory; sha256 over its state dict"],
    )
    return Backbone(model=module, report=report)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel (`.module`), torch.compile (`._orig_mod`)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None or inner is model:
            return model
        model = inner


def state_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes, in name order): the identity of
    weights that live in memory, so caches of two epochs of one run are never taken for one another."""
    import torch

    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())  # the raw bytes, any dtype
    return h.hexdigest()


@contextmanager
def _evaluating(module: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then the mode the caller had (a training loop's model stays training)."""
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


# ------------------------------------------------------------------------------------------------ extraction


def extract_tokens(
    backbone: str | nn.Module | Backbone,
    data: Data,
    *,
    split: str | None = None,
    out: str | Path | None = None,
    layer: int = -1,
    tokens: str = "all",
    batch_size: int = 64,
    workers: int = 0,
    device: str = "auto",
    limit: int | None = None,
    store: str = "fp16",
    class_names: Sequence[str] | None = None,
) -> TokenCache | TokenSource:
    """Run a backbone over images: into a token cache on disk (`out`), or into memory (`out=None`).

    Args:
        backbone: what `load` accepts.
        data: a dataset spec with `split` (both forms), or (in memory only) a torch Dataset / DataLoader
            yielding (images, labels, ...) already transformed for the model.
        split: the split of a dataset spec.
        out: the cache directory (resumed when interrupted; `vitprobe extract` writes the same); None: keep
            the tokens in memory and return them.
        layer: the block whose output is kept (negative counts from the end).
        tokens: all ([cls] + registers + patches), cls, or pooled ([cls] + patch mean).
        batch_size, workers, device: of the forward passes.
        limit: only this many images (in memory: the first ones; caches: as `extract --limit`).
        store: dtype of a cache's tokens (fp16, bf16, fp32); in memory tokens are float32.
        class_names: names of the labels of a Dataset / DataLoader (default: its `classes`, else numbers).

    Returns:
        The opened `TokenCache` (out given), or in-memory tokens (a `vitprobe.tokens.MemorySource`).
    """
    bb = load(backbone)
    if out is not None:
        return _extract_cache(
            bb, data, split, Path(out), layer, tokens, batch_size, workers, device, limit, store
        )
    return _extract_memory(bb, data, split, layer, tokens, batch_size, workers, device, limit, class_names)


def _extract_cache(
    bb: Backbone,
    data: Data,
    split: str | None,
    out: Path,
    layer: int,
    tokens: str,
    batch_size: int,
    workers: int,
    device: str,
    limit: int | None,
    store: str,
) -> TokenCache:
    from vitprobe.cache import open_cache
    from vitprobe.extract import ExtractConfig
    from vitprobe.extract import extract as run_extract

    if not isinstance(data, str) or split is None:
        raise ProbeError(
            "a token cache on disk is made from a dataset spec and a split",
            'e.g. vp.extract_tokens(backbone, "cub:/data/CUB_200_2011", split="train", out="caches/train"); '
            "for a Dataset or DataLoader of your own, leave out `out` (tokens in memory)",
        )
    config = ExtractConfig(
        model=bb.report.model,
        data=data,
        split=split,
        out=out,
        random_init=bb.report.random_init,
        layers=(layer,),
        batch_size=batch_size,
        workers=workers,
        device=device,
        store=store,
        tokens=tokens,
        limit=limit,
    )
    with _evaluating(bb.model):
        run_extract(config, backbone=bb)
    return open_cache(out)


def _extract_memory(
    bb: Backbone,
    data: Data,
    split: str | None,
    layer: int,
    tokens: str,
    batch_size: int,
    workers: int,
    device: str,
    limit: int | None,
    class_names: Sequence[str] | None,
) -> TokenSource:
    import torch

    from vitprobe.devices import resolve_device
    from vitprobe.extract import split_tokens
    from vitprobe.tokens import MemorySource

    dev = resolve_device(device)
    loader, names = _loader(bb, data, split, batch_size, workers, limit, dev)
    names = list(class_names) if class_names is not None else names
    parts: dict[str, list[torch.Tensor]] = {}
    labels: list[torch.Tensor] = []
    seen = 0
    bb.model.to(dev)
    with _evaluating(bb.model), torch.inference_mode():
        for batch in loader:
            images, y = batch[0], batch[1]
            if limit is not None:
                images, y = images[: limit - seen], y[: limit - seen]
            if len(images) == 0:
                break
            outs = bb.intermediates(images.to(dev, dtype=torch.float32), [layer])
            split_parts = split_tokens(
                outs,
                num_prefix_tokens=bb.num_prefix_tokens,
                has_cls=bb.has_cls,
                tokens=tokens,
                dtype=torch.float32,
            )
            for key, value in split_parts.items():
                parts.setdefault(key, []).append(value.cpu())
            labels.append(torch.as_tensor(y).long().cpu())
            seen += len(images)
            if limit is not None and seen >= limit:
                break
    if not labels:
        raise ProbeError("no images came out of `data`", "check the dataset, split and limit")
    tensors = {k: torch.cat(v) for k, v in parts.items()}
    tensors["labels"] = torch.cat(labels)
    return MemorySource(tensors, class_names=names, grid=bb.grid)


def _loader(
    bb: Backbone, data: Data, split: str | None, batch_size: int, workers: int, limit: int | None, dev: Any
) -> tuple[Iterable[Any], list[str] | None]:
    """A DataLoader over `data` (spec, Dataset or DataLoader) and its class names."""
    from torch.utils.data import DataLoader, Dataset

    from vitprobe.devices import loader_workers

    if isinstance(data, DataLoader):
        return data, _classes(data.dataset)
    if isinstance(data, str):
        from vitprobe.data import open_dataset

        if split is None:
            raise ProbeError(f"vp.extract_tokens({data!r}) needs split=", 'e.g. split="train"')
        dataset: Dataset = open_dataset(data, split, transform=bb.transform())
    elif isinstance(data, Dataset):
        dataset = data
    else:
        raise ProbeError(
            f"cannot read images from a {type(data).__name__}",
            "pass a dataset spec, a Dataset or a DataLoader",
        )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=loader_workers(workers),
        pin_memory=getattr(dev, "type", "") == "cuda",
    )
    return loader, _classes(dataset)


def _classes(dataset: Any) -> list[str] | None:
    names = getattr(dataset, "class_names", None) or getattr(dataset, "classes", None)
    return [str(n) for n in names] if names else None


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
    from vitprobe.tokens import MemorySource

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


def _path(tokens: Tokens) -> Path:
    return Path(getattr(tokens, "path", tokens))


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
    from vitprobe.tokens import MemorySource

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


# ------------------------------------------------------------------------------------------------ analyses


def attention_stats(
    backbone: str | nn.Module | Backbone,
    data: str,
    *,
    split: str,
    out: str | Path | None = None,
    **options: Any,
) -> AttentionResults:
    """Attention statistics per block × head ([cls] self-share, entropies, distance): attention.json.

    `options`: AttentionConfig fields (limit, batch_size, num_workers, rollout, n_maps, device, seed)."""
    from vitprobe.analysis.attention import AttentionConfig, run_attention

    return _analysis(backbone, data, split, out, AttentionConfig, run_attention, options)  # type: ignore[return-value]


def frequency_stats(
    backbone: str | nn.Module | Backbone,
    data: str,
    *,
    split: str,
    out: str | Path | None = None,
    **options: Any,
) -> FrequencyResults:
    """Fourier analysis of the token maps per layer: frequency.json (FrequencyConfig fields as options)."""
    from vitprobe.analysis.frequency import FrequencyConfig, run_frequency

    return _analysis(backbone, data, split, out, FrequencyConfig, run_frequency, options)  # type: ignore[return-value]


def localize(
    backbone: str | nn.Module | Backbone | None,
    data: str | None = None,
    *,
    split: str | None = None,
    heads: Sequence[str | Path] = (),
    cache: str | Path | None = None,
    out: str | Path | None = None,
    **options: Any,
) -> LocalizationResults:
    """MaxBoxAccV2 of the backbone's last-block [cls] attention and/or saved heads' maps (`heads`, computed
    from the tokens of `cache`), against the dataset's boxes: localization.json.

    `options`: LocalizationConfig fields (limit, n_figures, quantize, cls_attention, overwrite, ...)."""
    from vitprobe import results as R
    from vitprobe.analysis.localization import LocalizationConfig, run_localization

    bb = load(backbone) if backbone is not None else None
    with _out_dir(out) as folder:
        cfg = LocalizationConfig(
            out=str(folder),
            model=bb.report.model if bb else None,
            data=data,
            split=split,
            cache=None if cache is None else str(cache),
            heads=tuple(str(h) for h in heads),
            random_init=bool(bb and bb.report.random_init),
            cls_attention=bb is not None,
            **options,
        )
        return R.LocalizationResults.from_dict(run_localization(cfg, backbone=bb).result)


def _analysis(
    backbone: Any, data: str, split: str, out: Any, cls: Any, run: Any, options: dict[str, Any]
) -> Any:
    from vitprobe import results as R

    bb = load(backbone)
    with _out_dir(out) as folder, _evaluating(bb.model):
        cfg = cls(
            model=bb.report.model,
            data=data,
            split=split,
            out=str(folder),
            random_init=bb.report.random_init,
            **{"num_workers": 0, **options},
        )
        return R.parse(run(cfg, backbone=bb).result)


@contextmanager
def _out_dir(out: str | Path | None) -> Iterator[Path]:
    if out is not None:
        yield Path(out)
        return
    with tempfile.TemporaryDirectory(prefix="vitprobe-analysis-") as tmp:
        yield Path(tmp)


# ------------------------------------------------------------------------------------------------ results


def write_report(
    runs: Sequence[str | Path],
    *,
    out: str | Path = "report.html",
    format: str = "html",
    labels: Sequence[str] = (),
    title: str = "vitprobe report",
) -> ReportOutput:
    """One report of run directories (html, md, json, github, csv, latex); `labels` name the runs."""
    from vitprobe.report import ReportConfig, write_report

    return write_report(
        ReportConfig(
            runs=tuple(map(str, runs)), out=str(out), format=format, labels=tuple(labels), title=title
        )
    )


def run_study(study: str | Path, *, out: str | Path | None = None, dry_run: bool = False) -> StudyResult:
    """`vitprobe run STUDY.toml`: every step not done yet, then the report."""
    from vitprobe.study import load_study
    from vitprobe.study import run_study as run

    return run(load_study(study, out=out), say=lambda _msg: None, dry_run=dry_run)


def load_results(path: str | Path) -> Any:
    """Any result file vitprobe writes, as its typed model (vitprobe.results), strictly parsed."""
    from vitprobe.results import load as load_file

    return load_file(path)
