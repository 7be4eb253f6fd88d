"""torchrun ranks of an extraction: the process group, rank 0's plan for all, and errors shared by all.

Every collective of an extraction also carries each rank's error, so that an error on any rank (a corrupt
image, a full disk) stops every rank at the same point and rank 0 reports it once, naming the rank, instead
of the other ranks dying of a "Connection closed by peer" while waiting for the one that failed.
"""

from __future__ import annotations

import copy
import os
import traceback
from datetime import timedelta
from typing import Any

import torch

from vitprobe.errors import VitprobeError


class RankLost(VitprobeError):
    """Another torchrun rank disappeared (killed, crashed) while this one waited for it."""


def init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group) from torchrun's environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    # torch.distributed.nn's collectives take `group=group.WORLD` as a default argument, bound at import.
    # Imported after the group exists (timm imports it, through torch._dynamo), they would keep the group
    # alive past destroy_process_group, and its gloo threads would be torn down with the interpreter instead,
    # where they abort the process at random ("terminate called without an active exception") after a
    # finished run.
    import torch.distributed.nn  # noqa: F401

    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return dist.get_rank(), dist.get_world_size(), True


def exchange(
    payload: Any, error: BaseException | None, *, rank: int, world: int, name_ranks: bool = True
) -> list[Any]:
    """Every rank's `payload` (all ranks call this together); raises if any rank brought an error.

    A `VitprobeError` is re-raised on every rank as one error naming the ranks it happened on (so rank 0 can
    print it; `name_ranks=False` for a step only rank 0 runs); any other exception is re-raised as itself on
    its own rank (its traceback printed there) and as a one-line error naming it on the others.
    """
    if world <= 1:
        if error is not None:
            raise error
        return [payload]
    import torch.distributed as dist

    sent = (payload, None if error is None else _portable(error))
    gathered: list[Any] = [None] * world
    try:
        dist.all_gather_object(gathered, sent)
    except RuntimeError as exc:  # gloo / nccl: a peer died (killed, out of memory) while we waited for it
        if error is not None:
            raise error from exc
        raise RankLost(
            f"rank {rank} of {world} lost the other ranks ({str(exc).splitlines()[0]}): another rank "
            "stopped; torchrun's report names it",
            "fix what stopped it and re-run the same command: it resumes from the last complete shard",
        ) from exc
    failures = [(r, e) for r, (_, e) in enumerate(gathered) if e is not None]
    if failures:
        if error is not None and not isinstance(error, VitprobeError):
            raise error
        raise combine(failures, world, name_ranks=name_ranks)
    return [p for p, _ in gathered]


def combine(failures: list[tuple[int, Any]], world: int, *, name_ranks: bool = True) -> VitprobeError:
    """One error for the errors of several ranks: identical ones once, each prefixed by its ranks (unless
    every rank had the same one, or `name_ranks` is False)."""
    groups: dict[tuple[str, str | None], list[int]] = {}
    first: dict[tuple[str, str | None], VitprobeError] = {}
    for rank, err in failures:
        if not isinstance(err, VitprobeError):
            err = VitprobeError(f"{err[0]}: {err[1]} (its traceback is printed by rank {rank})", None)
        key = (err.message, err.hint)
        groups.setdefault(key, []).append(rank)
        first.setdefault(key, err)
    parts, hints = [], []
    everyone = len(groups) == 1 and len(failures) == world
    for key, ranks in groups.items():
        who = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
        parts.append(key[0] if everyone or not name_ranks else f"{who} of {world}: {key[0]}")
        if key[1] and key[1] not in hints:
            hints.append(key[1])
    out = copy.copy(first[next(iter(groups))])
    out.message = "; ".join(parts)
    out.hint = "; ".join(hints) or None
    out.args = (out.message,)
    return out


def broadcast(obj: Any, *, world: int) -> Any:
    """Rank 0's `obj` on every rank."""
    if world <= 1:
        return obj
    import torch.distributed as dist

    payload = [obj]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


def _portable(error: BaseException) -> Any:
    """What travels to the other ranks: a VitprobeError itself, anything else as (type name, text)."""
    if isinstance(error, VitprobeError):
        return error
    text = str(error) or "".join(traceback.format_exception_only(type(error), error)).strip()
    return (type(error).__name__, text)
