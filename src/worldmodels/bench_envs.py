"""`make bench`'s env, agent and collect measurements: the env alone, the agent in the loop,
and collect, each as the stage that runs it (see `worldmodels.bench`)."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from worldmodels.envs.gymnasium_backend import make_official_env

if TYPE_CHECKING:
    from worldmodels.bench import BenchConfig


def random_actions(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.c_[rng.uniform(-1, 1, n), rng.uniform(0, 1, n), np.zeros(n)].astype(np.float32)


def bare_envpool(cfg: BenchConfig, envs: int | None = None) -> dict:
    """EnvPool alone: one pool, all slots stepped together, nothing else done with the frames."""
    envs = envs or cfg.envs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import envpool

        pool = envpool.make(
            "CarRacing-v3",
            env_type="gymnasium",
            num_envs=envs,
            seed=0,
            num_threads=os.cpu_count(),
        )
    pool.reset()
    rng = np.random.default_rng(0)
    steps = 0
    start = time.perf_counter()
    while steps < cfg.envpool_steps:
        pool.step(random_actions(rng, envs))
        steps += envs
    return {"steps_per_s": steps / (time.perf_counter() - start), "envs": envs}


POPULATION = 64


def bare_envpool_pop64(cfg: BenchConfig) -> dict:
    return bare_envpool(cfg, POPULATION)


def full_size_agent():
    """Full-size V and M with random weights: speed does not depend on what they learned."""
    import torch

    from worldmodels.agent import Agent
    from worldmodels.models import MDNRNN, ConvVAE
    from worldmodels.runtime import use_acting_threads

    use_acting_threads()  # as train-controller and evaluate do
    torch.manual_seed(0)
    return Agent(ConvVAE(), MDNRNN())


def agent_envpool_pop64(cfg: BenchConfig) -> dict:
    """Controller training's inner loop: 64 envs, each driven by its own candidate, V and M
    batched over all of them, as `train-controller` runs it."""
    import torch

    from worldmodels.envs import make_env
    from worldmodels.models import controller_param_count
    from worldmodels.rollout import run_episodes

    agent = full_size_agent()
    params = torch.randn(POPULATION, controller_param_count(agent.input_dim)) * 0.1
    max_steps = max(50, cfg.envpool_steps // POPULATION)
    with make_env("envpool", POPULATION, max_steps) as env:
        start = time.perf_counter()
        result = run_episodes(env, agent, params, list(range(POPULATION)))
        wall = time.perf_counter() - start
    return {"steps_per_s": result.env_steps / wall, "envs": POPULATION, "max_steps": max_steps}


def agent_gymnasium_eval(cfg: BenchConfig) -> dict:
    """Official-env evaluation with the agent, as `evaluate` runs it: every episode at once,
    spread over one process per core, V and M batched over all of them in this process."""
    import torch

    from worldmodels.envs import make_env
    from worldmodels.models import controller_param_count
    from worldmodels.rollout import run_episodes

    procs, episodes = os.cpu_count() or 1, cfg.eval_episodes
    agent = full_size_agent()
    params = torch.randn(1, controller_param_count(agent.input_dim)).repeat(episodes, 1) * 0.1
    with make_env("gymnasium", episodes, cfg.eval_steps, workers=procs) as env:
        env.reset(list(range(episodes)))  # start the workers and import gymnasium in them
        start = time.perf_counter()
        result = run_episodes(env, agent, params, list(range(episodes)))
        wall = time.perf_counter() - start
    return {
        "steps_per_s": result.env_steps / wall,
        "processes": procs,
        "episodes": episodes,
        "max_steps": cfg.eval_steps,
    }


def _gym_worker(seed: int, episodes: int, steps: int, cull: bool = True) -> tuple[float, int]:
    """(seconds, steps) to play `episodes` episodes of `steps` random actions, each from reset
    (included, as an evaluation pays it: it builds the track, and the first 50 frames zoom in
    on it). `cull=False`: stock Gymnasium drawing every polygon, for the ratio."""
    env = make_official_env(cull=cull)
    env.reset(seed=seed + 1000)  # warm up: imports, first render
    rng = np.random.default_rng(seed)
    played, start = 0, time.perf_counter()
    for episode in range(episodes):
        env.reset(seed=seed + episode)
        for _ in range(steps):
            _, _, terminated, truncated, _ = env.step(random_actions(rng, 1)[0])
            played += 1
            if terminated or truncated:
                break
    return time.perf_counter() - start, played


BARE_EPISODES = 4  # per process: ~6 s of stepping, long enough to measure


def bare_gymnasium(cfg: BenchConfig, cull: bool = True) -> dict:
    """Official env alone, one process per core, each stepping one env: episodes of
    `eval_steps` from reset, like the agent measurement's."""
    procs = os.cpu_count() or 1
    jobs = [(seed * BARE_EPISODES, BARE_EPISODES, cfg.eval_steps, cull) for seed in range(procs)]
    with mp.get_context("spawn").Pool(procs) as pool:
        pool.starmap(_gym_worker, [(0, 1, 10)] * procs)  # start the processes, import gymnasium
        walls, played = zip(*pool.starmap(_gym_worker, jobs))
    return {
        "steps_per_s": sum(played) / max(walls),
        "processes": procs,
        "episodes_per_process": BARE_EPISODES,
        "max_steps": cfg.eval_steps,
    }


