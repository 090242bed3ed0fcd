"""Atomic file output: write under a temporary name in the target folder, then rename.

A killed process or a full disk therefore never leaves a truncated file under the final name, and an existing file
is replaced only once its successor is complete. Formats that write several files (MetaImage ``.mhd`` + ``.raw``)
are written into a temporary folder under their final names, so the header references the right data file, and
then moved into place data first, header last.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import PathLike


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path with the same file name as ``path``; on success move it (and siblings) into place.

    The writer may create further files next to the yielded path (e.g. a ``.raw`` beside a ``.mhd``); they are
    moved too, before the file named ``path``. On an exception nothing is moved and the temporary folder is removed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging / target.name
        produced = sorted(staging.iterdir(), key=lambda p: p.name == target.name)  # the named file last
        if not any(p.name == target.name for p in produced):
            raise FileNotFoundError(f"{target}: the writer produced no file")
        for item in produced:
            os.replace(item, target.parent / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
