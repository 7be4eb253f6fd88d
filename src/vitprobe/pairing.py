"""Cache pairs: which train and test caches (and saved heads) can be used together, and what to warn about.

Identity is the backbone (timm name, checkpoint, random-init seed), the token dim and the class names, read
from cache manifests; `check_pair` refuses a mismatch, `pair_warnings` names what is allowed but suspect
(the same images on both sides, swapped splits), `unseen_class_warnings` test classes the train rows lack.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from vitprobe.errors import CacheError, ProbeError

if TYPE_CHECKING:
    from vitprobe.cache import TokenCache


def resolve_layer(cache: TokenCache, layer: int | None) -> int:
    """The block to probe: `layer` (negative counts from the model's last block, as `extract --layers`
    does: -1 = last) if the cache holds it, else the deepest block stored when `layer` is None."""
    layers = list(cache.layers)
    if layer is None:
        return max(layers)
    depth = cache.manifest.get("depth")
    block = layer + int(depth) if layer < 0 and depth is not None else layer
    if block in layers:
        return block
    given = f"{layer} (block {block} of {depth})" if block != layer else str(layer)
    raise ProbeError(
        f"layer {given} is not in the cache {cache.path} (it holds blocks {layers})",
        f"pass --layer with one of {layers}, or extract that block with `vitprobe extract --layers`",
    )


def resolve_layers(cache: TokenCache, layer: int | tuple[int, ...] | str | None) -> list[int]:
    """The blocks `--layer` names, in the cache's order: one block (`resolve_layer`), every block of a
    tuple (negatives count from the model's last block), or all the cache stores ("all")."""
    if layer == "all":
        return sorted(cache.layers)
    if isinstance(layer, tuple):
        blocks = [resolve_layer(cache, b) for b in layer]
        if len(set(blocks)) != len(blocks):
            raise ProbeError(f"--layer {','.join(map(str, layer))} names a block twice ({blocks})",
                             "list each block once")
        return sorted(blocks)
    return [resolve_layer(cache, layer if isinstance(layer, int) else None)]


def backbone_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """What identifies the backbone a cache came from: timm name, checkpoint id, random-init flag, and for
    random weights the seed that drew them (two random-init caches of one model differ unless it matches)."""
    model = manifest.get("model", {})
    random_init = bool(model.get("random_init", False))
    return {
        "timm_name": model.get("timm_name"),
        "checkpoint": model.get("checkpoint"),
        "random_init": random_init,
        "seed": manifest.get("seed") if random_init else None,
    }


def token_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """`backbone_identity` plus what a head depends on: token dim and the class names, in order."""
    dataset = manifest.get("dataset", {})
    return {
        **backbone_identity(manifest),
        "dim": manifest.get("dim"),
        "class_names": list(dataset.get("class_names", [])),
    }


def identity_mismatch(ours: dict[str, Any], theirs: dict[str, Any]) -> tuple[str, str] | None:
    """How two `token_identity` dicts first disagree, as (what differs, how to fix it); None if they match.

    A key missing on one side (heads saved by an older vitprobe have no seed) is not compared.
    """
    if ours["timm_name"] != theirs["timm_name"]:
        return (
            f"different backbones ({ours['timm_name']} vs {theirs['timm_name']})",
            "use tokens extracted with the same --model",
        )
    if ours["checkpoint"] != theirs["checkpoint"] or ours["random_init"] != theirs["random_init"]:
        return (
            f"different checkpoints ({ours['checkpoint']} vs {theirs['checkpoint']})",
            "use tokens extracted from the same weights",
        )
    if ours.get("seed", theirs.get("seed")) != theirs.get("seed", ours.get("seed")):
        return (
            f"different random weights (random-init seeds {ours['seed']} vs {theirs['seed']})",
            "extract both with the same --random-init --seed",
        )
    if int(ours["dim"]) != int(theirs["dim"]):
        return f"token dims differ ({ours['dim']} vs {theirs['dim']})", "use tokens of one backbone"
    if list(ours["class_names"]) != list(theirs["class_names"]):
        a, b = ours["class_names"], theirs["class_names"]
        diff = sorted(set(a) ^ set(b))[:5] or ["same names, other order"]
        return (
            f"class sets differ ({len(a)} vs {len(b)} classes; differing: {', '.join(diff)})",
            "use splits of one dataset (same class folders)",
        )
    return None


TRAIN_SPLITS = frozenset({"train", "trainval"})  # split names that say "train on me"
HELD_OUT_SPLITS = frozenset({"test", "val", "validation", "eval"})  # ... and "evaluate on me"


def pair_warnings(train: TokenCache, test: TokenCache) -> list[str]:
    """Warnings for a train/test pair's results: random weights, test images that were trained on, and
    --train / --test given the other way round (the manifests' split names say so)."""
    warnings = []
    if backbone_identity(train.manifest)["random_init"]:
        warnings.append("the backbone was randomly initialised: these accuracies measure nothing pretrained")
    a, b = train.manifest["dataset"], test.manifest["dataset"]
    if a.get("fingerprint") and a.get("fingerprint") == b.get("fingerprint"):
        warnings.append(
            f"the train and test caches hold the same images ({a['spec']}, split {a['split']}, fingerprint "
            f"{str(a['fingerprint'])[:12]}): the test accuracy is a training accuracy"
        )
    elif str(a.get("split")).lower() in HELD_OUT_SPLITS and str(b.get("split")).lower() in TRAIN_SPLITS:
        warnings.append(
            f"--train and --test look swapped: the train cache {train.path} holds split {a['split']!r} and "
            f"the test cache {test.path} split {b['split']!r}; pass the train split's cache as --train"
        )
    return warnings


def unseen_class_warnings(
    train_labels: Iterable[int], test_labels: Iterable[int], class_names: Sequence[str]
) -> list[str]:
    """A warning when test rows hold classes no train row shows: those images cannot be classified right."""
    unseen = sorted(set(map(int, test_labels)) - set(map(int, train_labels)))
    if not unseen:
        return []
    names = ", ".join(class_names[c] for c in unseen[:5]) + (" ..." if len(unseen) > 5 else "")
    return [
        f"{len(unseen)} test classes never appear in the train rows ({names}): their test images "
        "cannot be classified correctly"
    ]


def check_pair(train: TokenCache, test: TokenCache, layer: int) -> None:
    """Refuse a train/test pair from different backbones, weights, layers, dims or class sets."""
    where = f"train cache {train.path} vs test cache {test.path}"
    problem = identity_mismatch(token_identity(train.manifest), token_identity(test.manifest))
    if problem is not None:
        raise CacheError(f"{where}: {problem[0]}", problem[1])
    if layer not in test.layers:
        raise CacheError(
            f"{where}: block {layer} is in the train cache but not the test cache "
            f"(it holds {list(test.layers)})",
            "extract the same --layers for both splits",
        )
