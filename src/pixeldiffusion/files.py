"""Writing files so that a reader never sees half of one: write a temporary file beside the
target, flush it to disk, then rename it into place (a rename within one directory is atomic on
POSIX and Windows). An error or a kill mid-write leaves the old file, or none, never a torn one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_path_of(path: Path) -> Path:
    """The hidden temporary name a write of ``path`` goes through: ``.NAME.tmp`` beside it."""
    return path.with_name(f".{path.name}.tmp")


@contextmanager
def atomic_write(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed.

        with atomic_write(out / "samples.npz") as tmp:
            np.savez(tmp, images=images)   # any writer that takes a path

    The parent directory is created. With ``fsync`` the file's data reaches the disk before the
    rename, so a power cut cannot leave an empty file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_of(path)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through ``atomic_write``."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)
