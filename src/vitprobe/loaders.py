"""DataLoaders whose workers' errors reach the user as the one line, not as a worker traceback.

PyTorch re-raises an exception from a DataLoader worker in the main process as a new exception of the same
type whose message is the worker's whole formatted traceback (37-42 lines for a corrupt image), and the
`VitprobeError` hint is lost. Here a `VitprobeError` raised while loading an item travels back as the item
itself (`Failure`, picklable), the batch it lands in becomes that failure, and `checked` / `iter_checked`
raise the original error (message and hint) in the main process. Other exceptions (bugs) keep their
tracebacks. Use it for any DataLoader over images:

    loader = guarded_loader(dataset, batch_size=64, num_workers=4)
    for batch in iter_checked(loader):
        ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from torch.utils.data import DataLoader, Dataset, get_worker_info
from torch.utils.data import default_collate as _default_collate

from vitprobe.errors import VitprobeError

T = TypeVar("T")


class Failure:
    """A `VitprobeError` raised while loading item `index` (in worker `worker`, None = the main process)."""

    def __init__(self, error: VitprobeError, index: Any, worker: int | None) -> None:
        self.error, self.index, self.worker = error, index, worker

    def __repr__(self) -> str:
        return f"Failure({self.error!r}, index={self.index!r}, worker={self.worker})"


class GuardedItems(Dataset):
    """A map-style dataset whose items are `Failure`s instead of raising a `VitprobeError`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: Any) -> Any:
        try:
            return self.dataset[index]
        except VitprobeError as exc:
            info = get_worker_info()
            return Failure(exc, index, None if info is None else info.id)


class GuardedCollate:
    """`collate` over a batch's items, or the batch's first `Failure` when an item failed (picklable)."""

    def __init__(self, collate: Callable[[list[Any]], Any] | None = None) -> None:
        self.collate = collate or _default_collate

    def __call__(self, items: Sequence[Any]) -> Any:
        for item in items:
            if isinstance(item, Failure):
                return item
        return self.collate(list(items))


def guarded_loader(dataset: Dataset, **kwargs: Any) -> DataLoader:
    """`DataLoader(dataset, **kwargs)` whose `VitprobeError`s come back as `Failure` batches (`checked`)."""
    collate = kwargs.pop("collate_fn", None)
    return DataLoader(GuardedItems(dataset), collate_fn=GuardedCollate(collate), **kwargs)


def checked(batch: T) -> T:
    """Raise the error a `Failure` batch carries; return any other batch unchanged."""
    if isinstance(batch, Failure):
        raise batch.error
    return batch


def iter_checked(loader: Iterable[T]) -> Iterator[T]:
    """The loader's batches, raising a worker's `VitprobeError` as itself (one line, with its hint)."""
    batches = iter(loader)
    try:
        for batch in batches:
            yield checked(batch)
    finally:
        close(batches)


def close(batches: Iterator[Any]) -> None:
    """Shut a DataLoader iterator's workers down now, also after an error or a signal.

    Otherwise the iterator lives on in the traceback, and its workers (killed by the same Ctrl-C or SIGTERM)
    make PyTorch's SIGCHLD handler raise "DataLoader worker ... is killed by signal" at interpreter exit, a
    traceback after the one-line error.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multi-process iterator
    if shutdown is not None:
        shutdown()

