"""`worldmodels dream`: what M imagines, next to what really happened.

From a real start frame (its encoded μ), M is rolled forward with the episode's real actions
(or, with `--policy random`, smooth random ones) and every dreamed z is decoded by the VAE:
  <out>/dream.gif          real (left) and dream (right), side by side, upscaled;
  <out>/latent_error.png   mean squared distance between the dreamed z_t and the encoded real
                           μ_t over the horizon t, averaged over held-out episodes and several
                           dreams each (always with the real actions), against the "nothing
                           moves" baseline z_t = μ_0;
  <out>/latent_error.json  the plotted numbers.
The GIF has steps + 1 frames: the start frame, then one frame per step.

With `--agent PATH` (or `--pretrained`) no run dir is needed: the agent's controller drives
official tracks, and the dream follows from the same first frame with the actions it took, so
the GIF shows what the agent saw next to what its M imagined.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from worldmodels.artifacts import (
    DEFAULT_RUN_DIR,
    agent_root,
    load_acting_agent,
    load_mdnrnn,
    load_vae,
    results_dir,
)
from worldmodels.config import Config, option, save_config
from worldmodels.data import load_episode, open_episodes, split_by_episode
from worldmodels.data.dataset import MDN_VAL_FRACTION, saved_val_fraction
from worldmodels.data.latents import load_latents, open_latents
from worldmodels.data.manifest import ManifestEntry
from worldmodels.dream import DreamEnv, dream_rollout
from worldmodels.envs import make_env
from worldmodels.envs.preprocess import preprocess_frames
from worldmodels.errors import UserError
from worldmodels.io import atomic_write_text
from worldmodels.layout import RunDir, writable_dir
from worldmodels.models import MDNRNN, ConvVAE
from worldmodels.policies import BrownianPolicy
from worldmodels.progress import log
from worldmodels.rollout import Recorder, run_episodes
from worldmodels.runtime import pick_device
from worldmodels.seeds import first
from worldmodels.viz import new_figure, save_figure, save_gif

DREAM_POLICIES = ("real", "random")


@dataclass
class DreamConfig(Config):
    run_dir: Path = option(
        DEFAULT_RUN_DIR,
        "run directory with a trained VAE and M; with --agent, where the pictures go "
        "(default: runs/<agent folder name>)",
    )
    episode: int = option(-1, "episode index to start from (-1 = the first held-out episode)")
    steps: int = option(80, "dream steps to roll out and show", low=1)
    temperature: float = option(1.15, "mixture temperature τ of the dream (higher = wilder)")
    policy: str = option(
        "real", "dream actions: real (the episode's) or random (brownian)", DREAM_POLICIES
    )
    error_episodes: int = option(8, "held-out episodes averaged in the latent-error plot", low=1)
    error_samples: int = option(4, "dreams per episode in the latent-error plot", low=1)
    scale: int = option(4, "upscale factor of the 64x64 frames in the GIF", low=1)
    fps: int = option(15, "GIF frames per second", low=1)
    seed: int = option(0, "seed of the dream sampling (and of the random policy)")
    out: Path | None = option(None, "output folder (default: <run-dir>/dream)")
    device: str = option("cpu", "torch device: auto, cpu or cuda")
    agent: Path | None = option(
        None,
        "an exported agent folder: it drives official tracks and the dream follows its actions "
        "(no run dir needed)",
    )
    pretrained: bool = option(False, "like --agent, with the agent this repository ships")
    track: int = option(first("evaluate"), "with --agent: track seed of the first real episode")

    def written_dir(self) -> Path:
        return results_dir(self.run_dir, agent_root(self.agent, self.pretrained) or self.run_dir)

    def on_own_run(self) -> bool:
        """Whether it reads the run dir's own models and writes there (not an exported agent's)."""
        return agent_root(self.agent, self.pretrained) is None and self.out is None


# --- pictures ---------------------------------------------------------------------------------


def side_by_side(real: np.ndarray, dream: np.ndarray, scale: int, tau: float) -> np.ndarray:
    """uint8 (N,64,64,3) pairs → labelled (N, 64s+14, 128s+4, 3) frames: real | dream."""
    from PIL import Image, ImageDraw

    def up(x: np.ndarray) -> np.ndarray:
        return x.repeat(scale, axis=1).repeat(scale, axis=2)

    n, h = len(real), 64 * scale
    gap = np.full((n, h, 4, 3), 255, np.uint8)
    body = np.concatenate([up(real), gap, up(dream)], axis=2)
    header = np.full((n, 14, body.shape[2], 3), 255, np.uint8)
    frames = np.concatenate([header, body], axis=1)
    out = []
    for t, frame in enumerate(frames):
        image = Image.fromarray(frame)
        draw = ImageDraw.Draw(image)
        draw.text((2, 1), f"real  t={t}", fill=(0, 0, 0))
        draw.text((h + 6, 1), f"dream  tau={tau:g}", fill=(0, 0, 0))
        out.append(np.asarray(image))
    return np.stack(out)


def plot_errors(curves: dict[str, np.ndarray], title: str, path: Path) -> None:
    fig, ax = new_figure()
    for label, values in curves.items():
        ax.plot(np.arange(len(values)), values, label=label)
    ax.set_xlabel("horizon t (steps after the real start frame)")
    ax.set_ylabel("mean squared latent error per dim")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path, dpi=120)


# --- dreams -----------------------------------------------------------------------------------


def _held_out(run_dir: Path, entries: list[ManifestEntry]) -> list[ManifestEntry]:
    """The episodes M did not train on (same split as train-mdnrnn), else all of them."""
    fraction = saved_val_fraction(RunDir(run_dir).mdnrnn / "config.json", MDN_VAL_FRACTION)
    _, val = split_by_episode(entries, fraction)
    return val or list(entries)


def _pick_episode(cfg: DreamConfig, entries: list[ManifestEntry], held_out) -> ManifestEntry:
    if cfg.episode < 0:
        return held_out[0]
    for entry in entries:
        if entry.index == cfg.episode:
            return entry
    raise UserError(
        f"no episode {cfg.episode} in the latents (have {entries[0].index}..{entries[-1].index})"
    )


def _brownian(seed: int):
    walk = BrownianPolicy([seed])
    return lambda features: torch.from_numpy(walk.act())


@dataclass
class RealEpisode:
    """What really happened: V's latent means (T+1, Z) and the actions taken (T, A)."""

    mu: np.ndarray
    actions: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.actions)