def bare_gymnasium_stock(cfg: BenchConfig) -> dict:
    """`bare_gymnasium` with Gymnasium's own drawing of every polygon (what the culling saves)."""
    return bare_gymnasium(cfg, cull=False)


def _collect(env: str, episodes: int, max_steps: int, envs: int) -> dict:
    from worldmodels.stages import collect

    with tempfile.TemporaryDirectory() as tmp:
        cfg = collect.CollectConfig(
            run_dir=Path(tmp), episodes=episodes, max_steps=max_steps, env=env, envs=envs
        )
        start = time.perf_counter()
        collect.run(cfg)
        wall = time.perf_counter() - start
        from worldmodels.data import read_manifest

        steps = sum(e.steps for e in read_manifest(Path(tmp) / "data" / "episodes"))
    return {
        "steps_per_s": steps / wall,
        "episodes": episodes,
        "max_steps": max_steps,
        "wall_s": wall,
    }


def collect_envpool(cfg: BenchConfig) -> dict:
    max_steps = 500
    return _collect("envpool", max(cfg.envs, cfg.envpool_steps // max_steps), max_steps, cfg.envs)


def collect_gymnasium(cfg: BenchConfig) -> dict:
    procs = os.cpu_count() or 1
    max_steps = 200
    return _collect("gymnasium", max(procs, cfg.gymnasium_steps // max_steps), max_steps, 2 * procs)


def _peak_rss_kb() -> int:
    """This process's high-water mark of resident memory, in KiB. VmHWM belongs to the
    process's memory map, which starts afresh at exec; getrusage's ru_maxrss does not: Linux
    carries it over from the forked parent, so it would report the bench's own size."""
    import re
    import resource

    status = Path("/proc/self/status")
    hwm = re.search(r"VmHWM:\s+(\d+) kB", status.read_text()) if status.exists() else None
    return int(hwm.group(1)) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _collect_peak_rss_mb(episodes: int, max_steps: int) -> float:
    """Peak RSS of a `worldmodels collect` of its own process, in MB (Linux reports KiB)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["collect", "--run-dir", tmp, "--episodes", str(episodes)]
        args += ["--max-steps", str(max_steps)]
        env = {**os.environ, "WORLDMODELS_PROGRESS": "0"}
        out = subprocess.run(
            [sys.executable, "-m", "worldmodels.bench_envs", *args],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
    return int(out.stdout.split()[-1]) / 1024


def collect_peak_rss(cfg: BenchConfig) -> dict:
    """Memory stays flat in the number of episodes: episodes stream to disk wave by wave."""
    max_steps = 100
    small, large = _collect_peak_rss_mb(50, max_steps), _collect_peak_rss_mb(400, max_steps)
    return {
        "episodes_50_mb": small,
        "episodes_400_mb": large,
        "difference_mb": large - small,
        "max_steps": max_steps,
    }


if __name__ == "__main__":  # a CLI command in a process of its own, then its peak RSS (KiB)
    from worldmodels.cli import main

    code = main(sys.argv[1:])
    print(_peak_rss_kb())
    sys.exit(code)
