"""Errors keep their one line across DataLoader worker processes (torch rebuilds them from a string)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from vitprobe.errors import CacheError, DatasetError, VitprobeError, _from_worker_text

MESSAGE = "imagefolder:/d: cannot read image /d/b/3.png (OSError)"


class _Failing(Dataset):
    """Item 3 raises `error_type(message, hint)`, as an image loader does for a corrupt file."""

    def __init__(self, error_type: type[VitprobeError], hint: str | None) -> None:
        self.error_type, self.hint = error_type, hint

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 3:
            try:
                raise OSError("Truncated File Read")
            except OSError as exc:  # chained, as `raise DatasetError(...) from exc` in vitprobe.data
                raise self.error_type(MESSAGE, self.hint) from exc
        return torch.zeros(2)


@pytest.mark.parametrize(
    ("error_type", "hint"),
    [(DatasetError, "replace or remove the corrupt file"), (CacheError, None)],
    ids=["DatasetError+hint", "CacheError-no-hint"],
)
def test_a_worker_error_arrives_as_the_workers_one_line(
    error_type: type[VitprobeError], hint: str | None
) -> None:
    loader = DataLoader(_Failing(error_type, hint), batch_size=2, num_workers=2)
    with pytest.raises(error_type) as info:
        list(loader)
    assert type(info.value) is error_type  # torch rebuilt the class itself, not a RuntimeError
    assert info.value.message == MESSAGE
    assert info.value.hint == hint
    assert "Traceback" not in str(info.value) and "\n" not in str(info.value)


def test_the_same_error_without_workers_is_unchanged() -> None:
    with pytest.raises(DatasetError) as info:
        list(DataLoader(_Failing(DatasetError, "fix it"), batch_size=2, num_workers=0))
    assert (info.value.message, info.value.hint) == (MESSAGE, "fix it")
    assert not getattr(info.value, "__notes__", None)  # notes are added in worker processes only


def test_worker_text_without_the_note_gives_the_exception_line() -> None:
    """Python 3.10 prints no exception notes: the traceback's last line still carries "message (hint)"."""
    text = (
        "Caught DatasetError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\nvitprobe.errors.DatasetError: bad image /a.png (replace it)\n'
    )
    assert _from_worker_text(DatasetError, text) == ("bad image /a.png (replace it)", None)
    assert DatasetError(text).message == "bad image /a.png (replace it)"


def test_other_messages_and_two_argument_calls_are_kept() -> None:
    assert _from_worker_text(DatasetError, "Caught nothing") == ("Caught nothing", None)
    text = "Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback ..."
    error = DatasetError(text, "hint")
    assert error.message.startswith("Caught") and error.hint == "hint"  # an explicit hint: taken as given
    assert str(VitprobeError("what", "fix")) == "what (fix)" and VitprobeError("what").hint is None
