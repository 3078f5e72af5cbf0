"""Pictures people would rather look at than read: GIFs and frame strips."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from worldmodels.io import atomic_write_bytes


def upscale(frame: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscale of an (H,W,3) frame, so 64-pixel frames are visible."""
    return frame.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else frame


def save_gif(path: Path, frames: Sequence[np.ndarray], fps: int = 25, scale: int = 1) -> Path:
    """Write an animated GIF atomically (looping forever)."""
    import imageio.v3 as iio

    images = [upscale(np.asarray(f, dtype=np.uint8), scale) for f in frames]
    buffer = io.BytesIO()
    iio.imwrite(buffer, np.stack(images), extension=".gif", duration=1000 / fps, loop=0)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)
