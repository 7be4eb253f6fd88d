"""The offline demo: the whole pipeline on generated needles with a tiny ViT, calling each library step once.

data (synthetic needles, CUB layout with boxes) → extract train/test token caches → probe cls / mean / AbMILP
→ k-NN → attention and frequency analyses → AbMILP maps → localisation (MaxBoxAccV2) → one HTML report.
Nothing is downloaded with the default tiny model (random weights, said on every page); `--model mae-b16`
with network access uses real pretrained weights instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = (
    "timm:test_vit"  # timm's registered tiny ViT: patch 16, dim 64, 6 blocks, 160 px, 0.3 M params
)
RANDOM_BANNER = "RANDOM WEIGHTS: this demo's backbone is untrained; its numbers only show the pipeline runs."


@dataclass(frozen=True)
class DemoConfig:
    """How `vitprobe demo` runs; written into the demo folder as demo.json."""

    out: str = "vitprobe-demo"  # folder for the data, caches, run results and report.html
    model: str = DEFAULT_MODEL  # a tiny timm ViT by default: runs offline in about two minutes on 2 CPU cores
    random_init: bool | None = None  # None: random for the default tiny model, pretrained for a preset
    n: int = 4000  # synthetic images, half train / half test (balanced over classes)
    classes: int = 4  # needle glyphs (classes)
    size: int = 160  # image side in pixels (test_vit's input size, so the crop keeps most of each image)
    epochs: int = 60  # probe epochs (the paper's 90 would take longer than the demo deserves)
    batch_size: int = 64  # probe and extraction batch size
    optimizer: str = "sgd"  # LARS (the paper's) barely moves a fresh head in a few hundred steps; SGD does
    lr_grid: tuple[float, ...] = (1.0, 10.0)  # base lrs trained side by side in the one pass
    ks: tuple[int, ...] = (10, 20)  # k-NN neighbours
    analysis_images: int = 64  # images for the attention and frequency analyses
    localization_images: int = 100  # test images scored by MaxBoxAccV2 (100 thresholds × all contours each)
    device: str = "auto"  # auto = CUDA when available
    seed: int = 0  # data, random weights and head init

    @property
    def weights_random(self) -> bool:
        """Whether the backbone is built with random weights."""
        return self.model == DEFAULT_MODEL if self.random_init is None else self.random_init


@dataclass
class DemoResult:
    """What the demo wrote and how long each step took."""

    out: Path
    report: Path
    run_dir: Path
    random_init: bool
    accuracies: dict[str, float]  # read-out → test top-1 (%)
    localization: dict[str, float]  # map → MaxBoxAccV2 (%)
    seconds: dict[str, float] = field(default_factory=dict)  # step → wall time


def run_demo(config: DemoConfig, *, say: Callable[[str], None] = print, console: Any = None) -> DemoResult:
    """Run every step of the pipeline on the synthetic needles and write `out/report.html`.

    Args:
        config: the demo settings.
        say: prints one progress line (the CLI passes a rich printer).
        console: a rich console for the steps' own progress bars (None: quiet).

    Raises:
        VitprobeError: from any step, e.g. `--model mae-b16` offline without cached weights.
    """
    from vitprobe.analysis.attention import AttentionConfig, run_attention
    from vitprobe.analysis.frequency import FrequencyConfig, run_frequency
    from vitprobe.analysis.localization import LocalizationConfig, run_localization
    from vitprobe.errors import CacheError
    from vitprobe.extract import ExtractConfig, extract
    from vitprobe.files import write_json
    from vitprobe.knn import KnnConfig, run_knn
    from vitprobe.probe import ProbeConfig, predict, run_probe
    from vitprobe.report import ReportConfig, write_report

    out = Path(config.out).expanduser()
    random_init = config.weights_random
    tag = " [RANDOM WEIGHTS]" if random_init else ""
    seconds: dict[str, float] = {}
    if random_init:
        say(f"⚠ {RANDOM_BANNER}")

    def step(name: str, message: str) -> Callable[[], None]:
        say(f"[{len(seconds) + 1}/9] {message}{tag}")
        start = time.perf_counter()
        return lambda: seconds.__setitem__(name, time.perf_counter() - start)

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "demo.json", {**asdict(config), "random_init_resolved": random_init})
    data_dir = out / "data"
    done = step("data", f"synthetic needles: {config.n} images, {config.classes} classes → {data_dir}")
    _check_or_make_data(data_dir, config)
    done()
    data = f"cub:{data_dir}"
    caches = {split: out / "caches" / split for split in ("train", "test")}
    run_dir = out / "run"
    done = step("extract", f"extract [cls] + patch tokens of {config.model} → {out / 'caches'}")
    for split, path in caches.items():
        try:
            extract(
                ExtractConfig(
                    model=config.model,
                    data=data,
                    split=split,
                    out=path,
                    random_init=random_init,
                    batch_size=config.batch_size,
                    workers=0,
                    device=config.device,
                    seed=config.seed,
                ),
                console=console,
            )
        except CacheError as exc:
            if exc.hint and "--overwrite" in exc.hint:  # the demo has no --overwrite: say what works here
                raise CacheError(
                    f"{exc.message} (an earlier demo in {out} used other settings)",
                    f"pass a new --out, or delete {out} and run the demo again",
                ) from exc
            raise
    done()
    done = step("probe", f"probe cls / mean / abmilp × lr {list(config.lr_grid)} in one pass → {run_dir}")
    probe_cfg = ProbeConfig.from_protocol(
        "auto",
        pools=("cls", "mean", "abmilp"),
        epochs=config.epochs,
        min_steps=0,
        batch_size=config.batch_size,
        optimizer=config.optimizer,
        lr_grid=config.lr_grid,
        warmup_epochs=float(min(2, config.epochs)),
        seed=config.seed,
        device=config.device,
    )
    results = run_probe(caches["train"], caches["test"], probe_cfg, run_dir, overwrite=True, console=console)
    done()
    done = step("knn", f"weighted k-NN on [cls], k = {list(config.ks)}")
    run_knn(caches["train"], caches["test"], KnnConfig(ks=config.ks, device=config.device), run_dir)
    done()
    common = {
        "model": config.model,
        "data": data,
        "split": "test",
        "out": str(run_dir),
        "random_init": random_init,
        "limit": config.analysis_images,
        "batch_size": 32,
        "num_workers": 0,
        "device": config.device,
        "seed": config.seed,
        "overwrite": True,  # a rerun of the demo replaces its own earlier results, as its probe step does
    }
    done = step("attention", f"attention statistics per block over {config.analysis_images} test images")
    run_attention(AttentionConfig(**common))
    done()
    done = step("frequency", "Fourier analysis of the token maps per layer")
    run_frequency(FrequencyConfig(**common))
    done()
    maps_file = run_dir / "abmilp_maps.safetensors"
    done = step("maps", f"AbMILP per-patch scores on the test cache → {maps_file.name}")
    predict(run_dir / "heads" / "abmilp.safetensors", caches["test"], export_maps=maps_file)
    done()
    done = step(
        "localization",
        f"MaxBoxAccV2 of [cls] attention and AbMILP maps on {config.localization_images} test images",
    )
    loc = run_localization(
        LocalizationConfig(
            data=data,
            split="test",
            out=str(run_dir),
            model=config.model,
            random_init=random_init,
            abmilp_maps=str(maps_file),
            cache=str(caches["test"]),
            num_workers=0,
            device=config.device,
            limit=config.localization_images,
            n_figures=4,
            seed=config.seed,
            overwrite=True,
        )
    )
    done()
    report_path = out / "report.html"
    title = "vitprobe demo" + (" — RANDOM WEIGHTS" if random_init else "")
    done = step("report", f"HTML report → {report_path}")
    write_report(ReportConfig(runs=(str(run_dir),), out=str(report_path), title=title))
    done()
    accuracies = {name: 100.0 * float(r["top1"]) for name, r in results["readouts"].items()}
    localization = {name: float(m["max_box_acc_v2"]) for name, m in loc.result["maps"].items()}
    if random_init:
        say(f"⚠ {RANDOM_BANNER}")
    return DemoResult(out, report_path, run_dir, random_init, accuracies, localization, seconds)


def _check_or_make_data(data_dir: Path, config: DemoConfig) -> None:
    """Generate the needles into `data_dir`, or reuse those an earlier demo made there with the same settings.

    Raises:
        VitprobeError: `data_dir` holds needles made with other settings (reusing them would report results of
            a dataset other than the one asked for, and the caches of that dataset with it).
    """
    from vitprobe.errors import VitprobeError
    from vitprobe.files import read_json
    from vitprobe.synthetic import SyntheticConfig, make_synthetic

    wanted = asdict(SyntheticConfig(n=config.n, classes=config.classes, size=config.size, seed=config.seed))
    made_file = data_dir / "synthetic.json"
    if not made_file.is_file():
        make_synthetic(data_dir, **wanted)
        return
    made = read_json(made_file)
    differs = {k: (made.get(k), v) for k, v in wanted.items() if made.get(k) != v}
    if differs:
        was = ", ".join(f"{k}={old}" for k, (old, _) in differs.items())
        asked = ", ".join(f"{k}={new}" for k, (_, new) in differs.items())
        raise VitprobeError(
            f"{data_dir} holds the needles of an earlier demo ({was}), not the ones asked for ({asked})",
            f"use another --out, or delete {data_dir.parent} to rerun the demo there",
        )


__all__ = ["DEFAULT_MODEL", "DemoConfig", "DemoResult", "run_demo"]
