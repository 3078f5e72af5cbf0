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

from worldmodels.checkpoint import load_model, read_model_meta
from worldmodels.config import option, save_config
from worldmodels.envs import BACKENDS, MAX_EPISODE_STEPS, default_workers, make_env
from worldmodels.errors import UserError
from worldmodels.io import atomic_write_text
from worldmodels.layout import RunDir, writable_dir
from worldmodels.models import LinearController
from worldmodels.progress import log, progress_bar
from worldmodels.rollout import run_episodes
from worldmodels.runtime import use_acting_threads
from worldmodels.stages.train_controller import load_world_model, require_controller
from worldmodels.viz import save_gif

EVAL_SEED_BASE = 1_000_000
SOLVED = 900.0


@dataclass
class EvaluateConfig:
    run_dir: Path = option(Path("runs/default"), "run directory with a trained controller")
    episodes: int = option(100, "number of evaluation tracks (the standard protocol is 100)")
    seed: int = option(EVAL_SEED_BASE, "track seed of the first episode; episode i uses seed+i")
    env: str = option(
        "gymnasium", "env backend; reported scores use gymnasium (official)", BACKENDS
    )
    max_steps: int = option(MAX_EPISODE_STEPS, "step limit per episode (official: 1000)")
    workers: int = option(0, "gymnasium processes or envpool threads (0 = one per core)")
    controller: str = option(
        "mean", "which controller: the CMA-ES mean or the best candidate", ("mean", "best")
    )
    gif: int = option(
        2, "GIFs to write: best and worst episode first, then the next best (0 = none)"
    )
    device: str = option("cpu", "torch device for V and M")

    def validate(self) -> None:
        if self.episodes < 1:
            raise UserError(f"--episodes must be >= 1, got {self.episodes}")
        if not 1 <= self.max_steps <= MAX_EPISODE_STEPS:
            raise UserError(f"--max-steps must be in 1..{MAX_EPISODE_STEPS}")


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


def load_controller_params(run_dir: Path, which: str) -> tuple[torch.Tensor, dict]:
    folder = require_controller(run_dir, which)
    meta = read_model_meta(folder, "train-controller")
    controller = load_model(folder, LinearController, "train-controller")
    return controller.flat(), meta


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
    folder = writable_dir(RunDir(cfg.run_dir).eval)
    params, meta = load_controller_params(cfg.run_dir, cfg.controller)
    use_acting_threads(cfg.device)
    agent = load_world_model(cfg.run_dir, cfg.device, z_only=bool(meta.get("z_only", False)))
    seeds = [cfg.seed + i for i in range(cfg.episodes)]
    log(
        f"evaluate: {cfg.episodes} episodes on {cfg.env} CarRacing-v3, seeds {seeds[0]}..{seeds[-1]}"
    )

    bar = progress_bar(cfg.episodes * cfg.max_steps, "evaluate", unit="step")
    started = time.perf_counter()
    with make_env(cfg.env, cfg.episodes, cfg.max_steps, default_workers(cfg.workers)) as env:
        batch = params.repeat(cfg.episodes, 1)
        result = run_episodes(
            env, agent, batch, seeds, on_step=lambda got: bar.update(len(got.ids))
        )
    wall = time.perf_counter() - started
    bar.close()

    report = {
        "protocol": {
            "env": "CarRacing-v3",
            "backend": cfg.env,
            "gymnasium_version": _gymnasium_version(),
            "episodes": cfg.episodes,
            "seeds": [seeds[0], seeds[-1]],
            "max_steps": cfg.max_steps,
            "controller": cfg.controller,
            "controller_generation": meta.get("generation"),
        },
        **summarize(result.returns),
        "episodes": [
            {"seed": s, "return": float(r), "steps": int(n), "terminated": bool(t)}
            for s, r, n, t in zip(seeds, result.returns, result.steps, result.terminated)
        ],
        "wall_s": wall,
        "steps_per_s": result.env_steps / wall,
    }
    save_config(cfg, folder / "config.json")
    atomic_write_text(folder / "eval.json", json.dumps(report, indent=2) + "\n")
    log(
        f"evaluate: {report['mean']:.1f} ± {report['std']:.1f} over {cfg.episodes} tracks "
        f"({report['fraction_solved']:.0%} ≥ 900) in {wall:.0f}s"
    )
    _write_gifs(agent, params, seeds, result.returns, cfg, folder)
    return folder


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
