"""Analysis passes: the shared machinery (subset, loader, forward pass, provenance) of `vitprobe analyze`.

Each analysis (`attention`, `frequency`) hooks a backbone, streams a deterministic subset of a dataset
through it once, accumulates sums (never per-image tensors) and writes one results JSON plus figures.
Nothing here imports torch at module import, so `vitprobe.analysis.plots` stays usable without torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitprobe.errors import VitprobeError
from vitprobe.files import read_json
from vitprobe.progress import progress_bar

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

    from vitprobe.models import Backbone

SCHEMA_VERSION = 1  # bump when a key of attention.json / frequency.json changes meaning


def select_indices(total: int, limit: int | None) -> list[int]:
    """Evenly spaced, deterministic image indices: all of them when `limit` is None, 0 or >= `total`.

    Evenly spaced rather than the first `limit`: class-sorted datasets (ImageFolder, CUB) would otherwise
    contribute only their first few classes.
    """
    if total <= 0:
        raise VitprobeError("the dataset split has no images", "check --data and --split")
    if not limit or limit >= total:
        return list(range(total))
    return sorted({round(i * (total - 1) / max(limit - 1, 1)) for i in range(limit)})


def open_subset(
    spec: str, split: str, backbone: Backbone, limit: int | None
) -> tuple[Dataset, dict[str, Any]]:
    """Open `spec`/`split` with the backbone's eval transform and keep `limit` evenly spaced images.

    Returns:
        The subset (a torch Dataset of (image, label, index)) and the data provenance for the results JSON.
    """
    from torch.utils.data import Subset

    from vitprobe.data import open_dataset

    dataset = open_dataset(spec, split, transform=backbone.transform())
    indices = select_indices(len(dataset), limit)
    info = {
        "spec": spec,
        "split": split,
        "fingerprint": _attr_or_call(dataset, "fingerprint"),
        "size": len(dataset),
        "n_images": len(indices),
        "selection": "all" if len(indices) == len(dataset) else f"{len(indices)} evenly spaced indices",
    }
    return Subset(dataset, indices), info


def _attr_or_call(obj: Any, name: str) -> Any:
    value = getattr(obj, name, None)
    return value() if callable(value) else value


def make_loader(dataset: Dataset, *, batch_size: int, num_workers: int, device: torch.device) -> Any:
    """A sequential (deterministic order) DataLoader over the subset."""
    from torch.utils.data import DataLoader

    from vitprobe.devices import loader_workers

    if batch_size < 1:
        raise VitprobeError(f"--batch-size must be at least 1, got {batch_size}", "use e.g. --batch-size 32")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=loader_workers(num_workers),
        pin_memory=device.type == "cuda",
        drop_last=False,
    )


def forward_pass(
    backbone: Backbone,
    loader: Any,
    device: torch.device,
    *,
    on_images: Callable[[torch.Tensor], None] | None = None,
    description: str = "analysing",
) -> int:
    """Run every batch of `loader` through the backbone (fp32, no grad); the caller's hooks do the work.

    Args:
        backbone: the model, already on `device`.
        loader: yields (images (B, 3, H, W), labels, indices).
        device: where the batches go.
        on_images: called with each batch of (transformed) images before the forward, e.g. to keep thumbnails.
        description: progress-bar label.

    Returns:
        The number of images seen.
    """
    import torch

    seen = 0
    with progress_bar(len(loader.dataset), description) as advance, torch.inference_mode():
        for batch in loader:
            images = batch[0].to(device, dtype=torch.float32, non_blocking=True)  # (B, 3, H, W)
            if on_images is not None:
                on_images(images)
            backbone.model.forward_features(images)
            seen += images.shape[0]
            advance(images.shape[0])
    return seen


@dataclass
class AnalysisPass:
    """Everything one analysis pass needs, set up the same way for every analysis."""

    compared: list[dict[str, Any]]  # earlier results given with --compare
    device: torch.device
    backbone: Backbone  # on `device`, eval mode
    loader: Any  # sequential DataLoader over the evenly spaced subset
    data_info: dict[str, Any]  # the data provenance for the results JSON


def open_pass(config: Any, filename: str, backbone: Backbone | None = None) -> AnalysisPass:
    """Read `--compare` results (before the long pass, so a bad path fails fast), seed, load the backbone and
    open the subset of `config.data` / `config.split` with its eval transform.

    Args:
        config: an `AttentionConfig` or `FrequencyConfig` (model, checkpoint, random_init, data, split, limit,
            batch_size, num_workers, device, compare, seed).
        filename: the result file `--compare` directories hold (`attention.json`, `frequency.json`).
        backbone: an already loaded backbone (a study's shared load, the Python API's own model) instead of
            loading `config.model`; the config must describe it.
    """
    import torch

    from vitprobe.devices import resolve_device
    from vitprobe.models import load_backbone

    compared = read_results(config.compare, filename)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    if backbone is None:
        backbone = load_backbone(
            config.model, checkpoint=config.checkpoint, random_init=config.random_init, device=str(device)
        )
    backbone.model.to(device).eval()
    subset, data_info = open_subset(config.data, config.split, backbone, config.limit)
    loader = make_loader(subset, batch_size=config.batch_size, num_workers=config.num_workers, device=device)
    return AnalysisPass(compared, device, backbone, loader, data_info)


def result_header(kind: str, run: AnalysisPass, config: Any, *, dtype: str) -> dict[str, Any]:
    """The provenance keys every analysis result starts with (docs/analyses.md, "JSON schema")."""
    from vitprobe.provenance import checkpoint_of, provenance, versions

    report = run.backbone.report
    return {
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
        "label": f"{report.model} (random weights)" if report.random_init else report.model,
        "model": report.to_dict(),
        "random_init": report.random_init,
        "backbone": backbone_info(run.backbone),
        "data": run.data_info,
        "config": asdict(config),
        "device": str(run.device),
        "dtype": dtype,
        "versions": versions(),
        "provenance": provenance(device=run.device, checkpoint=checkpoint_of(report), dataset=run.data_info),
    }


def backbone_info(backbone: Backbone) -> dict[str, Any]:
    """Token layout and size of the backbone, as recorded in results."""
    model = backbone.model
    return {
        "class": type(model).__name__,
        "depth": backbone.depth,
        "dim": backbone.dim,
        "num_heads": int(model.blocks[0].attn.num_heads),
        "patch_size": backbone.patch_size,
        "grid": list(backbone.grid),
        "img_size": list(backbone.data_config()["input_size"][1:]),
        "has_cls": backbone.has_cls,
        "num_prefix_tokens": backbone.num_prefix_tokens,
        "num_reg_tokens": backbone.num_reg_tokens,
    }


def read_results(paths: Sequence[str | Path], filename: str) -> list[dict[str, Any]]:
    """Read earlier results for `--compare`: each path is a run directory holding `filename`, or the file.

    Raises:
        VitprobeError: a path without the file, or a file of another kind or schema.
    """
    kind = Path(filename).stem
    out = []
    for path in map(Path, paths):
        file = path / filename if path.is_dir() else path
        if not file.is_file():
            raise VitprobeError(
                f"--compare {path}: no {filename} there",
                f"point --compare at the --out directory of an earlier `vitprobe analyze {kind}` run",
            )
        result = read_json(file)
        if result.get("kind") != kind or result.get("schema_version") != SCHEMA_VERSION:
            raise VitprobeError(
                f"--compare {file}: not a {kind} result of schema {SCHEMA_VERSION} "
                f"(kind={result.get('kind')!r}, schema={result.get('schema_version')!r})",
                f"re-run `vitprobe analyze {kind}` for that model with this vitprobe version",
            )
        out.append(result)
    return out
