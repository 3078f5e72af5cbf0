"""Pictures people would rather look at than read: the one place GIFs, PNGs and plots are
written (atomically: a kill never leaves half a picture)."""

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


def save_png(path: Path, image: np.ndarray) -> Path:
    """Write an (H,W,3) uint8 image as a PNG atomically."""
    import imageio.v3 as iio

    atomic_write_bytes(Path(path), iio.imwrite("<bytes>", image, extension=".png"))
    return Path(path)


def new_figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (6, 3.5)):
    """A matplotlib figure and its axes, drawn off-screen (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=size)


def save_figure(fig, path: Path, dpi: int = 90) -> Path:
    """Write a figure as a PNG atomically and free it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def plot_metrics(ax, rows: list[dict], x: str, keys: list[str], title: str) -> None:
    """One line per metric of a training log (rows of metrics.jsonl) against `x`."""
    ax.set_title(title)
    for key in keys:
        points = [(r[x], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), marker="o", label=key)
    ax.set_xlabel(x)
    if rows:
        ax.legend(fontsize=8)


def plot_search(ax, rows: list[dict], kept: int | None) -> None:
    """A CMA-ES log: best and mean fitness per generation, the held-out checks of the mean
    with the one the final selection kept starred, and σ on a second axis."""
    if not rows:
        return
    gens = [r["generation"] for r in rows]
    ax.plot(gens, [r["best"] for r in rows], label="best candidate")
    ax.plot(gens, [r["mean"] for r in rows], label="population mean")
    checks = {r["generation"]: r["check_mean"] for r in rows if "check_mean" in r}
    if checks:
        ax.plot(list(checks), list(checks.values()), "o-", label="CMA-ES mean, held-out tracks")
    if kept in checks:
        ax.plot([kept], [checks[kept]], "*", markersize=16, label="kept (final selection)")
    ax.set_xlabel("generation")
    ax.set_title("C: CMA-ES returns")
    ax.legend(fontsize=8)
    twin = ax.twinx()
    twin.plot(gens, [r["sigma"] for r in rows], color="grey", alpha=0.4)
    twin.set_ylabel("σ", color="grey")