def latent_error(
    env: DreamEnv, episodes: list[RealEpisode], horizon: int, samples: int
) -> dict[str, np.ndarray]:
    """Per-step squared latent error of dreams with the real actions, all dreams in one batch."""
    b, a_dim = len(episodes) * samples, episodes[0].actions.shape[1]
    z0 = np.repeat(np.stack([ep.mu[0] for ep in episodes]), samples, axis=0)
    actions = np.zeros((b, horizon, a_dim), np.float32)
    real = np.zeros((b, horizon + 1, z0.shape[1]), np.float32)
    valid = np.zeros((b, horizon + 1), bool)
    for i, ep in enumerate(episodes):
        n = min(ep.steps, horizon)
        rows = slice(i * samples, (i + 1) * samples)
        actions[rows, :n], real[rows, : n + 1], valid[rows, : n + 1] = (
            ep.actions[:n],
            ep.mu[: n + 1],
            True,
        )
    dreamed = dream_rollout(env, z0, actions=actions).z.cpu().numpy()
    count = valid.sum(axis=0).clip(min=1)
    dream_err = (((dreamed - real) ** 2).mean(axis=2) * valid).sum(axis=0) / count
    still_err = (((z0[:, None] - real) ** 2).mean(axis=2) * valid).sum(axis=0) / count
    last = int(np.flatnonzero(valid.any(axis=0))[-1])
    return {"dream": dream_err[: last + 1], "no_change": still_err[: last + 1]}


def _agent_episodes(
    cfg: DreamConfig, root: Path
) -> tuple[tuple[ConvVAE, MDNRNN], list[RealEpisode], np.ndarray]:
    """The agent drives `error_episodes` official tracks for `steps` steps; their episodes and
    the frames V saw on the first one."""
    agent, params, _ = load_acting_agent(root, device=cfg.device)
    slots = cfg.error_episodes
    recorder = Recorder(agent, slots, cfg.steps, partial(preprocess_frames, crop=agent.crop))
    seeds = [cfg.track + k for k in range(slots)]
    with make_env("gymnasium", slots, cfg.steps, workers=0) as env:

        def last_frames(got) -> None:
            ended = ~env.active[got.ids]
            recorder.last_frames(got.ids[ended], got.obs[ended])

        run_episodes(env, recorder, params.expand(slots, -1), seeds, on_step=last_frames)
    episodes = []
    for slot in range(slots):
        frames, actions = recorder.episode(slot)
        episodes.append(RealEpisode(agent.encode_small(frames).cpu().numpy(), actions))
    return (agent.vae, agent.mdnrnn), episodes, recorder.episode(0)[0]


