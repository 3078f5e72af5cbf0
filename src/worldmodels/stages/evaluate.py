"""`worldmodels evaluate`: the saved controller on N official CarRacing-v3 tracks.

The protocol behind every score we report: Gymnasium's official env, 1000-step limit, tracks
S … S+N−1 that no training stage uses, the CMA-ES mean as the agent, no early stopping. All N
episodes run as one batch over one process per core, with V and M batched across them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worldmodels.artifacts import DEFAULT_RUN_DIR, agent_root, load_acting_agent, results_dir
from worldmodels.config import Config, option, save_config
from worldmodels.data.latents import first_latents
from worldmodels.dream import DreamEnv, DreamEvaluator, controller_policy, dream_rollout
from worldmodels.envs import (
    BACKENDS,
    MAX_EPISODE_STEPS,
    default_workers,
    make_env,
    official_track_tiles,
)
from worldmodels.errors import UserError
from worldmodels.io import atomic_write_text
from worldmodels.layout import RunDir, writable_dir
from worldmodels.progress import log, progress_bar
from worldmodels.rollout import OFF_PLAYFIELD, TIME_PENALTY, run_episodes
from worldmodels.runtime import use_acting_threads
from worldmodels.seeds import first
from worldmodels.viz import save_gif

EVAL_SEED_BASE = first("evaluate")
DREAM_SEED_BASE = 0  # a dream's seed picks its start and noise; no track is driven
SOLVED = 900.0


@dataclass
class EvaluateConfig(Config):
    run_dir: Path = option(DEFAULT_RUN_DIR, "run directory with a trained controller")
    episodes: int = option(100, "number of evaluation tracks (the standard protocol is 100)", low=1)
    seed: int = option(EVAL_SEED_BASE, "track seed of the first episode; episode i uses seed+i")
    env: str = option(
        "gymnasium", "env backend; reported scores use gymnasium (official)", BACKENDS
    )
    max_steps: int = option(
        MAX_EPISODE_STEPS, "step limit per episode (official: 1000)", low=1, high=MAX_EPISODE_STEPS
    )
    workers: int = option(0, "gymnasium processes or envpool threads (0 = one per core)")
    deterministic: bool = option(
        True,
        "act on each car's frame alone, so every track's return is the same run to run whatever "
        "the workers (batched numbers depend on which cars came back together); "
        "`--deterministic false` batches them: faster, returns may differ in float noise",
    )
    controller: str = option(
        "mean", "which controller: the CMA-ES mean or the best candidate", ("mean", "best")
    )
    gif: int = option(
        2, "GIFs to write: best and worst episode first, then the next best (0 = none)"
    )
    dream_episodes: int = option(
        100,
        "then let the same controller drive N dreams of M (from the run's real first frames): "
        "dream.json holds the dreamed returns beside the real ones, dream_drive.gif shows a dream "
        "(0 = skip; needs a run dir with encoded latents)",
        low=0,
    )
    device: str = option("cpu", "torch device for V and M")
    agent: Path | None = option(
        None,
        "an exported agent folder (`worldmodels export`) to evaluate instead of the run dir's "
        "models; results go to --run-dir (default: runs/<agent folder name>)",
    )
    pretrained: bool = option(
        False,
        "evaluate the agent this repository ships (pretrained/), no training needed; results go "
        "to --run-dir (default: runs/pretrained)",
    )

    def written_dir(self) -> Path:
        return results_dir(self.run_dir, agent_root(self.agent, self.pretrained) or self.run_dir)

    def on_own_run(self) -> bool:
        """Whether it reads the run dir's own models and writes there (not an exported agent's)."""
        return agent_root(self.agent, self.pretrained) is None


def summarize(returns: np.ndarray) -> dict:
    n = len(returns)
    std = float(returns.std(ddof=1)) if n > 1 else 0.0
    half = 1.96 * std / math.sqrt(n) if n > 1 else 0.0
    mean = float(returns.mean())
    return {
        "mean": mean,
        "std": std,
        "min": float(returns.min()),
        "median": float(np.median(returns)),
        "max": float(returns.max()),
        "ci95": [mean - half, mean + half],
        "fraction_solved": float((returns >= SOLVED).mean()),
    }


def m_reward_quality(returns: np.ndarray, expected: np.ndarray) -> dict:
    """How well M's reward head, the dream's reward, knows the agent's real drives: the
    correlation over tracks of its summed prediction with the real return, and both means."""
    spread = len(returns) > 1 and returns.std() > 0 and expected.std() > 0
    return {
        "correlation": float(np.corrcoef(returns, expected)[0, 1]) if spread else None,
        "mean_expected": float(expected.mean()),
        "mean_real": float(returns.mean()),
    }


def lap_outcomes(
    returns: np.ndarray, steps: np.ndarray, terminated: np.ndarray, tiles: list[int]
) -> list[dict]:
    """Per official track: tiles missed and how the episode ended, read back from its return.

    A return is 1000 * visited / tiles - 0.1 per step, minus 100 if the car left the playfield.
    The lap ends only when every tile has been visited, so one missed tile means the episode runs
    to its step limit: "lap" (every tile), "timeout" (tiles missed) or "off_playfield".
    """
    outcomes = []
    for ret, n, done, count in zip(returns, steps, terminated, tiles):
        visited = (ret + TIME_PENALTY * n) * count / 1000.0
        lap = bool(done) and visited > count - 0.5
        if done and not lap:
            visited -= OFF_PLAYFIELD * count / 1000.0
        missed = max(0, count - int(round(visited)))
        end = "lap" if lap else ("off_playfield" if done else "timeout")
        outcomes.append({"tiles": int(count), "tiles_missed": missed, "end": end})
    return outcomes


def summarize_laps(episodes: list[dict]) -> dict:
    """What the failure analysis reads: laps finished, their length, tiles missed, bad tracks."""
    laps = [e for e in episodes if e.get("end") == "lap"]
    missed = [e["tiles_missed"] for e in episodes if "tiles_missed" in e]
    return {
        "fraction_laps": len(laps) / len(episodes) if missed else None,
        "lap_steps_mean": float(np.mean([e["steps"] for e in laps])) if laps else None,
        "tiles_missed_mean": float(np.mean(missed)) if missed else None,
        "fraction_below_600": float(np.mean([e["return"] < 600 for e in episodes])),
    }


def record_episode(agent, params: torch.Tensor, seed: int, cfg: EvaluateConfig) -> list[np.ndarray]:
    """Replay one track in-process (the agent is deterministic, so it is the same episode)."""
    frames: list[np.ndarray] = []
    with make_env(cfg.env, 1, cfg.max_steps, workers=0) as env:
        run_episodes(
            env, agent, params[None], [seed], on_step=lambda got: frames.append(got.obs[0])
        )
    return frames


def run(cfg: EvaluateConfig) -> Path:
    cfg.validate()
    source = agent_root(cfg.agent, cfg.pretrained) or cfg.run_dir
    use_acting_threads(cfg.device)
    agent, params, meta = load_acting_agent(source, cfg.controller, cfg.device)
    agent.one_at_a_time = cfg.deterministic
    folder = writable_dir(RunDir(results_dir(cfg.run_dir, source)).eval)
    seeds = [cfg.seed + i for i in range(cfg.episodes)]
    log(
        f"evaluate: {cfg.episodes} episodes on {cfg.env} CarRacing-v3, seeds {seeds[0]}..{seeds[-1]}"
    )

    bar = progress_bar(cfg.episodes * cfg.max_steps, "evaluate", unit="step")
    started = time.perf_counter()
    expected = np.zeros(cfg.episodes)  # M's reward head, summed along each real drive

    def on_step(got) -> None:
        bar.update(len(got.ids))
        expected[got.ids] += agent.expected_rewards(got.ids)

    with make_env(cfg.env, cfg.episodes, cfg.max_steps, default_workers(cfg.workers)) as env:
        result = run_episodes(env, agent, params.repeat(cfg.episodes, 1), seeds, on_step=on_step)
    wall = time.perf_counter() - started
    bar.close()

    episodes = [
        {
            "seed": s,
            "return": float(r),
            "steps": int(n),
            "terminated": bool(t),
            "m_return": float(m),
        }
        for s, r, n, t, m in zip(seeds, result.returns, result.steps, result.terminated, expected)
    ]
    if cfg.env == "gymnasium":  # envpool draws other tracks from the same seeds
        tiles = official_track_tiles(seeds)
        outcomes = lap_outcomes(result.returns, result.steps, result.terminated, tiles)
        episodes = [{**e, **o} for e, o in zip(episodes, outcomes)]
    report = {
        "protocol": {
            "env": "CarRacing-v3",
            "backend": cfg.env,
            "gymnasium_version": _gymnasium_version(),
            # off-screen polygons are skipped before Gymnasium draws (envs/gymnasium_backend.py):
            # the same frames byte for byte, tested against stock Gymnasium
            "render": "culled" if cfg.env == "gymnasium" else None,
            "episodes": cfg.episodes,
            "seeds": [seeds[0], seeds[-1]],
            "max_steps": cfg.max_steps,
            "controller": cfg.controller,
            "controller_generation": meta.get("generation"),
            "agent": str(source),
            # V's precision when acting: bf16 where the CPU has native bf16, else fp32; returns
            # repeat exactly only on a machine that encodes the same way
            "encoder": "bf16" if agent.bf16 else "fp32",
            "deterministic": cfg.deterministic,
        },
        **summarize(result.returns),
        **summarize_laps(episodes),
        "m_reward": m_reward_quality(result.returns, expected),
        "episodes": episodes,
        "wall_s": wall,
        "steps_per_s": result.env_steps / wall,
    }
    save_config(cfg, folder / "config.json")
    atomic_write_text(folder / "eval.json", json.dumps(report, indent=2) + "\n")
    laps = report["fraction_laps"]
    log(
        f"evaluate: {report['mean']:.1f} ± {report['std']:.1f} over {cfg.episodes} tracks "
        f"({report['fraction_solved']:.0%} ≥ 900, {report['fraction_below_600']:.0%} below 600"
        + ("" if laps is None else f", {laps:.0%} laps finished")
        + f") in {wall:.0f}s"
    )
    _write_gifs(agent, params, seeds, result.returns, cfg, folder)
    if cfg.dream_episodes:
        _dream_drive(agent, params, RunDir(source).latents, cfg, folder)
    return folder


def _dream_drive(agent, params: torch.Tensor, latents: Path, cfg: EvaluateConfig, folder: Path):
    """How the controller does inside M: its dreamed returns (M's reward and episode-end
    heads, from real first frames) to set beside the real ones, and one dream as a GIF."""
    try:
        starts = first_latents(latents)
    except UserError as err:  # an agent folder has none; the real scores are written already
        log(f"evaluate: dreamed returns skipped ({err})")
        return
    dreamer = DreamEvaluator(agent.mdnrnn, starts, cfg.max_steps, z_only=agent.z_only)
    seeds = [DREAM_SEED_BASE + i for i in range(cfg.dream_episodes)]
    played = dreamer.play(params.numpy().reshape(1, -1).repeat(len(seeds), 0), seeds)
    dreamed = {"temperature": dreamer.dream.temperature, "seeds": [seeds[0], seeds[-1]]}
    dreamed |= summarize(played.returns) | {"returns": played.returns.tolist()}
    atomic_write_text(folder / "dream.json", json.dumps(dreamed, indent=2) + "\n")
    log(
        f"evaluate: in the dream {dreamed['mean']:.1f} ± {dreamed['std']:.1f} ({len(seeds)} dreams)"
    )
    if cfg.gif:
        env = DreamEnv(agent.mdnrnn, vae=agent.vae)
        env.generator.manual_seed(seeds[0])
        policy = controller_policy(params, agent.z_only, agent.vae.z_dim)
        trajectory = dream_rollout(env, starts[:1], policy=policy, steps=cfg.max_steps)
        frames = env.decode(trajectory.z[0])
        save_gif(folder / "dream_drive.gif", frames[::2], fps=25, scale=2)


def _write_gifs(agent, params, seeds, returns, cfg: EvaluateConfig, folder: Path) -> None:
    order = list(np.argsort(-returns))
    chosen = [order[0], order[-1]] + order[1:-1]
    names = ["best", "worst"] + [f"rank{k + 2}" for k in range(len(order))]
    for i, name in zip(chosen[: min(cfg.gif, len(seeds))], names):
        frames = record_episode(agent, params, seeds[i], cfg)
        path = save_gif(folder / f"{name}_seed{seeds[i]}.gif", frames[::2], fps=25)
        log(f"evaluate: wrote {path} (return {returns[i]:.0f})")


def _gymnasium_version() -> str:
    import gymnasium

    return gymnasium.__version__
