"""Run directories in the result formats vitprobe writes, for the report tests (no model is run)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

CLASSES = [f"class_{i}" for i in range(8)]


def _png(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def make_run(
    root: Path,
    name: str,
    *,
    cls: float,
    abmilp: float,
    random_init: bool = True,
    cls_self: float = 0.4,
    with_analyses: bool = True,
) -> Path:
    """A run directory with results.json, knn.json and (optionally) attention / frequency / localization."""
    run = root / name
    run.mkdir(parents=True)
    prov = {
        "model": name,
        "timm_name": "test_vit",
        "checkpoint": "random-init" if random_init else "ab" * 32,
        "random_init": random_init,
        "dataset": "synthetic:needles",
        "split": "test",
        "fingerprint": "f00d",
        "versions": {"vitprobe": "0.1.0", "torch": "2.x"},
    }

    def readout(top1: float, top5: float) -> dict[str, Any]:
        return {
            "blr": 0.1,
            "lr": 0.4,
            "epoch": 3,
            "top1": top1,
            "top5": top5,
            "per_class": {c: (top1 + 0.05 * (i - 4)) for i, c in enumerate(CLASSES)},
            "curves": {
                "0.1": {
                    "blr": 0.1,
                    "lr": 0.4,
                    "epoch": [1, 2, 3],
                    "train_loss": [2.0, 1.5, 1.2],
                    "holdout_top1": [0.2, top1 - 0.05, top1],
                },
                "0.05": {
                    "blr": 0.05,
                    "lr": 0.2,
                    "epoch": [1, 2, 3],
                    "train_loss": [2.1, 1.7, 1.4],
                    "holdout_top1": [0.1, 0.15, 0.2],
                },
            },
        }

    results = {
        "format": "vitprobe-probe-results",
        "version": 1,
        "kind": "probe",
        "random_init": random_init,
        "warnings": ["the backbone was randomly initialised: these accuracies measure nothing"]
        if random_init
        else [],
        "notes": [],
        "layer": 5,
        "final_norm": False,
        "class_names": CLASSES,
        "selection": {"split": "holdout", "rule": "max top-1 on a holdout", "optimistic": False},
        "readouts": {
            "cls": readout(cls, 0.9),
            "mean": readout((cls + abmilp) / 2, 0.92),
            "abmilp": readout(abmilp, 0.95),
        },
        "config": {"optimizer": "lars", "epochs": 3, "batch_size": 64, "blr": 0.1, "seed": 0},
        "train_cache": {"path": "x", "provenance": {**prov, "split": "train"}},
        "test_cache": {"path": "y", "provenance": prov},
        "an_unknown_key": {"nested": [1, 2, 3]},
    }
    (run / "results.json").write_text(json.dumps(results))
    knn = {
        "kind": "knn",
        "random_init": random_init,
        "pool": "cls",
        "knn": {"10": {"top1": cls - 0.02, "top5": 0.8}, "20": {"top1": cls - 0.01, "top5": 0.81}},
    }
    (run / "knn.json").write_text(json.dumps(knn))
    if not with_analyses:
        return run
    (run / "figures").mkdir()
    (run / "figures" / "cls_maps.png").write_bytes(_png((200, 30, 30)))
    svg = '<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"><rect width="4" height="4"/></svg>'
    (run / "figures" / "cls_maps.svg").write_text(svg)
    attention = {
        "kind": "attention",
        "schema_version": 1,
        "label": name,
        "model": {
            "model": name,
            "timm_name": "test_vit",
            "source": "random-init",
            "sha256": None,
            "random_init": random_init,
        },
        "random_init": random_init,
        "data": {"spec": "synthetic:needles", "split": "test"},
        "blocks": [1, 2, 3],
        "stats": {
            "cls_self": {"per_head": [[0.1, 0.2]] * 3, "mean": [0.15, 0.3, cls_self]},
            "cls_entropy": {"per_head": None, "mean": [4.0, 3.5, 3.9]},
            "patch_entropy": {"per_head": None, "mean": [3.0, 3.2, 3.1]},
            "attention_distance": {"per_head": None, "mean": [30.0, 50.0, 60.0]},
        },
        "figures": ["figures/cls_maps.png", "figures/cls_maps.svg", "figures/missing.png"],
    }
    (run / "attention.json").write_text(json.dumps(attention))
    frequency = {
        "kind": "frequency",
        "schema_version": 1,
        "random_init": random_init,
        "layers": ["embed", "block 1", "block 2", "block 3"],
        "frequency": [0.0, 0.5, 1.0],
        "delta_log_amplitude": [[0.0, -0.5, -1.0], [0.0, -0.4, -0.8], [0.0, -0.3, -0.6], [0.0, -0.2, -0.4]],
        "headline": [-1.0, -0.8, -0.6, -0.4],
        "high_freq_energy_ratio": [0.30, 0.25, 0.2, 0.125],
    }
    (run / "frequency.json").write_text(json.dumps(frequency))
    localization = {
        "kind": "localization",
        "schema_version": 1,
        "random_init": random_init,
        "maps": {
            "cls_attention": {
                "max_box_acc_v2": 20.0,
                "max_box_acc": {"30": 40.0, "50": 15.0, "70": 5.0},
                "num_images": 10,
            },
            "abmilp": {
                "max_box_acc_v2": 30.0,
                "max_box_acc": {"30": 50.0, "50": 30.0, "70": 10.0},
                "num_images": 10,
            },
        },
        "figures": ["localization_boxes.png"],
    }
    (run / "localization_boxes.png").write_bytes(_png((30, 30, 200)))
    (run / "localization.json").write_text(json.dumps(localization))
    return run
