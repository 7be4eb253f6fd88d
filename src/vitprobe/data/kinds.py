"""The dataset kinds: one frozen `Kind` per `KIND:` of a spec, each with its opener, splits and parameters.

`open_dataset`, `list_splits` and `summarize` look a spec's kind up here; docs/datasets.md and
`vitprobe data kinds` describe the same table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from vitprobe.data import arrays, csvfile, cub, finegrained, folders, generic
from vitprobe.data.dataset import ImageDataset
from vitprobe.data.spec import Param, Spec, parse, split_kind


@dataclass(frozen=True)
class Kind:
    """One dataset kind (its name, the KIND of `KIND:PATH`, is its key in `KINDS`).

    Attributes:
        path: what PATH names (shown in help).
        layout: where the files are, in one line.
        splits: the splits it offers, or a function of the spec that lists them (layouts that vary; then
            `splits_help` says which they can be).
        boxes: which boxes it has, in a few words ("no" when none).
        opener: `(spec, split) -> ImageDataset`.
        params: the `?key=value` parameters it accepts.
        torchvision: the torchvision dataset class whose on-disk layout it reads, if any.
    """

    path: str
    layout: str
    splits: tuple[str, ...] | Callable[[Spec], list[str]]
    boxes: str
    opener: Callable[[Spec, str], ImageDataset]
    params: tuple[Param, ...] = ()
    torchvision: str | None = None
    splits_help: str = ""


_PARTITION = Param("partition", "official split number (default 1)", None, low=1, high=10)
_SYNTHETIC = (
    Param("n", "number of images (default 2000)", None, low=1),
    Param("classes", "number of classes (default 10)", None, low=2),
    Param("size", "image side in pixels (default 224)", None, low=16),
    Param("seed", "random seed (default 0)", None, low=0),
)

KINDS: dict[str, Kind] = {
    "imagefolder": Kind(
        path="DIR",
        layout="DIR/<class>/**/<image> or DIR/<split>/<class>/**/<image>",
        splits=folders.imagefolder_splits,
        splits_help="its split folders (train, val, valid, validation, test), else all",
        boxes="no",
        opener=folders.open_imagefolder,
        torchvision="ImageFolder",
    ),
    "imagenet": Kind(
        path="DIR",
        layout="DIR/{train,val}/<synset>/… (or a flat val/ + LOC_val_solution.csv)",
        splits=folders.imagenet_splits,
        splits_help="train, val (those present)",
        boxes="flat val/ only (LOC_val_solution.csv)",
        opener=folders.open_imagenet,
    ),
    "cub": Kind(
        path="DIR",
        layout="the official CUB_200_2011 folder (DIR or its parent)",
        splits=cub.CUB_SPLITS,
        boxes="yes (bounding_boxes.txt)",
        opener=cub.open_cub,
    ),
    "csv": Kind(
        path="FILE",
        layout="path,label[,x,y,w,h][,split] with a header",
        splits=csvfile.csv_splits,
        splits_help="the values of its split column, else all",
        boxes="with x,y,w,h columns",
        opener=csvfile.open_csv,
    ),
    "synthetic": Kind(
        path="needles",
        layout="generated once into $VITPROBE_HOME/synthetic/, CUB layout",
        splits=cub.CUB_SPLITS,
        boxes="yes (the needle)",
        opener=cub.open_synthetic,
        params=_SYNTHETIC,
    ),
    "flowers102": Kind(
        path="DIR",
        layout="flowers-102/{jpg/, imagelabels.mat, setid.mat}",
        splits=("train", "val", "test"),
        boxes="no",
        opener=finegrained.open_flowers102,
        torchvision="Flowers102",
    ),
    "pets": Kind(
        path="DIR",
        layout="oxford-iiit-pet/{images/, annotations/{trainval,test}.txt, annotations/xmls/}",
        splits=("trainval", "test"),
        boxes="head boxes (annotations/xmls, trainval)",
        opener=finegrained.open_pets,
        torchvision="OxfordIIITPet",
    ),
    "dtd": Kind(
        path="DIR",
        layout="dtd/{images/<class>/, labels/{train,val,test}<P>.txt}",
        splits=("train", "val", "test"),
        boxes="no",
        opener=generic.open_dtd,
        params=(_PARTITION,),
        torchvision="DTD",
    ),
    "cars": Kind(
        path="DIR",
        layout="stanford_cars/{devkit/, cars_train/, cars_test/, cars_test_annos_withlabels.mat}",
        splits=("train", "test"),
        boxes="yes (the annotations' bbox)",
        opener=finegrained.open_cars,
        torchvision="StanfordCars",
    ),
    "aircraft": Kind(
        path="DIR",
        layout="fgvc-aircraft-2013b/data/{images/, variants.txt, images_<level>_<split>.txt, images_box.txt}",
        splits=("train", "val", "trainval", "test"),
        boxes="yes (images_box.txt)",
        opener=finegrained.open_aircraft,
        params=(Param("level", "annotation level", "variant", choices=tuple(finegrained.AIRCRAFT_LEVELS)),),
        torchvision="FGVCAircraft",
    ),
    "food101": Kind(
        path="DIR",
        layout="food-101/{images/<class>/, meta/{train,test}.json}",
        splits=("train", "test"),
        boxes="no",
        opener=finegrained.open_food101,
        torchvision="Food101",
    ),
    "caltech101": Kind(
        path="DIR",
        layout="caltech101/{101_ObjectCategories/<class>/, Annotations/}",
        splits=("train", "test", "all"),
        boxes="yes (Annotations box_coord)",
        opener=generic.open_caltech101,
        params=(
            Param("train_per_class", "training images per class (default 30)", None, low=1),
            Param("seed", "seed of the train/test split (default 0)", None, low=0),
        ),
        torchvision="Caltech101",
    ),
    "sun397": Kind(
        path="DIR",
        layout="SUN397/{ClassName.txt, a/abbey/sun_*.jpg, …} [+ Partitions/Training_NN.txt, Testing_NN.txt]",
        splits=generic.sun397_splits,
        splits_help="train, test (with the official Partitions files), all",
        boxes="no",
        opener=generic.open_sun397,
        params=(_PARTITION,),
        torchvision="SUN397",
    ),
    "cifar10": Kind(
        path="DIR",
        layout="cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}",
        splits=("train", "test"),
        boxes="no",
        opener=arrays.open_cifar,
        torchvision="CIFAR10",
    ),
    "cifar100": Kind(
        path="DIR",
        layout="cifar-100-python/{train, test, meta}",
        splits=("train", "test"),
        boxes="no",
        opener=arrays.open_cifar,
        params=(Param("labels", "fine (100 classes) or coarse (20)", "fine", choices=("fine", "coarse")),),
        torchvision="CIFAR100",
    ),
    "stl10": Kind(
        path="DIR",
        layout="stl10_binary/{train_X.bin, train_y.bin, test_X.bin, test_y.bin, class_names.txt}",
        splits=("train", "test"),
        boxes="no",
        opener=arrays.open_stl10,
        params=(Param("fold", "one of the 10 official training folds (1,000 images)", None, low=0, high=9),),
        torchvision="STL10",
    ),
}
_PARAMS = {name: kind.params for name, kind in KINDS.items()}


def read_spec(text: str) -> Spec:
    """Parse a spec string; its kind and parameters are checked (a `DatasetError` names the problem)."""
    return parse(text, _PARAMS)


def parse_spec(spec: str) -> tuple[str, str]:
    """Split `KIND:REST` and check KIND; REST is the path with its `?query`, if any."""
    return split_kind(spec, KINDS)


def open_dataset(
    spec: str, split: str, *, transform: Callable[[Image.Image], Any] | None = None
) -> ImageDataset:
    """Open a dataset spec at one split.

    Args:
        spec: `KIND:PATH[?key=value&...]`, e.g. `cub:DIR`, `dtd:DIR?partition=3`, `synthetic:needles?n=200`
            (`KINDS` lists the kinds).
        split: `train`, `val`, `test`, ... as the layout has them, or `all` where it offers it.
        transform: applied to each PIL image in `__getitem__` (usually `backbone.transform()`).

    Raises:
        DatasetError: unknown kind or parameter, missing files (the message names the expected file), unknown
            split, labels or boxes that cannot be right.
    """
    parsed = read_spec(spec)
    dataset = KINDS[parsed.kind].opener(parsed, split)
    dataset.transform = transform
    return dataset


def list_splits(spec: str) -> list[str]:
    """The splits a spec offers, e.g. `["train", "test", "all"]` for CUB or `["all"]` for a flat folder."""
    parsed = read_spec(spec)
    splits = KINDS[parsed.kind].splits
    return list(splits) if isinstance(splits, tuple) else splits(parsed)


def summarize(spec: str, split: str | None = None) -> dict[str, Any]:
    """What `vitprobe data show` prints: `{"spec": spec, "splits": {split: ImageDataset.describe()}}`.

    Args:
        spec: a dataset spec.
        split: one split, or None for every split the spec offers except `all` when others exist.
    """
    splits = [split] if split is not None else list_splits(spec)
    if split is None and len(splits) > 1:
        splits = [s for s in splits if s != "all"]
    return {"spec": spec, "splits": {name: open_dataset(spec, name).describe() for name in splits}}
