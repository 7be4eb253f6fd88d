"""Analysis runs: what every `vitprobe analyze` run shares around its pass. Nothing here runs a model.

Its inputs (backbone, weights, dataset, split), given as flags or read from a token cache's manifest and
checked against it; its output directory, where an earlier result is kept unless `overwrite`; the provenance
header every results JSON starts with; and the earlier results `--compare` overlays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitprobe.errors import CacheError, VitprobeError
from vitprobe.files import read_json
from vitprobe.results import header, parse

if TYPE_CHECKING:
    import torch

    from vitprobe.cache import TokenCache
    from vitprobe.models import Backbone



@dataclass(frozen=True)
class PassConfig:
    """The options every analysis shares; each analysis's config extends it and is written into its JSON."""

    out: str  # output directory for the results JSON and figures
    model: str | None = None  # preset name or timm:NAME; None: the model of --cache
    data: str | None = None  # dataset spec, opened with the model's eval transform; None: the data of --cache
    split: str | None = None  # split to analyse; None: the split of --cache
    cache: str | None = None  # token cache naming model, weights, data and split; its images are analysed
    checkpoint: str | None = None  # weights file for the preset; None = the preset's (or the cache's) weights
    random_init: bool = False  # random weights: the baseline that shows what training changed
    limit: int | None = 1000  # images (evenly spaced); 1000 gives stable means, None = all
    batch_size: int = 32  # images per forward; attention is (B, H, T, T) fp32 per block
    num_workers: int = 4  # DataLoader workers decoding images
    device: str = "auto"  # CUDA when available
    seed: int = 0  # seeds torch before building the model; with --cache, random weights use the cache's seed
    overwrite: bool = False  # replace an earlier result of the same analysis in `out`


@dataclass(frozen=True)
class PassInputs:
    """The backbone and images a run analyses, from its flags and (when given) its token cache."""

    model: str
    checkpoint: str | None
    random_init: bool
    seed: int
    data: str
    split: str
    cache: TokenCache | None = None

    def cache_images(self) -> list[int] | None:
        """Dataset indices of the cache's images (view 0 rows, in cache order); None without a cache."""
        if self.cache is None:
            return None
        indices, views = self.cache.indices(), self.cache.view_ids()  # (N,) each
        return indices[views == 0].tolist()

    def record(self) -> dict[str, Any]:
        """The resolved inputs, for the results JSON."""
        return {
            "model": self.model,
            "checkpoint": self.checkpoint,
            "random_init": self.random_init,
            "seed": self.seed,
            "data": self.data,
            "split": self.split,
            "cache": None if self.cache is None else str(self.cache.path),
        }


def resolve_inputs(config: PassConfig, *, need_model: bool = True) -> PassInputs:
    """Model, weights, dataset and split from the flags, filled in from `config.cache`'s manifest.

    A flag given beside `--cache` must agree with the cache; `check_backbone` and `check_images` compare what
    was loaded. Random weights with `--cache` are drawn with the cache's seed, so they are the cache's.

    Raises:
        VitprobeError: neither the flags nor a cache say what to analyse.
        CacheError: the cache cannot be opened, or a flag contradicts it.
    """
    if config.cache is None:
        required = (("--model", config.model),) if need_model else ()
        given = (*required, ("--data", config.data), ("--split", config.split))
        missing = [flag for flag, value in given if not value]
        if missing:
            raise VitprobeError(
                f"{', '.join(missing)} not given",
                "pass --model, --data and --split, or --cache DIR (a token cache names all three)",
            )
        assert config.data is not None and config.split is not None
        return PassInputs(
            config.model or "", config.checkpoint, config.random_init, config.seed, config.data, config.split
        )
    from vitprobe.cache import open_cache

    cache = open_cache(config.cache)
    made, dataset = cache.manifest["model"], cache.manifest["dataset"]
    random_init = bool(made.get("random_init"))
    where = f"the cache {cache.path} holds tokens of {made['spec']}"
    if config.random_init and not random_init:
        raise CacheError(
            f"--random-init, but {where} with trained weights (checkpoint {made.get('checkpoint')})",
            "leave out --random-init (the cache names the weights), or pass a cache extracted with it",
        )
    if config.model and _timm_name(config.model) != made.get("timm_name"):
        raise CacheError(
            f"--model {config.model} is {_timm_name(config.model)}, but {where} ({made.get('timm_name')})",
            "leave out --model (the cache names it), or pass the cache of that model",
        )
    if config.checkpoint and random_init:
        raise CacheError(
            f"--checkpoint {config.checkpoint}, but {where} with random weights",
            "leave out --checkpoint, or pass the cache extracted from that file",
        )
    checkpoint = config.checkpoint
    if checkpoint is None and not random_init:
        checkpoint = (cache.manifest.get("config") or {}).get("checkpoint")
        if checkpoint is not None and _local_path(checkpoint) and not Path(checkpoint).exists():
            raise CacheError(
                f"{where} extracted from --checkpoint {checkpoint}, which is not there now",
                f"pass --checkpoint with that file (sha256 {str(made.get('checkpoint'))[:16]}...)",
            )
    return PassInputs(
        model=config.model or made["spec"],
        checkpoint=checkpoint,
        random_init=random_init,
        seed=int(cache.manifest.get("seed") or 0) if random_init else config.seed,
        data=config.data or dataset["spec"],
        split=config.split or dataset["split"],
        cache=cache,
    )


