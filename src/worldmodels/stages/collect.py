"""`worldmodels collect`: exploration rollouts → one compressed file per episode + manifest.

Resumable by construction: episode i always plays track `seed + i`; a rerun validates what is
on disk (manifest line + checksum), sweeps temp files and half-written episodes, and collects
only the missing indices, so it ends with exactly N valid episodes and never repeats a seed.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from worldmodels.artifacts import load_acting_agent
from worldmodels.config import Config, option, require_same_settings, save_config
from worldmodels.data.episodes import Episode, write_episode
from worldmodels.data.manifest import (
    ManifestEntry,
    append_manifest,
    episode_file_name,
    read_manifest,
    rewrite_manifest,
    validate_entries,
)
from worldmodels.envs import (
    BACKENDS,
    MAX_EPISODE_STEPS,
    default_workers,
    make_env,
    preprocess_frames,
)
from worldmodels.errors import UserError
from worldmodels.io import remove_temp_files
from worldmodels.layout import RunDir, writable_dir
from worldmodels.policies import POLICIES, PolicyActor, make_policy
from worldmodels.progress import log, progress_bar
from worldmodels.rollout import Recorder, run_episodes
from worldmodels.runtime import use_acting_threads
from worldmodels.scoring import initial_stds
from worldmodels.seeds import require_within


@dataclass
class CollectConfig(Config):
    run_dir: Path = option(
        Path("runs/default"), "run directory; episodes go to <run-dir>/data/episodes"
    )
    episodes: int = option(
        200, "number of episodes to end up with (episode i plays track seed+i)", low=0
    )
    max_steps: int = option(
        1000, "steps per episode before truncation (at most 1000)", low=1, high=MAX_EPISODE_STEPS
    )
    env: str = option(
        "envpool", "env backend: envpool (fast C++) or gymnasium (official)", BACKENDS
    )
    policy: str = option(
        "brownian",
        "exploration policy: brownian (smooth random), random (i.i.d.), road (a noisy road "
        "follower: more road in the data, but it trained a worse controller in our runs) or "
        "agent (a trained controller drives, with --agent and --agent-noise: on-policy data, "
        "for the paper's iterative round)",
        (*POLICIES, "agent"),
    )
    agent: Path | None = option(
        None,
        "with --policy agent: the run dir (or exported agent folder) whose V, M and CMA-ES mean "
        "drive",
    )
    agent_noise: float = option(
        0.05,
        "with --policy agent: std of the Gaussian noise on the controller's weights, drawn per "
        "episode in CMA-ES's units (h weights get a tenth), so the data also shows the near "
        "misses and recoveries of the controllers CMA-ES will try",
        low=0,
    )
    seed: int = option(0, "track seed of episode 0")
    envs: int = option(16, "env slots stepped together in one wave", low=1)
    workers: int = option(0, "envpool threads or gymnasium processes (0 = one per CPU core)", low=0)
    crop: bool = option(True, "crop the dashboard (keep the top 84 rows) before resizing to 64x64")
    compress_level: int = option(
        1, "deflate level of episode files (0 = store, 1 = fast, 9 = small)", low=0, high=9
    )

    def check(self) -> None:
        require_within("collect", self.seed, self.episodes, "--seed/--episodes")
        if self.policy == "agent" and self.agent is None:
            raise UserError("--policy agent needs --agent: the run dir whose controller drives")


# Settings that define what the episodes *are*; the rest (how many, how fast) may change on resume.
_DATA_IDENTITY = ("env", "policy", "seed", "max_steps", "crop", "agent", "agent_noise")


def _check_same_data(cfg: CollectConfig, config_path: Path) -> None:
    require_same_settings(
        cfg,
        config_path,
        _DATA_IDENTITY,
        "episodes collected",
        "use the same setting or a new --run-dir",
    )


def _sweep(folder: Path) -> list[ManifestEntry]:
    """Keep only verified episodes; report and delete everything else."""
    for path in remove_temp_files(folder):
        log(f"removed unfinished temp file {path.name}")
    valid, problems = validate_entries(folder, read_manifest(folder))
    for problem in problems:
        log(f"invalid episode, will re-collect: {problem}")
    listed = {e.file for e in valid}
    for path in sorted(folder.glob("episode_*.npz")):
        if path.name not in listed:
            if not any(path.name in p for p in problems):
                log(f"invalid episode, will re-collect: {path.name}: no manifest line (unfinished)")
            path.unlink()
    rewrite_manifest(folder, valid)
    return valid


class _EpisodeWriter:
    """Compresses and writes finished episodes on a background thread (bounded queue)."""

    def __init__(self, folder: Path, compress_level: int, depth: int):
        self.folder = folder
        self.compress_level = compress_level
        self.jobs: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def submit(self, index: int, episode: Episode) -> None:
        if self.error is not None:
            raise self.error
        self.jobs.put((index, episode))

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            index, ep = job
            try:
                name = episode_file_name(index)
                digest = write_episode(self.folder / name, ep, self.compress_level)
                entry = ManifestEntry(
                    index=index,
                    file=name,
                    seed=ep.seed,
                    steps=ep.steps,
                    total_reward=round(ep.total_reward, 4),
                    terminated=ep.terminated,
                    truncated=ep.truncated,
                    sha256=digest,
                )
                append_manifest(self.folder, entry)
            except BaseException as err:
                self.error = err
                return

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


class Driver:
    """A trained agent as the collecting policy: each episode's controller is the CMA-ES mean
    plus noise drawn from the episode's own seed, and V and M act one car at a time, so an
    episode is the same whichever wave it runs in (like every other policy's)."""

    def __init__(self, source: Path, noise: float):
        self.agent, mean, _ = load_acting_agent(source)
        self.agent.one_at_a_time = True
        self.mean = mean.numpy().astype(np.float64)
        self.scale = noise * initial_stds(self.agent)

    def params(self, seeds: list[int]) -> torch.Tensor:
        noise = [np.random.default_rng([s, 4]).standard_normal(len(self.mean)) for s in seeds]
        return torch.as_tensor(self.mean + self.scale * np.stack(noise), dtype=torch.float32)


def _play_wave(
    env, cfg: CollectConfig, indices: list[int], writer: _EpisodeWriter, bar, driver: Driver | None
) -> None:
    """Run one episode per slot through the one episode loop, recording frames and actions, and
    hand each episode to the writer as soon as it ends."""
    n = len(indices)
    seeds = [cfg.seed + i for i in indices]
    if driver is None:
        actor, params = PolicyActor(make_policy(cfg.policy, seeds)), torch.zeros(n, 0)
    else:
        actor, params = driver.agent, driver.params(seeds)
    recorder = Recorder(actor, n, cfg.max_steps, partial(preprocess_frames, crop=cfg.crop))
    rewards = np.zeros((n, cfg.max_steps), np.float32)

    def on_step(got) -> None:
        rewards[got.ids, env.steps[got.ids] - 1] = got.reward
        bar.update(len(got.ids))
        ended = ~env.active[got.ids]
        recorder.last_frames(got.ids[ended], got.obs[ended])
        for k in got.ids[ended]:
            obs, actions = recorder.episode(k)
            episode = Episode(
                obs=obs,
                actions=actions,
                rewards=rewards[k, : len(actions)].copy(),
                terminated=bool(env.terminated[k]),
                truncated=bool(env.truncated[k]),
                seed=seeds[k],
                env=cfg.env,
                crop=cfg.crop,
            )
            writer.submit(indices[k], episode)

    run_episodes(env, recorder, params, seeds, on_step=on_step)


def run(cfg: CollectConfig) -> Path:
    """Collect until `cfg.episodes` valid episodes exist; return the episodes folder."""
    cfg.validate()
    layout = RunDir(cfg.run_dir)
    folder = writable_dir(layout.episodes)
    config_path = layout.data / "config.json"
    _check_same_data(cfg, config_path)
    save_config(cfg, config_path)

    done = {e.index for e in _sweep(folder)}
    todo = [i for i in range(cfg.episodes) if i not in done]
    if not todo:
        log(f"collect: {cfg.episodes} valid episodes already in {folder}, nothing to do")
        return folder
    log(f"collect: {len(done)} valid episodes on disk, collecting {len(todo)} on {cfg.env}")

    driver = None
    if cfg.policy == "agent":
        use_acting_threads()
        driver = Driver(cfg.agent, cfg.agent_noise)
    started = time.perf_counter()
    bar = progress_bar(len(todo) * cfg.max_steps, "collect", unit="step")
    writer = _EpisodeWriter(folder, cfg.compress_level, depth=cfg.envs)
    env = None
    try:
        for start in range(0, len(todo), cfg.envs):
            wave = todo[start : start + cfg.envs]
            if env is None or env.num_envs != len(wave):
                if env is not None:
                    env.close()
                env = make_env(cfg.env, len(wave), cfg.max_steps, default_workers(cfg.workers))
            _play_wave(env, cfg, wave, writer, bar, driver)
            bar.set_postfix(episodes=f"{len(done) + start + len(wave)}/{cfg.episodes}")
    finally:
        if env is not None:
            env.close()
        bar.close()
        writer.close()
    elapsed = time.perf_counter() - started
    steps = sum(e.steps for e in read_manifest(folder) if e.index in set(todo))
    log(
        f"collect: {len(todo)} episodes, {steps} steps in {elapsed:.1f}s ({steps / elapsed:.0f} steps/s)"
    )
    return folder
