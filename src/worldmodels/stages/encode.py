"""`worldmodels encode`: every collected episode → its VAE posterior (μ, log σ²) per frame.

One latents file per episode (`<run>/latents/episode_XXXXXX.npz`, same index as the episode),
written atomically and listed in a manifest with its checksum, exactly like the episodes
themselves: a rerun keeps the verified files and redoes only missing or damaged ones. Memory is
bounded by one episode (plus one prefetched): frames go through the VAE `batch_size` at a time.

We store (μ, log σ²) rather than a sampled z so that train-mdnrnn can draw a fresh z ~ N(μ, σ²)
every epoch (the paper's trick against overfitting M to one fixed sample per frame).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worldmodels.artifacts import load_vae
from worldmodels.checkpoint import read_model_meta
from worldmodels.config import Config, option, save_config
from worldmodels.data import Episode, iterate_episodes, open_episodes
from worldmodels.data.latents import (
    LatentEpisode,
    latents_source,
    record_latents_source,
    write_latents,
)
from worldmodels.data.manifest import (
    ManifestEntry,
    append_manifest,
    read_manifest,
    rewrite_manifest,
    validate_entries,
)
from worldmodels.io import remove_temp_files
from worldmodels.layout import RunDir, writable_dir
from worldmodels.models import ConvVAE, frames_to_tensor
from worldmodels.progress import log, progress_bar
from worldmodels.runtime import pick_device


@dataclass
class EncodeConfig(Config):
    run_dir: Path = option(Path("runs/default"), "run directory; latents go to <run-dir>/latents")
    batch_size: int = option(1000, "frames per VAE forward pass", low=1)
    device: str = option("auto", "torch device: auto (cuda if available), cpu or cuda")
    force: bool = option(False, "re-encode every episode, even those already encoded")


# --- encoding ---------------------------------------------------------------------------------


@torch.inference_mode()
def encode_frames(
    vae: ConvVAE, frames: np.ndarray, batch_size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 frames (N,64,64,3) → (μ, log σ²), each float32 (N, Z), `batch_size` frames a pass."""
    mus, logvars = [], []
    for start in range(0, len(frames), batch_size):
        mu, logvar = vae.encode(frames_to_tensor(frames[start : start + batch_size], device))
        mus.append(mu.float().cpu().numpy())
        logvars.append(logvar.float().cpu().numpy())
    return np.concatenate(mus), np.concatenate(logvars)


def _sweep(folder: Path, episodes: dict[int, ManifestEntry], vae_sha: str) -> set[int]:
    """Keep the latents that are verified, still match their episode and this VAE; delete the
    rest. Returns the episode indices that are already done."""
    for path in remove_temp_files(folder):
        log(f"encode: removed unfinished temp file {path.name}")
    same_vae = bool(vae_sha) and latents_source(folder) == vae_sha
    entries = read_manifest(folder) if same_vae else []
    if not same_vae and read_manifest(folder):
        log("encode: the VAE changed since these latents were made: re-encoding everything")
    valid, problems = validate_entries(folder, entries)
    for problem in problems:
        log(f"encode: invalid latents, will redo: {problem}")
    valid = [e for e in valid if e.index in episodes and episodes[e.index].seed == e.seed]
    keep = {e.file for e in valid}
    for path in folder.glob("episode_*.npz"):
        if path.name not in keep:
            path.unlink()
    rewrite_manifest(folder, valid)
    record_latents_source(folder, vae_sha)
    return {e.index for e in valid}


def _encode_episode(vae, ep: Episode, cfg: EncodeConfig, device) -> LatentEpisode:
    mu, logvar = encode_frames(vae, ep.obs, cfg.batch_size, device)
    return LatentEpisode(
        mu=mu,
        logvar=logvar,
        actions=ep.actions,
        rewards=ep.rewards,
        terminated=ep.terminated,
        truncated=ep.truncated,
        seed=ep.seed,
    )


def run(cfg: EncodeConfig) -> Path:
    """Encode every valid episode that has no valid latents file yet; return the latents folder."""
    cfg.validate()
    layout = RunDir(cfg.run_dir)
    episodes = open_episodes(layout.episodes)  # says "run collect first" when there are none
    vae_sha = read_model_meta(layout.vae, "train-vae").get("sha256", "")
    vae = load_vae(cfg.run_dir)
    folder = writable_dir(layout.latents)
    save_config(cfg, folder / "config.json")
    if cfg.force:
        rewrite_manifest(folder, [])
    done = _sweep(folder, {e.index: e for e in episodes}, vae_sha)
    todo = [e for e in episodes if e.index not in done]
    if not todo:
        log(f"encode: all {len(episodes)} episodes already encoded in {folder}, nothing to do")
        return folder
    log(f"encode: {len(done)} episodes already encoded, encoding {len(todo)}")

    device = pick_device(cfg.device)
    vae = vae.to(device)
    frames = sum(e.steps + 1 for e in todo)
    bar = progress_bar(frames, "encode", unit="img")
    started = time.perf_counter()
    try:
        for entry, ep in zip(todo, iterate_episodes(layout.episodes, todo)):
            digest = write_latents(folder / entry.file, _encode_episode(vae, ep, cfg, device))
            append_manifest(folder, dataclasses.replace(entry, sha256=digest))
            bar.update(ep.steps + 1)
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    log(
        f"encode: {len(todo)} episodes, {frames} frames in {elapsed:.1f}s ({frames / elapsed:.0f} img/s)"
    )
    return folder
