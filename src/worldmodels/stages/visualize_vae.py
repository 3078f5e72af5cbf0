"""`worldmodels visualize-vae`: look at what V learned, on frames it never trained on.

* `reconstructions.png`: held-out frames (row 1), their reconstructions from the posterior mean
  (row 2), and frames decoded from prior samples z ~ N(0, I) (row 3). Sharp row-2 images mean a
  good autoencoder; road-like row-3 images mean the latent space is usable for dreaming.
* `traversal.png`: one held-out frame, re-decoded while one latent dim at a time sweeps from
  -2 to +2 standard deviations around its value (the spread of that dim over held-out frames),
  for the dims the decoder uses most (the sweep that changes the picture most). The middle
  column is the unchanged reconstruction; each row is labelled with its dim and mean KL.

Both are upscaled (nearest neighbour, `--scale`) so a person can see the 64x64 pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import imageio.v3 as iio
import numpy as np
import torch

from worldmodels.artifacts import load_vae
from worldmodels.config import option
from worldmodels.data import load_episode, open_episodes, split_by_episode
from worldmodels.data.dataset import VAE_VAL_FRACTION, saved_val_fraction
from worldmodels.errors import UserError
from worldmodels.io import atomic_write_bytes
from worldmodels.layout import RunDir
from worldmodels.models import ConvVAE, frames_to_tensor
from worldmodels.progress import log

FRAME = 64
GAP = 2  # pixels between tiles, before upscaling
LABEL_WIDTH = 40  # left margin for row labels, before upscaling
GAP_COLOUR = 32
MAX_HELD_OUT_FRAMES = 512  # enough to rank latent dims; bounds memory on big data sets


@dataclass
class VisualizeVAEConfig:
    run_dir: Path = option(Path("runs/default"), "run directory with a trained <run-dir>/vae")
    columns: int = option(8, "frames per row in reconstructions.png")
    dims: int = option(6, "latent dims to traverse (the most used ones)")
    steps: int = option(7, "values per traversed dim, from -2 to +2 sigma (odd: centre = frame)")
    scale: int = option(2, "upscale factor of the written images")
    seed: int = option(0, "seed of the prior samples and of which held-out frames are shown")

    def validate(self) -> None:
        for name in ("columns", "dims", "steps", "scale"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")


def held_out_frames(run_dir: Path, limit: int = MAX_HELD_OUT_FRAMES) -> np.ndarray:
    """Frames of the episodes train-vae held out (the same split), at most `limit` of them."""
    layout = RunDir(run_dir)
    entries = open_episodes(layout.episodes)
    val_fraction = saved_val_fraction(layout.vae / "config.json", VAE_VAL_FRACTION)
    train, val = split_by_episode(entries, val_fraction)
    frames, total = [], 0
    for entry in val or train:  # no held-out episodes: show training frames rather than nothing
        frames.append(load_episode(layout.episodes / entry.file).obs)
        total += len(frames[-1])
        if total >= limit:
            break
    return np.concatenate(frames)[:limit]


def to_images(x: torch.Tensor) -> np.ndarray:
    """float (N, 3, 64, 64) in [0, 1] -> uint8 (N, 64, 64, 3)."""
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def tile(rows: list[np.ndarray]) -> np.ndarray:
    """Rows of uint8 (C, 64, 64, 3) images -> one image with gaps and a left label margin."""
    cols = max(len(r) for r in rows)
    height = len(rows) * FRAME + (len(rows) + 1) * GAP
    width = LABEL_WIDTH + cols * FRAME + (cols + 1) * GAP
    canvas = np.full((height, width, 3), GAP_COLOUR, np.uint8)
    for i, row in enumerate(rows):
        top = GAP + i * (FRAME + GAP)
        for j, image in enumerate(row):
            left = LABEL_WIDTH + GAP + j * (FRAME + GAP)
            canvas[top : top + FRAME, left : left + FRAME] = image
    return canvas


def upscale_with_labels(canvas: np.ndarray, labels: list[list[str]], scale: int) -> np.ndarray:
    """Nearest-neighbour upscale, then write each row's label lines in the left margin."""
    big = np.ascontiguousarray(canvas.repeat(scale, axis=0).repeat(scale, axis=1))
    font_scale = 0.3 * scale
    for i, lines in enumerate(labels):
        top = (GAP + i * (FRAME + GAP)) * scale
        for k, text in enumerate(lines):
            y = top + int((14 + 12 * k) * scale)
            cv2.putText(
                big, text, (3 * scale, y), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255)
            )
    return big