def _timm_name(spec: str) -> str:
    """The timm architecture a model spec builds (a preset's, or the name after `timm:`)."""
    from vitprobe.models import TIMM_PREFIX, get_preset

    return spec.removeprefix(TIMM_PREFIX) if spec.startswith(TIMM_PREFIX) else get_preset(spec).timm


def _local_path(checkpoint: str) -> bool:
    return "://" not in checkpoint and not checkpoint.startswith("hf-hub:")


def load_pass_backbone(inputs: PassInputs, device: torch.device) -> Backbone:
    """The backbone `inputs` name, seeded, on `device`, in eval mode; checked against the cache when given."""
    import torch

    from vitprobe.models import load_backbone

    torch.manual_seed(inputs.seed)
    backbone = load_backbone(
        inputs.model, checkpoint=inputs.checkpoint, random_init=inputs.random_init, device=str(device)
    )
    backbone.model.eval()
    check_backbone(backbone, inputs)
    return backbone


def check_backbone(backbone: Backbone, inputs: PassInputs) -> None:
    """Refuse a backbone (architecture or weights) other than the one the cache's tokens came from.

    Raises:
        CacheError: another timm architecture, or other weights (sha256, random-init).
    """
    if inputs.cache is None:
        return
    made = inputs.cache.manifest["model"]
    report = backbone.report
    where = f"the cache {inputs.cache.path} holds tokens of {made['spec']}"
    if report.timm_name != made.get("timm_name"):
        raise CacheError(
            f"--model {inputs.model} is {report.timm_name}, but {where} ({made.get('timm_name')})",
            "leave out --model (the cache names it), or pass the cache of that model",
        )
    if report.checkpoint_id != made.get("checkpoint"):
        raise CacheError(
            f"the weights loaded ({report.source}, {report.checkpoint_id[:16]}) are not those of {where} "
            f"({str(made.get('checkpoint'))[:16]})",
            "pass the --checkpoint the cache was extracted from, or leave out --checkpoint",
        )


def check_images(data_info: dict[str, Any], inputs: PassInputs) -> None:
    """Refuse `--data/--split` naming another image list than the cache's (its indices would be wrong)."""
    if inputs.cache is None:
        return
    made = inputs.cache.manifest["dataset"]
    if made.get("fingerprint") and data_info.get("fingerprint") != made["fingerprint"]:
        raise CacheError(
            f"--data {inputs.data} --split {inputs.split} is another image list than the one the cache "
            f"{inputs.cache.path} holds ({made.get('spec')}, split {made.get('split')}; fingerprint "
            f"{str(data_info.get('fingerprint'))[:12]} vs {str(made['fingerprint'])[:12]})",
            f"leave out --data and --split (the cache's are --data {made.get('spec')} --split "
            f"{made.get('split')}), or pass where that dataset lies now",
        )


