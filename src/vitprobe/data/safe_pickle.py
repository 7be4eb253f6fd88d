"""Reading data files that are pickles (CIFAR's python batches) without running code from them.

A pickle can name any importable callable and call it while loading. The unpickler here resolves only the
globals a pickled numpy array needs (`numpy.core.multiarray._reconstruct`, `numpy.ndarray`, `numpy.dtype`);
every other global — `os.system`, `builtins.eval`, `subprocess.Popen`, ... — is refused before anything is
called, as are persistent ids. Containers, numbers and strings need no globals.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from vitprobe.errors import DatasetError

_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),  # numpy < 2 spelling (what the CIFAR files name)
    ("numpy._core.multiarray", "_reconstruct"),  # numpy >= 2 spelling
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list."""


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _NUMPY_GLOBALS:
            raise RefusedGlobal(f"{module}.{name}")
        if name == "_reconstruct":
            return _reconstruct()
        return getattr(np, name)


def _reconstruct() -> Any:
    """numpy's array reconstructor, from wherever this numpy keeps it (no deprecation warning)."""
    try:
        from numpy._core.multiarray import _reconstruct as found
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct as found
    return found


def load_data_pickle(path: Path, *, where: str) -> Any:
    """Unpickle a data file that holds only containers, numbers, strings and numpy arrays.

    Python 2 strings are decoded as latin-1 (as torchvision reads CIFAR), which keeps array bytes intact.

    Args:
        path: the pickle file.
        where: the dataset spec, for messages.

    Raises:
        DatasetError: the file is missing, is not such a pickle, or names a global outside the allow-list
            (then nothing from it was called).
    """
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()
    except FileNotFoundError as exc:
        raise DatasetError(f"{where}: missing {path}", "restore the file from the dataset's archive") from exc
    except RefusedGlobal as exc:
        raise DatasetError(
            f"{where}: {path} is a pickle that calls {exc}, which a dataset file never needs: refused "
            "without running it (only numpy arrays, lists, dicts, numbers and strings are read)",
            "replace the file with the one from the dataset's official archive",
        ) from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError, UnicodeDecodeError) as exc:  # fmt: skip
        raise DatasetError(
            f"{where}: cannot read the pickle {path} ({type(exc).__name__}: {exc})",
            "replace the file with the one from the dataset's official archive",
        ) from exc
