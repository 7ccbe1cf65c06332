"""Every file the pipeline writes goes to a temporary name beside its target and is renamed
into place, so a failure half-way (a full disk, a kill) leaves the last good file whole.

`os.replace` within one folder is atomic on POSIX and Windows: a reader sees the old file
or the new one, never a part. The temporary name starts with a dot and ends in `.tmp`; it is
removed when the write fails. The standard library and numpy, torch and matplotlib have no
such writer of their own (Lightning's checkpoints already do this through fsspec), hence
these few lines.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path in `path`'s folder; renamed onto `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # on disk before the rename makes it the file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, data: Any, indent: int = 1) -> Path:
    return write_text(path, json.dumps(data, indent=indent) + "\n")


def write_csv(path: str | Path, columns: Iterable[str], rows: Iterable[dict]) -> Path:
    """A header of `columns`, then one line per row (missing values empty, extra keys dropped)."""
    columns = list(columns)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in columns})
    return Path(path)


def save_npz(path: str | Path, **arrays) -> Path:
    import numpy as np

    with atomic_path(path) as tmp, tmp.open("wb") as f:  # a file object: no ".npz" appended
        np.savez_compressed(f, **arrays)
    return Path(path)


def save_torch(obj: Any, path: str | Path) -> Path:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_figure(fig, path: str | Path, **kwargs) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs)
    return path


def copy_file(source: str | Path, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)
    return Path(path)
