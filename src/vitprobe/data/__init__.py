"""Datasets: a spec `KIND:PATH[?key=value&...]` plus a split -> an `ImageDataset` of images, labels, boxes.

Kinds (docs/datasets.md, `vitprobe data kinds`): `imagefolder:DIR`, `imagenet:DIR`, `cub:DIR`, `csv:FILE`,
`synthetic:needles[?n=..&classes=..&size=..&seed=..]`, and torchvision's on-disk layouts of the transfer
datasets, read without downloading: `flowers102`, `pets`, `dtd[?partition=P]`, `cars`, `aircraft[?level=..]`,
`food101`, `caltech101[?train_per_class=..&seed=..]`, `sun397[?partition=P]`, `cifar10`,
`cifar100[?labels=fine|coarse]`, `stl10[?fold=K]`. Nothing here decides how images are resized: callers
pass the backbone's transform. Every dataset has a `fingerprint`, the sha256 of its sorted (relative path,
label) list (plus the generator's config for generated datasets), that caches record.
"""

from __future__ import annotations

from vitprobe.data.cub import CUB_FILES, CUB_SPLITS, vitprobe_home
from vitprobe.data.dataset import GENERATOR_MARKER, Box, ImageDataset, fingerprint, generator_identity
from vitprobe.data.folders import SPLIT_FOLDER_NAMES
from vitprobe.data.images import DatasetWarning, to_rgb
from vitprobe.data.kinds import KINDS, Kind, list_splits, open_dataset, parse_spec, read_spec, summarize
from vitprobe.data.layout import ALL, IMAGE_EXTENSIONS
from vitprobe.data.spec import Param, Spec
from vitprobe.data.subset import stratified_subset

__all__ = [
    "ALL",
    "CUB_FILES",
    "CUB_SPLITS",
    "GENERATOR_MARKER",
    "IMAGE_EXTENSIONS",
    "KINDS",
    "SPLIT_FOLDER_NAMES",
    "Box",
    "DatasetWarning",
    "ImageDataset",
    "Kind",
    "Param",
    "Spec",
    "fingerprint",
    "generator_identity",
    "list_splits",
    "open_dataset",
    "parse_spec",
    "read_spec",
    "stratified_subset",
    "summarize",
    "to_rgb",
    "vitprobe_home",
]
