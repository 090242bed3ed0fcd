"""Atomic file output: write under a temporary name in the target folder, then rename.

A killed process or a full disk therefore never leaves a truncated file under the final name, and an existing file
is replaced only once its successor is complete. Formats that write several files (MetaImage ``.mhd`` + ``.raw``)
are written into a temporary folder under their final names, so the header references the right data file, and
then moved into place data first, header last.

A write that fails with an OS or library error (a full disk surfaces as ``OSError`` ENOSPC, or as a library's
``RuntimeError`` that names only the temporary file) raises :class:`WriteError`, which names the destination and says
that the disk may be full; the original error is chained. A ``.gz`` file is read to its end before it is moved into
place, because ITK's NIfTI writer silently leaves a truncated ``.nii.gz`` on a full disk. A killed process leaves its
hidden temporary folder (``.<name>.*.partial``) behind, never a file under the final name; the next process to take
the run folder's lock removes such folders (:meth:`SFRSegmentLib.storage.runfolder.RunFolder.exclusive`).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..base.errors import PathLike


class WriteError(OSError, RuntimeError):
    """Writing a file failed: nothing was written under its name and a file already there is unchanged.

    It replaces the writer's ``OSError`` or ``RuntimeError`` (what torch and ITK raise when a write fails), and is
    both, so that handlers of either still catch it.
    """


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path with the same file name as ``path``; on success move it (and siblings) into place.

    The writer may create further files next to the yielded path (e.g. a ``.raw`` beside a ``.mhd``); they are
    moved too, before the file named ``path``. On an exception nothing is moved and the temporary folder is removed;
    an OS or library error of the writer becomes a :class:`WriteError` naming ``path``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        try:
            yield staging / target.name
            _check_gzip_complete(staging / target.name)
        except (OSError, RuntimeError) as error:
            raise WriteError(f"{target}: could not write the file; the disk may be full (free some space and rerun; "
                             f"a previous version of the file is unchanged). Cause: {type(error).__name__}: "
                             f"{error}") from error
        produced = sorted(staging.iterdir(), key=lambda p: p.name == target.name)  # the named file last
        if not any(p.name == target.name for p in produced):
            raise FileNotFoundError(f"{target}: the writer produced no file")
        for item in produced:
            os.replace(item, target.parent / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_gzip_complete(path: Path) -> None:
    """Raise OSError when ``path`` is a ``.gz`` file whose stream ends early. ITK's NIfTI writer reports no error
    when a write fails (a full disk) and leaves exactly such a file; reading it to the end is the one way to tell."""
    if not (path.name.endswith(".gz") and path.is_file()):
        return
    try:
        with gzip.open(path) as stream:
            while stream.read(1 << 20):
                pass
    except EOFError as error:
        raise OSError(f"the compressed file ends early ({error}), although its writer reported no error") from error


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
