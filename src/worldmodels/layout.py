"""Where every stage reads and writes inside a run dir, and the lock that keeps it to one writer."""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from worldmodels.errors import UserError
from worldmodels.io import remove_temp_files


def _folder(*parts: str) -> property:
    """A read-only path below the run dir's root: one line per folder in `RunDir`."""
    return property(lambda self: self.root.joinpath(*parts))


@dataclass(frozen=True)
class RunDir:
    """The folders of a run dir, one per stage's outputs (recorded episodes below `data`)."""

    root: Path

    data = _folder("data")
    episodes = _folder("data", "episodes")
    vae = _folder("vae")
    latents = _folder("latents")
    mdnrnn = _folder("mdnrnn")
    dream = _folder("dream")
    controller = _folder("controller")
    eval = _folder("eval")

    def stage_folders(self) -> list[Path]:
        """The folders the stages write, each once (`episodes` lies below `data`)."""
        folders = [p.fget(self) for p in vars(type(self)).values() if isinstance(p, property)]
        return [folder for folder in folders if folder.parent == self.root]


def writable_dir(path: Path) -> Path:
    """Create `path` (and parents) or fail with one line that says why."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"cannot write to {path}: {err.strerror or err}: choose another --run-dir"
        ) from None
    return path


LOCK = ".lock"


@contextmanager
def run_lock(root: Path, command: str) -> Iterator[None]:
    """Hold the run dir's lock while `command` writes it: a second writer stops at once.

    An OS lock (flock) on `<root>/.lock`, not a pid file: the kernel drops it when its holder
    dies, however it dies, so a lock left by a killed process is simply taken over. The file
    names the holder for the message the next process prints, and goes when the holder is done.
    The new holder first deletes the temp files of writes a killed holder left half-done: the
    stages that are found done and skipped would otherwise never sweep them.
    """
    root = Path(root)
    created = not root.exists()
    writable_dir(root)
    path = root / LOCK
    handle = _acquire(path, root)
    try:
        handle.truncate(0)
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(json.dumps({"pid": os.getpid(), "command": command, "since": since}))
        handle.flush()
        _sweep_half_writes(root)
        yield
    finally:
        path.unlink(missing_ok=True)  # before the close: the next holder makes a fresh file
        handle.close()  # releases the flock
        if created and not any(root.iterdir()):
            root.rmdir()  # a command that wrote nothing leaves nothing behind


def _sweep_half_writes(root: Path) -> None:
    """Delete the temp files of a killed holder's half-done writes (no one else writes while
    we hold the lock): in the root and the stage folders only, never through symlinks, so a
    --run-dir pointed at a folder of other things has nothing else looked into, and a folder
    linked from another run dir is left to that run dir's writer."""
    remove_temp_files(root)
    for folder in RunDir(root).stage_folders():
        if not folder.is_symlink():
            remove_temp_files(folder, below=True)


def _acquire(path: Path, root: Path):
    """The open lock file, flocked; retried when the file we locked was just removed by its
    previous holder (then someone else may be locking the new one)."""
    while True:
        try:
            handle = open(path, "a+")  # noqa: SIM115 -- held open for the whole command
        except FileNotFoundError:  # a previous holder just removed the empty run dir
            root.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            try:
                holder = json.loads(handle.read() or "{}")
            except ValueError:
                holder = {}
            handle.close()
            raise UserError(
                f"{root} is in use by pid {holder.get('pid', '?')} (`worldmodels "
                f"{holder.get('command', '?')}` since {holder.get('since', '?')}): wait for it "
                "to finish or stop it; one command writes a run dir at a time"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                return handle
        except FileNotFoundError:
            pass
        handle.close()
