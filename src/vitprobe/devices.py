"""Devices and dtypes: pick CUDA automatically where it exists, CPU otherwise."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vitprobe.errors import VitprobeError

if TYPE_CHECKING:
    import torch

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` → `cuda` when available (the local rank's GPU under torchrun), else `cpu`."""
    import os

    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise VitprobeError(
                f"--device {name} was asked for but no CUDA GPU is visible", "use --device cpu or auto"
            )
        if name == "cuda" and "LOCAL_RANK" in os.environ:
            name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    elif name not in ("cpu", "mps"):
        raise VitprobeError(f"unknown device {name!r}", "use auto, cpu or cuda[:N]")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` → bf16 on CUDA (autocast; fp16 on GPUs without bf16, e.g. V100, T4), fp32 on CPU."""
    import torch

    if name == "auto":
        if device.type != "cuda":
            name = "fp32"
        else:
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name not in DTYPES:
        raise VitprobeError(f"unknown dtype {name!r}", f"use one of auto, {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def loader_workers(requested: int) -> int:
    """DataLoader workers: `requested`, but no more than the CPU cores this process may use.

    More workers than cores only adds contention (and a PyTorch warning); on a 2-core laptop the default of 4
    becomes 2, on a GPU server it stays 4.
    """
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(0, min(requested, cores))