def write_png(path: Path, image: np.ndarray) -> None:
    atomic_write_bytes(path, iio.imwrite("<bytes>", image, extension=".png"))


@torch.no_grad()
def reconstruction_grid(
    vae: ConvVAE, frames: np.ndarray, columns: int, scale: int, generator: torch.Generator
) -> np.ndarray:
    picks = np.sort(torch.randperm(len(frames), generator=generator)[:columns].numpy())
    shown = frames[picks]
    mu, _ = vae.encode(frames_to_tensor(shown))
    recon = to_images(vae.decode(mu))
    prior = to_images(vae.decode(torch.randn(columns, vae.z_dim, generator=generator)))
    canvas = tile([shown, recon, prior])
    return upscale_with_labels(canvas, [["original"], ["recon"], ["prior", "sample"]], scale)


@torch.no_grad()
def most_used_dims(
    vae: ConvVAE, mu: torch.Tensor, logvar: torch.Tensor, k: int
) -> list[tuple[int, float]]:
    """(dim, mean KL) of the `k` dims whose +-2 sigma sweep changes the decoded frames most.

    KL alone is no guide to which dims matter: the free-bits floor keeps every dim near 0.5
    nat whether the decoder uses it or not. So each dim is swept on (up to) 64 frames and the
    mean absolute pixel change of the decoded images ranks it.
    """
    spread = mu.std(dim=0) if len(mu) > 1 else torch.ones(vae.z_dim)
    base = mu[:64]
    effect = []
    for dim in range(vae.z_dim):
        low, high = base.clone(), base.clone()
        low[:, dim] -= 2 * spread[dim]
        high[:, dim] += 2 * spread[dim]
        effect.append((vae.decode(high) - vae.decode(low)).abs().mean())
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).mean(dim=0)
    order = torch.argsort(torch.stack(effect), descending=True)[:k]
    return [(int(d), float(kl[d])) for d in order]


@torch.no_grad()
def traversal_grid(
    vae: ConvVAE, frames: np.ndarray, frame_index: int, dims: int, steps: int, scale: int
) -> np.ndarray:
    mu, logvar = vae.encode(frames_to_tensor(frames))
    spread = mu.std(dim=0) if len(frames) > 1 else torch.ones(vae.z_dim)
    offsets = torch.linspace(-2.0, 2.0, steps)
    rows, labels = [], []
    for dim, kl in most_used_dims(vae, mu, logvar, min(dims, vae.z_dim)):
        z = mu[frame_index].repeat(steps, 1)
        z[:, dim] += offsets * spread[dim]
        rows.append(to_images(vae.decode(z)))
        labels.append([f"z{dim}", f"KL {kl:.2f}"])
    return upscale_with_labels(tile(rows), labels, scale)


def run(cfg: VisualizeVAEConfig) -> Path:
    """Write reconstructions.png and traversal.png into `<run>/vae`; return that folder."""
    cfg.validate()
    vae = load_vae(cfg.run_dir)
    frames = held_out_frames(cfg.run_dir)
    generator = torch.Generator().manual_seed(cfg.seed)
    out = RunDir(cfg.run_dir).vae
    write_png(
        out / "reconstructions.png",
        reconstruction_grid(vae, frames, min(cfg.columns, len(frames)), cfg.scale, generator),
    )
    frame_index = int(torch.randint(len(frames), (1,), generator=generator))
    write_png(
        out / "traversal.png",
        traversal_grid(vae, frames, frame_index, cfg.dims, cfg.steps, cfg.scale),
    )
    log(
        f"visualize-vae: wrote {out / 'reconstructions.png'} and {out / 'traversal.png'} "
        f"({len(frames)} held-out frames)"
    )
    return out
