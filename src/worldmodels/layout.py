"""Where every stage reads and writes inside a run dir (see DESIGN.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from worldmodels.errors import UserError


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def episodes(self) -> Path:
        return self.root / "data" / "episodes"

    @property
    def vae(self) -> Path:
        return self.root / "vae"

    @property
    def latents(self) -> Path:
        return self.root / "latents"

    @property
    def mdnrnn(self) -> Path:
        return self.root / "mdnrnn"

    @property
    def dream(self) -> Path:
        return self.root / "dream"

    @property
    def controller(self) -> Path:
        return self.root / "controller"

    @property
    def eval(self) -> Path:
        return self.root / "eval"


def writable_dir(path: Path) -> Path:
    """Create `path` (and parents) or fail with one line that says why."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"cannot write to {path}: {err.strerror or err}: choose another --run-dir"
        ) from None
    return path
