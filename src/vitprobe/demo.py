"""The offline demo: one study (vitprobe.study) on generated needles with a tiny ViT, ending in a report.

data (synthetic needles, CUB layout with boxes) → extract train/test caches → probe cls / mean / AbMILP →
k-NN → attention and frequency analyses → AbMILP maps → localisation (MaxBoxAccV2) → one HTML report,
each step a study step (docs/studies/demo.toml is the same study as a file). Nothing is downloaded with the
default tiny model (random weights, said on every page); `--model mae-b16` with network access uses real
pretrained weights instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = (
    "timm:test_vit"  # timm's registered tiny ViT: patch 16, dim 64, 6 blocks, 160 px, 0.3 M params
)
RANDOM_BANNER = "RANDOM WEIGHTS: this demo's backbone is untrained; its numbers only show the pipeline runs."
MODEL_NAME = "test-vit"  # the demo's run name (its folder under runs/ and its label in the report)
DATASET_NAME = "needles"


@dataclass(frozen=True)
class DemoConfig:
    """How `vitprobe demo` runs; written into the demo folder as demo.json."""

    out: str = "vitprobe-demo"  # folder for the data, caches, run results and report.html
    model: str = DEFAULT_MODEL  # a tiny timm ViT by default: ~30 s offline on 2 CPU cores
    random_init: bool | None = None  # None: random for the default tiny model, pretrained for a preset
    n: int = 4000  # synthetic images, half train / half test (balanced over classes)
    classes: int = 4  # needle glyphs (classes)
    size: int = 160  # image side in pixels (test_vit's input size, so the crop keeps most of each image)
    # The probe protocol is `auto` with explicit overrides that make it short (docs/demo.md says why):
    epochs: int = 60  # instead of auto's >= 25,000 steps (~20 min here): 60 epochs x 31 steps at batch 64
    batch_size: int = 64  # probe and extraction batch size
    optimizer: str = "sgd"  # LARS (the paper's) barely moves a fresh head in a few hundred steps; SGD does
    lr_grid: tuple[float, ...] = (1.0, 10.0)  # two base lrs instead of auto's 13, trained side by side
    weight_decay: tuple[float, ...] = (0.0,)  # one weight decay instead of auto's three
    warmup_epochs: float = 2.0  # a short linear warm-up before the cosine decay
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
    flagged: list[str] = field(default_factory=list)  # read-outs with a probe-health warning


def demo_study_table(config: DemoConfig) -> dict[str, Any]:
    """The demo as a study table (what `vitprobe run` reads from a TOML file)."""
    model: dict[str, Any] = {"name": MODEL_NAME, "model": config.model}
    if config.weights_random:
        model["random_init"] = True
    return {
        "title": "vitprobe demo",
        "device": config.device,
        "seed": config.seed,
        "models": [model],
        "datasets": [
            {
                "name": DATASET_NAME,
                "synthetic": {
                    "n": config.n,
                    "classes": config.classes,
                    "size": config.size,
                    "seed": config.seed,
                },
            }
        ],
        "extract": {"batch_size": config.batch_size, "workers": 0},
        "probe": {
            "protocol": "auto",
            "pools": ["cls", "mean", "abmilp"],
            "epochs": config.epochs,
            "min_steps": 0,
            "batch_size": config.batch_size,
            "optimizer": config.optimizer,
            "lr_grid": list(config.lr_grid),
            "weight_decay": list(config.weight_decay),
            "warmup_epochs": float(min(config.warmup_epochs, config.epochs)),
        },
        "knn": {"ks": list(config.ks)},
        "attention": {"limit": config.analysis_images, "batch_size": 32, "num_workers": 0},
        "frequency": {"limit": config.analysis_images, "batch_size": 32, "num_workers": 0},
        "localization": {"head": "abmilp", "limit": config.localization_images, "n_figures": 4},
    }


def run_demo(config: DemoConfig, *, say: Callable[[str], None] = print, console: Any = None) -> DemoResult:
    """Run the demo study on the synthetic needles and write `out/report.html`.

    Args:
        config: the demo settings.
        say: prints one progress line (the CLI passes a rich printer).
        console: a rich console for the steps' own progress bars (None: quiet).

    Raises:
        VitprobeError: from any step, e.g. `--model mae-b16` offline without cached weights.
    """
    from vitprobe import results as R
    from vitprobe.files import write_json
    from vitprobe.study import StudyError, parse_study, run_study

    out = Path(config.out).expanduser()
    study = parse_study(demo_study_table(config), base=out, out=out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "demo.json", {**asdict(config), "random_init_resolved": config.weights_random})
    try:
        done = run_study(study, say=say, console=console)
    except StudyError as exc:  # the demo's own wording: its one option for a fresh start is --out
        raise StudyError(
            exc.message.replace("the study's settings", "the demo's settings"),
            f"pass a new --out, or delete {out} and run the demo again",
        ) from exc
    run_dir = study.run_dir(study.models[0], study.datasets[0])
    results = R.load(run_dir / "results.json", kind="probe")
    loc = R.load(run_dir / "localization.json", kind="localization")
    return DemoResult(
        out=out,
        report=out / "report.html",
        run_dir=run_dir,
        random_init=config.weights_random,
        accuracies={name: 100.0 * r.top1 for name, r in results.readouts.items()},  # type: ignore[attr-defined]
        localization={name: m.max_box_acc_v2 for name, m in loc.maps.items()},  # type: ignore[attr-defined]
        seconds={s.key: s.seconds for s in done.steps},
        flagged=[name for name, r in results.readouts.items() if r.flagged],  # type: ignore[attr-defined]
    )


__all__ = ["DEFAULT_MODEL", "DemoConfig", "DemoResult", "demo_study_table", "run_demo"]