def check_out(out: str | Path, filename: str, *, overwrite: bool) -> Path:
    """The output directory, refusing one that holds `filename` of an earlier run unless `overwrite`.

    Called before any work, so a refused run costs nothing and the earlier result stays as it was.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VitprobeError(f"--out {out} is a file", "pass a directory (it is created when missing)")
    if (out / filename).exists() and not overwrite:
        raise VitprobeError(
            f"{out} already holds {filename} of an earlier `vitprobe analyze {Path(filename).stem}` run",
            "pass --overwrite to replace it, or choose another --out",
        )
    return out


@dataclass
class AnalysisPass:
    """Everything one image pass needs, set up the same way for every analysis."""

    inputs: PassInputs
    compared: list[dict[str, Any]]  # earlier results given with --compare
    device: torch.device
    backbone: Backbone  # on `device`, eval mode
    loader: Any  # sequential DataLoader over the evenly spaced subset
    data_info: dict[str, Any]  # the data provenance for the results JSON


def open_pass(
    config: PassConfig,
    filename: str,
    *,
    inputs: PassInputs | None = None,
    compared: list[dict[str, Any]] | None = None,
    backbone: Backbone | None = None,
) -> AnalysisPass:
    """Check `--out` and `--compare` (before the long pass, so a bad path fails fast), load the backbone, and
    open the subset of the dataset (the cache's images when a cache is given) with the eval transform.

    Args:
        config: an analysis config (a `PassConfig`, optionally with `compare`).
        filename: the result file this analysis writes and `--compare` directories hold.
        inputs: already resolved inputs; None resolves them from `config`.
        compared: already read `--compare` results; None reads them.
        backbone: an already loaded backbone the inputs name (a study's shared load, the Python API's own
            model); checked against the cache like a loaded one. None loads it.
    """
    from vitprobe.analysis.passes import make_loader, open_subset
    from vitprobe.devices import resolve_device

    check_out(config.out, filename, overwrite=config.overwrite)
    if compared is None:
        compared = read_results(getattr(config, "compare", ()), filename)
    inputs = inputs or resolve_inputs(config)
    device = resolve_device(config.device)
    if backbone is None:
        backbone = load_pass_backbone(inputs, device)
    else:
        backbone.model.to(device).eval()
        check_backbone(backbone, inputs)
    subset, data_info = open_subset(
        inputs.data, inputs.split, backbone, config.limit, among=inputs.cache_images()
    )
    check_images(data_info, inputs)
    loader = make_loader(subset, batch_size=config.batch_size, num_workers=config.num_workers, device=device)
    return AnalysisPass(inputs, compared, device, backbone, loader, data_info)


def result_header(
    kind: str,
    config: PassConfig,
    inputs: PassInputs,
    *,
    model: dict[str, Any],
    backbone: dict[str, Any],
    data: dict[str, Any],
    device: str,
    dtype: str,
) -> dict[str, Any]:
    """The provenance keys every analysis result starts with (docs/analyses.md, "JSON schema").

    Args:
        model: the backbone's load report (`LoadReport.to_dict()`, or `manifest_model` of the cache).
        backbone: `backbone_info` (or `cache_backbone_info`).
        data: the data provenance of the images analysed.
    """
    from vitprobe.provenance import checkpoint_info, provenance, versions

    random_init = bool(model.get("random_init"))
    sha = None if random_init else model.get("checkpoint_id")  # LoadReport and manifest_model both have it
    weights = checkpoint_info(source=model.get("source"), sha256=sha, random_init=random_init)
    return {
        **header(kind),
        "label": f"{model['model']} (random weights)" if random_init else model["model"],
        "model": model,
        "random_init": random_init,
        "backbone": backbone,
        "data": data,
        "inputs": inputs.record(),
        "cache": None if inputs.cache is None else inputs.cache.provenance(),
        "config": asdict(config),
        "device": device,
        "dtype": dtype,
        "versions": versions(),
        "provenance": provenance(device=device, checkpoint=weights, dataset=data),
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


def cache_backbone_info(cache: TokenCache) -> dict[str, Any]:
    """`backbone_info` as far as a cache's manifest knows it (class and heads: null, no model was built)."""
    m = cache.manifest
    return {
        "class": None,
        "depth": int(m["depth"]),
        "dim": int(m["dim"]),
        "num_heads": None,
        "patch_size": m.get("patch_size"),
        "grid": list(cache.grid),
        "img_size": list(m["transform"]["input_size"][1:]),
        "has_cls": cache.has_cls,
        "num_prefix_tokens": cache.num_prefix_tokens,
        "num_reg_tokens": cache.num_reg_tokens,
    }


def manifest_model(cache: TokenCache) -> dict[str, Any]:
    """The cache's backbone in the keys of a load report (`model`, `timm_name`, `checkpoint_id`, ...)."""
    made = cache.manifest["model"]
    return {
        "model": made["spec"],
        "timm_name": made.get("timm_name"),
        "source": made.get("source"),
        "checkpoint_id": made.get("checkpoint"),
        "random_init": bool(made.get("random_init")),
        "from_cache": str(cache.path),
    }


def read_results(paths: Sequence[str | Path], filename: str) -> list[dict[str, Any]]:
    """Read earlier results for `--compare`: each path is a run directory holding `filename`, or the file.

    Raises:
        VitprobeError: a path without the file; ResultsError: a file of another kind or an unknown version.
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
        try:
            result = read_json(file)
        except (OSError, ValueError) as exc:
            raise VitprobeError(
                f"--compare {file}: not readable JSON ({exc})", f"re-run `vitprobe analyze {kind}`"
            ) from exc
        parsed = parse(result, kind=kind, where=f"--compare {file}")  # refuses another kind or version
        out.append(replace(parsed, version=type(parsed).CURRENT).to_dict())  # older versions in today's form
    return out


__all__ = [
    "AnalysisPass",
    "PassConfig",
    "PassInputs",
    "backbone_info",
    "cache_backbone_info",
    "check_backbone",
    "check_images",
    "check_out",
    "load_pass_backbone",
    "manifest_model",
    "open_pass",
    "read_results",
    "resolve_inputs",
    "result_header",
]
