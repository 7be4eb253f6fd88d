"""The public Python API (`import vitprobe as vp`), backbones and tokens: load a model, extract its tokens.

Each function is the library call a CLI command makes, so the CLI and a script give the same numbers.
The main use beyond scripts: an SSL researcher's own pretraining loop calling `vp.knn_accuracy` /
`vp.fit_probes` (api_probing) on its own model object every N epochs, with tokens kept in memory (no
cache on disk); the analyses, the report and studies are in api_analyses. docs/api.md has runnable
examples; tests/test_api.py runs them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitprobe.errors import ModelError, ProbeError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch
    from torch import nn

    from vitprobe.cache import TokenCache
    from vitprobe.models import Backbone
    from vitprobe.sources import TokenSource

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
        The opened `TokenCache` (out given), or in-memory tokens (a `vitprobe.sources.MemorySource`).
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
    from vitprobe.rows import split_tokens
    from vitprobe.sources import MemorySource

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


def _path(tokens: Tokens) -> Path:
    """The folder of a token cache given as a path or a TokenCache."""
    return Path(getattr(tokens, "path", tokens))
