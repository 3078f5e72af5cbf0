"""`worldmodels visualize-vae`: look at what V learned, on frames it never trained on.

* `reconstructions.png`: held-out frames (row 1), their reconstructions from the posterior mean
  (row 2), and frames decoded from prior samples z ~ N(0, I) (row 3). Sharp row-2 images mean a
  good autoencoder; road-like row-3 images mean the latent space is usable for dreaming. The
  frames come from different episodes and, where there are such, show the car on the road:
  exploration data is mostly grass, and grass is not what V is for.
* `traversal.png`: one held-out frame of the car on the road, re-decoded while one latent dim
  at a time sweeps from -3 to +3 around its value in the prior's units (z ~ N(0, I) is what M
  dreams in; a dim's spread over real frames is well under 1, too little to see a change), for
  the dims the decoder uses most (the sweep that changes the picture most). The middle
  column is the unchanged reconstruction; each row is labelled with its dim and mean KL.

Both are upscaled (nearest neighbour, `--scale`) so a person can see the 64x64 pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from worldmodels.artifacts import load_vae
from worldmodels.config import Config, option
from worldmodels.data import load_episode, open_episodes, split_by_episode
from worldmodels.data.dataset import VAE_VAL_FRACTION, saved_val_fraction
from worldmodels.layout import RunDir
from worldmodels.models import ConvVAE, frames_to_tensor
from worldmodels.progress import log
from worldmodels.viz import save_png

FRAME = 64
GAP = 2  # pixels between tiles, before upscaling
LABEL_WIDTH = 40  # left margin for row labels, before upscaling
GAP_COLOUR = 32
MAX_HELD_OUT_FRAMES = 512  # enough to rank latent dims; bounds memory on big data sets
MAX_SHOWN_EPISODES = 32  # frames come from this many episodes at most: each is read whole
ZOOM_STEPS = 50  # CarRacing zooms in over its first second: those frames are skipped if possible
CAR_WINDOW = (slice(46, 61), slice(26, 38))  # around the car, which sits still in every frame
ON_ROAD = 0.5  # share of grey road pixels around the car for "on the road"
SWEEP = 3.0  # a traversed dim moves this far either way, in the prior's units


@dataclass
class VisualizeVAEConfig(Config):
    run_dir: Path = option(Path("runs/default"), "run directory with a trained <run-dir>/vae")
    columns: int = option(8, "frames per row in reconstructions.png", low=1)
    dims: int = option(6, "latent dims to traverse (the most used ones)", low=1)
    steps: int = option(7, "values per traversed dim, from -3 to +3 (odd: centre = frame)", low=1)
    scale: int = option(2, "upscale factor of the written images", low=1)
    seed: int = option(0, "seed of the prior samples and of which held-out frames are shown")


def held_out_frames(
    run_dir: Path, limit: int = MAX_HELD_OUT_FRAMES
) -> tuple[np.ndarray, np.ndarray]:
    """At most `limit` frames, evenly spaced over the episodes train-vae held out (the same
    split; at most MAX_SHOWN_EPISODES of them, spread evenly), and the episode each came from."""
    layout = RunDir(run_dir)
    entries = open_episodes(layout.episodes)
    val_fraction = saved_val_fraction(layout.vae / "config.json", VAE_VAL_FRACTION)
    train, val = split_by_episode(entries, val_fraction)
    pool = val or train  # no held-out episodes: training frames rather than nothing
    count = min(len(pool), MAX_SHOWN_EPISODES, limit)
    shown = [pool[i] for i in np.linspace(0, len(pool) - 1, count).round().astype(int)]
    per_episode = max(1, limit // len(shown))
    frames, episodes = [], []
    for k, entry in enumerate(shown):
        obs = load_episode(layout.episodes / entry.file).obs
        first = ZOOM_STEPS if len(obs) > 2 * ZOOM_STEPS else 0
        picks = np.unique(np.linspace(first, len(obs) - 1, per_episode).round().astype(int))
        frames.append(obs[picks])
        episodes.append(np.full(len(picks), k))
    return np.concatenate(frames)[:limit], np.concatenate(episodes)[:limit]


def road_around_car(frames: np.ndarray) -> np.ndarray:
    """Per frame, the share of grey road pixels around the car (road is grey, grass green)."""
    window = frames[:, CAR_WINDOW[0], CAR_WINDOW[1]].astype(np.int16)
    r, g, b = window[..., 0], window[..., 1], window[..., 2]
    grey = (abs(r - g) < 12) & (abs(g - b) < 12) & (r > 70) & (r < 140)
    return grey.mean(axis=(1, 2))


def pick_frames(
    frames: np.ndarray, episodes: np.ndarray, count: int, generator: torch.Generator
) -> np.ndarray:
    """Indices of `count` frames, the car on the road where possible, each from another
    episode while episodes last; random otherwise."""
    order = torch.randperm(len(frames), generator=generator).numpy()
    on_road = road_around_car(frames[order]) >= ON_ROAD
    order = np.concatenate([order[on_road], order[~on_road]])  # road first, random within
    picked, seen = [], set()
    for index in order:  # first pass: one per episode
        if episodes[index] not in seen:
            picked.append(index)
            seen.add(episodes[index])
    taken = set(picked)
    picked += [i for i in order if i not in taken]
    return np.sort(np.asarray(picked[:count], dtype=int))


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


@torch.no_grad()
def reconstruction_grid(
    vae: ConvVAE, frames: np.ndarray, picks: np.ndarray, scale: int, generator: torch.Generator
) -> np.ndarray:
    columns = len(picks)
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
    """(dim, mean KL) of the `k` dims whose +-SWEEP sweep changes the decoded frames most.

    KL alone is no guide to which dims matter: the free-bits floor keeps every dim near 0.5
    nat whether the decoder uses it or not. So each dim is swept on (up to) 64 frames and the
    mean absolute pixel change of the decoded images ranks it.
    """
    base = mu[:: max(1, len(mu) // 64)][:64]
    effect = []
    for dim in range(vae.z_dim):
        low, high = base.clone(), base.clone()
        low[:, dim] -= SWEEP
        high[:, dim] += SWEEP
        effect.append((vae.decode(high) - vae.decode(low)).abs().mean())
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).mean(dim=0)
    order = torch.argsort(torch.stack(effect), descending=True)[:k]
    return [(int(d), float(kl[d])) for d in order]


@torch.no_grad()
def traversal_grid(
    vae: ConvVAE, frames: np.ndarray, frame_index: int, dims: int, steps: int, scale: int
) -> np.ndarray:
    mu, logvar = vae.encode(frames_to_tensor(frames))
    offsets = torch.linspace(-SWEEP, SWEEP, steps)
    rows, labels = [], []
    for dim, kl in most_used_dims(vae, mu, logvar, min(dims, vae.z_dim)):
        z = mu[frame_index].repeat(steps, 1)
        z[:, dim] += offsets
        rows.append(to_images(vae.decode(z)))
        labels.append([f"z{dim}", f"KL {kl:.2f}"])
    return upscale_with_labels(tile(rows), labels, scale)


def run(cfg: VisualizeVAEConfig) -> Path:
    """Write reconstructions.png and traversal.png into `<run>/vae`; return that folder."""
    cfg.validate()
    vae = load_vae(cfg.run_dir)
    frames, episodes = held_out_frames(cfg.run_dir)
    generator = torch.Generator().manual_seed(cfg.seed)
    out = RunDir(cfg.run_dir).vae
    picks = pick_frames(frames, episodes, min(cfg.columns, len(frames)), generator)
    save_png(
        out / "reconstructions.png", reconstruction_grid(vae, frames, picks, cfg.scale, generator)
    )
    frame_index = int(pick_frames(frames, episodes, 1, generator)[0])
    save_png(
        out / "traversal.png",
        traversal_grid(vae, frames, frame_index, cfg.dims, cfg.steps, cfg.scale),
    )
    log(
        f"visualize-vae: wrote {out / 'reconstructions.png'} and {out / 'traversal.png'} "
        f"({len(frames)} held-out frames of {len(set(episodes.tolist()))} episodes)"
    )
    return out
