"""Which files can run code when they are loaded: the one list that loading, checkpointing and publishing share.

Unpickling executes whatever the file tells it to, and `torch.save` (`.pt`, `.pth`, `pytorch_model.bin`), joblib and
Lightning's `.ckpt` are pickles underneath. NumPy's `.npy`/`.npz` count too: they carry pickles when they store
object arrays, and although `numpy.load` refuses those unless asked (`allow_pickle=True`), nothing this project writes
is ever a NumPy file, so one beside our files has no reason to be loaded or published.

Files with these suffixes are only ever named (in an error saying why a folder is refused), never opened. The module
imports only the standard library: checkpointing uses it without depending on the model-loading code, and the Space
that `push_to_hub.py` stages from app.py's imports (app.py -> loading.py -> here) gains no requirement.
"""

from __future__ import annotations

import os
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib", ".npy", ".npz")


def is_pickle_based(path: str | os.PathLike) -> bool:
    """Whether the file's suffix (in any case) is one whose format can run code when loaded."""
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def pickle_files(folder: str | os.PathLike) -> list[str]:
    """Names of the pickle-based files directly in `folder`, sorted."""
    return sorted(item.name for item in Path(folder).iterdir() if is_pickle_based(item))


__all__ = ["PICKLE_SUFFIXES", "is_pickle_based", "pickle_files"]
