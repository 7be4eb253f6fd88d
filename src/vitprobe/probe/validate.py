"""Checks on what a probe is given: inf/NaN tokens and bad labels are refused before training, naming rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vitprobe.errors import ProbeError
from vitprobe.pairing import unseen_class_warnings
from vitprobe.sources import TokenSource
from vitprobe.tokens import non_finite_rows


def _where(source: TokenSource) -> str:
    cache = getattr(source, "cache", None)
    return f"cache {cache.path}" if cache is not None else "the token source"


def nonfinite_rows(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Positions of the rows whose float tensors hold inf or NaN."""
    bad: torch.Tensor | None = None
    for t in tensors.values():
        if t.is_floating_point():
            rows = non_finite_rows(t)  # (n,)
            bad = rows if bad is None else bad | rows
    return torch.zeros(0, dtype=torch.long) if bad is None else bad.nonzero().flatten().cpu()


def refuse_nonfinite(
    source: TokenSource, keys: Sequence[str], memory: dict[str, torch.Tensor] | None
) -> None:
    """Raise a ProbeError naming the rows (dataset indices) with inf/NaN tokens, if any."""
    if memory is not None:
        rows = nonfinite_rows({k: memory[k] for k in keys})
    else:
        found = [
            nonfinite_rows(source.read_block(i, keys)) + start for i, (start, _) in enumerate(source.blocks)
        ]
        rows = torch.cat(found) if found else torch.zeros(0, dtype=torch.long)
    if len(rows):
        shown = ", ".join(str(int(i)) for i in source.indices[rows][:10]) + (" ..." if len(rows) > 10 else "")
        raise ProbeError(
            f"{_where(source)} holds inf/NaN tokens in {len(rows)} rows (dataset indices {shown}); a probe "
            "trained on them reports chance accuracy",
            "re-extract the cache (check the backbone's weights and --store: fp16 overflows where bf16 "
            "does not), or leave those images out of the dataset",
        )


def check_labels(train: TokenSource, fit_rows: torch.Tensor, test: TokenSource) -> list[str]:
    """Refuse labels outside the class range and a train set of one class; warn about test classes the
    train rows never show."""
    for source in (train, test):
        out = ((source.labels < 0) | (source.labels >= source.num_classes)).nonzero().flatten()
        if len(out):
            raise ProbeError(
                f"{_where(source)} has labels outside its {source.num_classes} classes in {len(out)} rows "
                f"(first: row {int(out[0])}, label {int(source.labels[out[0]])})",
                "re-extract the cache from a dataset whose labels index its class list",
            )
    present = torch.unique(train.labels[fit_rows])
    if len(present) < 2:
        only = train.class_names[int(present[0])] if len(present) else "none"
        raise ProbeError(
            f"the train rows hold a single class ({only!r}): a classifier cannot be trained or tested on it",
            "extract the train cache from a split with several classes",
        )
    return unseen_class_warnings(present.tolist(), torch.unique(test.labels).tolist(), test.class_names)
