"""User-facing choices: every enumerated option of vitprobe declared once, with what each value means.

Torch-free and typer-free, so the CLI (`Choice.enum()` gives the `str` Enum typer shows), the library
(`Choice.check(value)` refuses an unknown value with the option's name) and study files read the same
lists. The tuples below (`POOLS`, `OPTIMIZERS`, ...) are the names library modules import.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from vitprobe.errors import VitprobeError


@dataclass(frozen=True)
class Choice:
    """One enumerated option: its CLI spelling, its values (in display order) and a line per value."""

    option: str  # how the CLI spells it, named in errors: "--pool"
    values: dict[str, str]  # value -> what it means (one line)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.values)

    def check(self, value: str, *, where: str = "", error: type[VitprobeError] = VitprobeError) -> str:
        """`value` if it is one of the names, else `error` (a VitprobeError) naming the option and names."""
        if value not in self.values:
            at = f"{where}: " if where else ""
            hint = f"use one of {', '.join(self.values)}"
            raise error(f"{at}unknown {self.option} {value!r}", hint)
        return value

    def enum(self, name: str | None = None) -> type[Enum]:
        """A `str` Enum of the names (typer shows its members as the option's choices)."""
        label = name or self.option.strip("-").title().replace("-", "")
        return Enum(label, {v: v for v in self.values}, type=str)  # type: ignore[return-value]

    def help(self) -> str:
        """`a: what a means; b: what b means`, for --help texts and docs."""
        return "; ".join(f"{k}: {v}" for k, v in self.values.items())


POOL = Choice(
    "--pool",
    {
        "cls": "the [cls] token",
        "mean": "the mean of the patch tokens",
        "cls+mean": "[cls] and the patch mean, concatenated",
        "abmilp": "attention-based MIL pooling of the patch tokens (Beyond [cls])",
        "attentive": "learnable queries cross-attending to the patch tokens (efficient probing)",
        "cls-cat": "the [cls] tokens of the last stored blocks, concatenated (DINOv2's n_last_blocks)",
        "cls-cat+mean": "cls-cat and the last block's patch mean (DINOv2's avgpool)",
        "fusion": "softmax-weighted sum of the stored blocks' [cls] tokens (MFF)",
    },
)
ABMILP_ACT = Choice("--abmilp-act", {"tanh": "tanh (the reference default)", "relu": "ReLU"})
ABMILP_CONTENT = Choice(
    "--abmilp-content",
    {
        "patch": "pool the patch tokens only (the paper's MAE setting)",
        "all": "pool [cls] and register tokens too",
    },
)
OPTIMIZER = Choice(
    "--optimizer",
    {
        "lars": "LARS (MAE linear probing)",
        "sgd": "SGD with momentum",
        "adamw": "AdamW",
    },
)
PROTOCOL = Choice(
    "--protocol",
    {
        "auto": "converged by default: SGD, 13 lrs x 3 weight decays, >= 25,000 steps, heads compared at "
        "the end of their schedule on a train holdout",
        "mae": "the MAE / Beyond [cls] LARS recipe",
        "ep": "the efficient-probing recipe",
        "logreg": "L-BFGS logistic regression on pooled features",
    },
)
LOGREG_POOL = Choice(  # read-outs of pooled features (no trained pooling)
    "--pool", {k: POOL.values[k] for k in ("cls", "mean", "cls+mean", "cls-cat", "cls-cat+mean")}
)
SELECT_ON = Choice(
    "--select-on",
    {
        "holdout": "lr and epoch chosen on a stratified holdout of the train cache",
        "test": "chosen on the test set (optimistic, as papers that report the best test epoch)",
    },
)
SELECT_EPOCH = Choice(
    "--select-epoch",
    {
        "best": "each head at its best epoch on the selection split (early stopping)",
        "last": "each head at the end of its schedule",
    },
)
LOAD = Choice(
    "--load",
    {
        "auto": "load the caches whole when they fit, else stream",
        "memory": "load the caches whole",
        "stream": "read shard by shard",
    },
)
AMP = Choice("--amp", {"auto": "bf16 autocast on CUDA only", "off": "fp32", "bf16": "bf16 autocast"})
KNN_POOL = Choice("--pool", {k: POOL.values[k] for k in ("cls", "mean")})
DATASET_KIND = Choice(
    "dataset kind",
    {
        "imagefolder": "one folder per class (optionally under split folders)",
        "imagenet": "ImageNet-1k train/ and val/ (flat val with its solution file, or class folders)",
        "cub": "CUB-200-2011 (images.txt, train_test_split.txt, bounding_boxes.txt)",
        "csv": "a CSV of path,label[,x,y,w,h] rows",
        "synthetic": "the generated needles dataset",
        "flowers102": "Oxford Flowers-102 (jpg/, imagelabels.mat, setid.mat)",
        "pets": "Oxford-IIIT Pet (images/, annotations/)",
        "dtd": "Describable Textures (images/, labels/; ?partition=1..10)",
        "cars": "Stanford Cars (devkit/, cars_train/, cars_test/)",
        "aircraft": "FGVC-Aircraft 2013b (data/images/, variants)",
        "food101": "Food-101 (images/, meta/)",
        "caltech101": "Caltech-101 (101_ObjectCategories/, Annotations/)",
        "sun397": "SUN397 (class folders, optional Partitions/)",
        "cifar10": "CIFAR-10 python batches",
        "cifar100": "CIFAR-100 python files",
        "stl10": "STL-10 binary files",
    },
)
TOKENS = Choice(
    "--tokens",
    {
        "all": "[cls] + registers + patches",
        "cls": "[cls] only",
        "pooled": "[cls] + the patch mean",
    },
)
STORE = Choice(
    "--store",
    {
        "fp16": "float16",
        "bf16": "bfloat16",
        "fp32": "float32",
        "fp8": "float8 e4m3 codes, one fp32 scale per token (half of fp16)",
        "int8": "int8 codes, one fp32 scale per token (half of fp16)",
    },
)
DECODE = Choice(
    "--decode",
    {
        "cpu": "PIL + the timm transform in the loader workers",
        "gpu": "batched JPEG decoding and the same resize/crop on the device",
    },
)
DTYPE = Choice(
    "--dtype",
    {
        "auto": "bf16 autocast on CUDA (fp16 without bf16), fp32 on CPU",
        "fp32": "float32",
        "bf16": "bfloat16 autocast",
        "fp16": "float16 autocast",
    },
)
REPORT_FORMAT = Choice(
    "--format",
    {
        "html": "one self-contained page",
        "md": "Markdown, figures beside it",
        "json": "the collected report",
        "github": "a compact CI job summary",
        "csv": "the pivot table (models x read-outs, or x datasets)",
        "latex": "the pivot table as a booktabs tabular",
    },
)
PIVOT = Choice(
    "--pivot",
    {
        "readouts": "one column per read-out (cls | mean | abmilp | attentive | k-NN)",
        "datasets": "one column per dataset, for one --readout",
    },
)
OUTPUT_FORMAT = Choice(
    "--format",
    {
        "human": "tables for people (stdout), diagnostics on stderr",
        "json": "one JSON object on stdout, diagnostics on stderr",
    },
)
STUDY_STEP = Choice(
    "study step",
    {
        "probe": "train the read-outs on the caches (results.json)",
        "knn": "weighted k-NN on the caches (knn.json)",
        "attention": "attention statistics per block (attention.json)",
        "frequency": "Fourier analysis of the token maps (frequency.json)",
        "localization": "MaxBoxAccV2 of [cls] attention and the head's maps (localization.json)",
    },
)

POOLS = POOL.names
ABMILP_ACTS = ABMILP_ACT.names
ABMILP_CONTENTS = ABMILP_CONTENT.names
OPTIMIZERS = OPTIMIZER.names
PROTOCOLS = PROTOCOL.names
LOGREG_POOLS = LOGREG_POOL.names
SELECT_ONS = SELECT_ON.names
SELECT_EPOCHS = SELECT_EPOCH.names
LOAD_MODES = LOAD.names
AMP_MODES = AMP.names
KNN_POOLS = KNN_POOL.names
DATASET_KINDS = DATASET_KIND.names
TOKEN_MODES = TOKENS.names
STORE_DTYPES = STORE.names
COMPUTE_DTYPES = DTYPE.names
DECODERS = DECODE.names
REPORT_FORMATS = REPORT_FORMAT.names
OUTPUT_FORMATS = OUTPUT_FORMAT.names
STUDY_STEPS = STUDY_STEP.names