def _data_episodes(
    cfg: DreamConfig,
) -> tuple[tuple[ConvVAE, MDNRNN], list[RealEpisode], np.ndarray, int]:
    """Held-out collected episodes (the shown one first) and the frames of the shown one."""
    layout = RunDir(cfg.run_dir)
    episodes = {e.index: e for e in open_episodes(layout.episodes)}
    models = (load_vae(cfg.run_dir), load_mdnrnn(cfg.run_dir))
    entries = open_latents(layout.latents)
    held_out = _held_out(cfg.run_dir, entries)
    entry = _pick_episode(cfg, entries, held_out)
    if entry.index not in episodes:
        raise UserError(f"episode {entry.index} has latents but no episode file: rerun encode")
    real = load_episode(layout.episodes / episodes[entry.index].file)
    shown = [load_latents(layout.latents / entry.file)]
    chosen = [load_latents(layout.latents / e.file) for e in held_out[: cfg.error_episodes]]
    as_real = [RealEpisode(ep.mu, ep.actions) for ep in shown + chosen]
    return models, as_real, real.obs, entry.index


def run(cfg: DreamConfig) -> Path:
    """Write the real-vs-dream GIF and the latent-error plot; return the output folder."""
    cfg.validate()
    root = agent_root(cfg.agent, cfg.pretrained)
    if root is None:
        (vae, model), episodes, frames, shown_index = _data_episodes(cfg)
        shown, error_episodes = episodes[0], episodes[1:]
        default_out, source = RunDir(cfg.run_dir).dream, f"episode {shown_index}"
    else:
        (vae, model), episodes, frames = _agent_episodes(cfg, root)
        shown, error_episodes = episodes[0], episodes
        default_out = RunDir(results_dir(cfg.run_dir, root)).dream
        source = f"track {cfg.track}, the agent's"
    out = writable_dir(cfg.out if cfg.out is not None else default_out)
    save_config(cfg, out / "config.json")
    device = pick_device(cfg.device)
    model, vae = model.to(device), vae.to(device)

    steps = cfg.steps
    if cfg.policy == "real" and shown.steps < steps:
        log(f"dream: the real episode has only {shown.steps} steps: dreaming {shown.steps}")
        steps = shown.steps

    generator = torch.Generator(device).manual_seed(cfg.seed)
    env = DreamEnv(model, cfg.temperature, generator, vae=vae)
    if cfg.policy == "real":
        traj = dream_rollout(env, shown.mu[:1], actions=shown.actions[:steps])
    else:
        traj = dream_rollout(env, shown.mu[:1], policy=_brownian(cfg.seed), steps=steps)
    dreamed = env.decode(traj.z[0])
    last = len(frames) - 1
    held = frames[np.minimum(np.arange(steps + 1), last)]  # hold the last real frame
    save_gif(out / "dream.gif", side_by_side(held, dreamed, cfg.scale, cfg.temperature), cfg.fps)

    curves = latent_error(env, error_episodes, cfg.steps, cfg.error_samples)
    kind = "held-out episodes" if root is None else "tracks driven by the agent"
    title = f"dream vs encoded real, {len(error_episodes)} {kind} × {cfg.error_samples}, τ={cfg.temperature:g}"
    labels = {"dream": "dream (M, real actions)", "no_change": "no change (z_t = μ_0)"}
    plot_errors({labels[k]: v for k, v in curves.items()}, title, out / "latent_error.png")
    summary = {
        "source": source,
        "policy": cfg.policy,
        "temperature": cfg.temperature,
        "seed": cfg.seed,
        "error_episodes": len(error_episodes),
        **{k: [round(float(x), 5) for x in v] for k, v in curves.items()},
    }
    atomic_write_text(out / "latent_error.json", json.dumps(summary) + "\n")
    log(
        f"dream: {out / 'dream.gif'} ({steps + 1} frames, {source}, {cfg.policy} "
        f"actions); latent error at t={len(curves['dream']) - 1}: dream "
        f"{curves['dream'][-1]:.3f} vs no-change {curves['no_change'][-1]:.3f}"
    )
    return out
