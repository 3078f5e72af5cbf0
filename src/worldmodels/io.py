"""Atomic file writes: a reader (or a rerun after `kill -9`) never sees half a file."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """Write to a temp file beside `path`, fsync, then rename over it.

    The temp name ends in `.tmp` so a stage that starts after a crash can sweep leftovers.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path) as handle:
        handle.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_link(source: Path, target: Path) -> None:
    """`target` becomes `source`'s content in one step: a hard link (nothing copied twice), or a
    copy where the disk refuses links. The temp name is the one `remove_temp_files` sweeps."""
    temp = Path(target).with_name(f".{Path(target).name}.link{TMP_SUFFIX}")
    temp.unlink(missing_ok=True)
    try:
        os.link(source, temp)
    except OSError:
        shutil.copy2(source, temp)
    os.replace(temp, target)


def remove_temp_files(folder: Path, below: bool = False) -> list[Path]:
    """Delete `*.tmp` leftovers of writes that were killed half-way; return what was removed.

    `below`: in every folder under `folder` too (not through symlinks: a linked folder belongs
    to another run dir, whose writer sweeps it)."""
    folder = Path(folder)
    if not folder.exists():
        return []
    pattern = f".*{TMP_SUFFIX}"
    folders = [Path(f) for f, _, _ in os.walk(folder)] if below else [folder]
    removed = sorted(path for f in folders for path in f.glob(pattern))
    for path in removed:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return removed
