"""Latents files: one encoded episode per file (V's posterior per frame, plus the transitions),
listed in a manifest with checksums like the episodes themselves. encode writes them;
train-mdnrnn (through the batches below) and dream read them."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worldmodels.data.dataset import prefetch
from worldmodels.data.episodes import read_record, sha256_bytes
from worldmodels.data.manifest import ManifestEntry, read_manifest, validate_entries
from worldmodels.errors import MissingStageError, UserError
from worldmodels.io import atomic_write_bytes, atomic_write_text

VAE_SOURCE = "vae.json"  # which VAE weights (sha256) the latents in a folder came from
MAX_STARTS = 1000  # dream starts: plenty of variety, and a 10k-episode run is not read whole


@dataclass
class LatentEpisode:
    """One encoded episode: (T+1) posteriors for the T+1 frames, and the T transitions."""

    mu: np.ndarray  # (T+1, Z) float32
    logvar: np.ndarray  # (T+1, Z) float32
    actions: np.ndarray  # (T, 3) float32
    rewards: np.ndarray  # (T,) float32
    terminated: bool
    truncated: bool
    seed: int

    @property
    def steps(self) -> int:
        return len(self.actions)


# --- the latents files ------------------------------------------------------------------------


def latents_source(folder: Path) -> str:
    """The sha256 of the VAE weights the latents in `folder` came from ("" if unknown)."""
    try:
        return str(json.loads((folder / VAE_SOURCE).read_text()).get("vae_sha256", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def record_latents_source(folder: Path, vae_sha256: str) -> None:
    atomic_write_text(folder / VAE_SOURCE, json.dumps({"vae_sha256": vae_sha256}) + "\n")


def write_latents(path: Path, ep: LatentEpisode) -> str:
    """Write one latents file atomically (uncompressed: floats barely compress); return sha256."""
    buffer = io.BytesIO()
    np.savez(
        buffer,
        mu=ep.mu.astype(np.float32),
        logvar=ep.logvar.astype(np.float32),
        actions=ep.actions.astype(np.float32),
        rewards=ep.rewards.astype(np.float32),
        terminated=np.bool_(ep.terminated),
        truncated=np.bool_(ep.truncated),
        seed=np.int64(ep.seed),
    )
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def load_latents(path: Path) -> LatentEpisode:
    """Load one latents file; a damaged one is a `UserError` that says how to repair it."""
    try:
        ep = read_record(path, LatentEpisode)
    except Exception as err:
        raise UserError(f"{path} is unreadable ({err}): rerun `worldmodels encode`") from None
    if ep.mu.shape != ep.logvar.shape or len(ep.mu) != ep.steps + 1:
        raise UserError(f"{path} has inconsistent shapes: rerun `worldmodels encode`")
    return ep


def open_latents(folder: Path, limit: int | None = None) -> list[ManifestEntry]:
    """The verified latents of a run (with `limit`, that many spread evenly over them: only
    those are checked); missing or damaged ones say to run `encode`."""
    entries = read_manifest(folder)
    if not entries:
        raise MissingStageError(f"encoded latents in {folder}", "encode")
    if limit is not None and len(entries) > limit:
        entries = [entries[i] for i in np.linspace(0, len(entries) - 1, limit).astype(int)]
    valid, problems = validate_entries(folder, entries)
    if problems:
        raise UserError(
            f"{len(problems)} invalid latents file(s) in {folder} (first: {problems[0]}): "
            "rerun `worldmodels encode` to redo them"
        )
    return valid


def first_latents(folder: Path, limit: int = MAX_STARTS) -> np.ndarray:
    """The latent (mu) of the first frame of (at most `limit`) encoded episodes (N, Z): where
    real episodes start, so dreams that start there begin where the controller will."""
    return np.stack([load_latents(folder / e.file).mu[0] for e in open_latents(folder, limit)])


# --- M's batches: whole episodes, padded, cut into truncated-BPTT windows ------------------


@dataclass
class EpisodeBatch:
    """B episodes padded to the longest: inputs at t, targets for t+1, mask of real steps."""

    z: torch.Tensor  # (B, T+1, Z) sampled latents
    actions: torch.Tensor  # (B, T, A)
    rewards: torch.Tensor  # (B, T)
    done: torch.Tensor  # (B, T) 1 at the last step of a terminated episode
    mask: torch.Tensor  # (B, T) True where the step exists

    @property
    def steps(self) -> int:
        return self.actions.shape[1]


def done_targets(ep: LatentEpisode) -> np.ndarray:
    """1 at the last step only if the episode terminated; truncation is not an episode end."""
    done = np.zeros(ep.steps, np.float32)
    done[-1] = float(ep.terminated)
    return done


def make_batch(episodes: Sequence[LatentEpisode], rng: np.random.Generator) -> EpisodeBatch:
    """Sample z ~ N(μ, σ²) per frame and pad the episodes into one batch."""
    b, t = len(episodes), max(ep.steps for ep in episodes)
    z_dim, a_dim = episodes[0].mu.shape[1], episodes[0].actions.shape[1]
    z = np.zeros((b, t + 1, z_dim), np.float32)
    actions = np.zeros((b, t, a_dim), np.float32)
    rewards = np.zeros((b, t), np.float32)
    done = np.zeros((b, t), np.float32)
    mask = np.zeros((b, t), bool)
    for i, ep in enumerate(episodes):
        n = ep.steps
        noise = rng.standard_normal(ep.mu.shape, dtype=np.float32)
        z[i, : n + 1] = ep.mu + np.exp(0.5 * ep.logvar) * noise
        actions[i, :n], rewards[i, :n], done[i, :n] = ep.actions, ep.rewards, done_targets(ep)
        mask[i, :n] = True
    tensors = (torch.from_numpy(x) for x in (z, actions, rewards, done, mask))
    return EpisodeBatch(*tensors)


def iterate_batches(
    folder: Path,
    entries: Sequence[ManifestEntry],
    batch_size: int,
    rng: np.random.Generator,
    shuffle: bool,
) -> Iterator[EpisodeBatch]:
    """Batches of episodes streamed from disk, the next one loaded in the background."""
    order = rng.permutation(len(entries)) if shuffle else np.arange(len(entries))

    def produce() -> Iterator[EpisodeBatch]:
        for start in range(0, len(order), batch_size):
            group = [entries[i] for i in order[start : start + batch_size]]
            yield make_batch([load_latents(Path(folder) / e.file) for e in group], rng)

    return prefetch(produce(), depth=1)


def chunks(batch: EpisodeBatch, seq_len: int, device) -> Iterator[tuple[torch.Tensor, ...]]:
    """Consecutive (z_t, a_t, z_{t+1}, r_t, done_t, mask_t) windows of `seq_len` steps."""
    for s in range(0, batch.steps, seq_len):
        e = min(s + seq_len, batch.steps)
        yield tuple(
            x.to(device, non_blocking=True)
            for x in (
                batch.z[:, s:e],
                batch.actions[:, s:e],
                batch.z[:, s + 1 : e + 1],
                batch.rewards[:, s:e],
                batch.done[:, s:e],
                batch.mask[:, s:e],
            )
        )
