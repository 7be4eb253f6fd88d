"""Extraction inputs: images decoded by DataLoader workers (PIL + timm's transform), or on the device.

`--decode cpu` (the default): workers open each image with PIL and apply timm's eval (or view) transform;
the main process copies the float batch to the device. `--decode gpu`: workers only read the files' bytes;
the main process decodes the JPEGs of a batch in one `torchvision.io.decode_jpeg(..., device=...)` call
(nvJPEG on CUDA) and applies the same resize / center crop / normalisation as tensor ops on the device, so
the CPU no longer bounds the throughput. Files that are not JPEGs (or that the device decoder refuses) are
decoded by PIL in the worker and sent as pixels. On a CPU device the same path runs with torchvision's CPU
decoder (what the tests exercise). The tensor resize (antialiased bicubic) is close to PIL's but not
bit-identical, so the manifest records `transform.decode = "gpu"` and the two never share a cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from vitprobe.errors import DatasetError, VitprobeError
from vitprobe.rows import CacheRows, Limit, view_transform

if TYPE_CHECKING:
    from vitprobe.extract import ExtractConfig
    from vitprobe.models import Backbone

JPEG_MAGIC = b"\xff\xd8\xff"
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # images (B, 3, H, W), labels, ...


def make_inputs(config: ExtractConfig, backbone: Backbone, dataset: Limit, *, device: torch.device) -> Any:
    """The rows a DataLoader reads and how a batch of them becomes images on `device`."""
    if config.decode == "gpu":
        return DeviceInputs(dataset, backbone.data_config(), device=device)
    transform = view_transform(backbone) if config.views else backbone.transform(train=False)
    return HostInputs(CacheRows(dataset, transform, views=config.views, seed=config.seed), device=device)


class HostInputs:
    """Decoded and transformed by the workers; `prepare` copies the batch to the device."""

    collate = None  # torch's default collate

    def __init__(self, rows: CacheRows, *, device: torch.device) -> None:
        self.rows, self.device = rows, device

    def prepare(self, batch: Sequence[torch.Tensor]) -> Batch:
        images, labels, indices, views = batch
        return images.to(self.device, non_blocking=self.device.type == "cuda"), labels, indices, views


@dataclass(frozen=True)
class Encoded:
    """One image as it leaves a worker: JPEG bytes (1-D uint8) or decoded pixels (3, H, W) uint8."""

    data: torch.Tensor
    is_jpeg: bool
    label: int
    index: int
    path: str


class EncodedRows(torch.utils.data.Dataset):
    """Cache row r -> the bytes of image r (views are not supported: augmentation runs on the CPU)."""

    def __init__(self, dataset: Limit) -> None:
        self.dataset = dataset
        self.paths = dataset.paths

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row: int) -> Encoded:
        label = int(self.dataset.labels[row])
        index = self.dataset.rows[row]  # the dataset index of cache row `row`
        path = str(self.paths[row]) if self.paths is not None else f"image {row}"
        if self.paths is not None:
            try:
                raw = open(self.paths[row], "rb").read()
            except FileNotFoundError as exc:
                raise DatasetError(f"missing image {path}", "restore the file or remove it from the dataset"
                                   ) from exc
            if raw.startswith(JPEG_MAGIC):
                return Encoded(torch.frombuffer(bytearray(raw), dtype=torch.uint8), True, label, index, path)
        return Encoded(_pil_pixels(self.dataset.load_image(row)), False, label, index, path)


def _pil_pixels(image: Any) -> torch.Tensor:
    """An RGB PIL image -> (3, H, W) uint8."""
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def collate_encoded(items: list[Encoded]) -> list[Encoded]:
    return items


class DeviceInputs:
    """Decoded and transformed on the device; workers only read bytes."""

    collate = staticmethod(collate_encoded)

    def __init__(self, dataset: Limit, data_config: dict[str, Any], *, device: torch.device) -> None:
        self.rows = EncodedRows(dataset)
        self.dataset, self.device = dataset, device
        self.transform = DeviceTransform(data_config, device=device)

    def prepare(self, items: list[Encoded]) -> Batch:
        pixels = self.decode(items)
        images = self.transform(pixels)  # (B, 3, H, W) float32, normalised
        labels = torch.tensor([it.label for it in items], dtype=torch.int64)
        indices = torch.tensor([it.index for it in items], dtype=torch.int64)
        return images, labels, indices, torch.zeros(len(items), dtype=torch.int64)

    def decode(self, items: list[Encoded]) -> list[torch.Tensor]:
        """(3, H, W) uint8 images on the device; the JPEGs in one batched decode_jpeg call."""
        from torchvision.io import ImageReadMode, decode_jpeg

        out: list[torch.Tensor | None] = [
            None if it.is_jpeg else it.data.to(self.device, non_blocking=True) for it in items
        ]
        jpegs = [i for i, it in enumerate(items) if it.is_jpeg]
        if jpegs:
            datas = [items[i].data for i in jpegs]
            try:
                decoded = decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:  # one bad file fails the whole call: find it, decode the rest one by one
                decoded = [self._decode_one(items[i]) for i in jpegs]
            for i, image in zip(jpegs, decoded, strict=True):
                out[i] = image
        return [image for image in out if image is not None]

    def _decode_one(self, item: Encoded) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(item.data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # e.g. CMYK or progressive JPEGs some decoders refuse: PIL decides
            try:
                return _pil_pixels(self.dataset.load_image(item.index)).to(self.device)
            except VitprobeError:
                raise
            except Exception as exc:  # load_image turns decoding errors into DatasetError already
                raise DatasetError(f"cannot read image {item.path} ({exc})",
                                   "replace or remove the corrupt file") from exc


class DeviceTransform:
    """timm's eval transform (resize the shorter side to floor(size / crop_pct), center crop, normalise) as
    tensor ops on the device, for the `center` and `squash` crop modes."""

    def __init__(self, data_config: dict[str, Any], *, device: torch.device) -> None:
        from torchvision.transforms import InterpolationMode

        _, h, w = data_config["input_size"]
        mode = data_config.get("crop_mode") or "center"
        if mode not in ("center", "squash") or h != w:
            raise VitprobeError(
                f"--decode gpu reproduces timm's center and squash crops of square inputs; this model uses "
                f"crop_mode {mode!r} at {h}x{w}", "drop --decode gpu (decode on the CPU)",
            )
        crop_pct = data_config.get("crop_pct") or 0.875
        self.size, self.scale, self.mode = h, math.floor(h / crop_pct), mode
        self.interpolation = InterpolationMode(data_config.get("interpolation", "bilinear"))
        self.mean = torch.tensor(data_config["mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(data_config["std"], device=device).view(1, 3, 1, 1)

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        import torchvision.transforms.v2.functional as TF

        out = []
        for image in images:  # (3, h_i, w_i) uint8: sizes differ until the crop
            size = [self.scale, self.scale] if self.mode == "squash" else [self.scale]
            image = TF.resize(image, size, interpolation=self.interpolation, antialias=True)
            out.append(TF.center_crop(image, [self.size, self.size]))  # (3, S, S)
        x = torch.stack(out).float().div_(255)  # (B, 3, S, S) in [0, 1]
        return (x - self.mean) / self.std
