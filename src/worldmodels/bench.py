"""`worldmodels bench` / `make bench`: throughput figures measured in one run, printed as JSON.

Every comparison the issues ask for (collect vs bare env, backend vs backend) is measured in the
same process on the same machine, so the ratios mean something.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worldmodels.config import option
from worldmodels.envs.gymnasium_backend import make_official_env
from worldmodels.progress import log


@dataclass
class BenchConfig:
    json: bool = option(False, "print only the JSON document (no progress lines)")
    envpool_steps: int = option(20_000, "env steps for each envpool measurement")
    gymnasium_steps: int = option(1_200, "env steps for each gymnasium measurement")
    envs: int = option(16, "env slots for envpool measurements")
    only: str = option("", "comma-separated measurement names to run (default: all)")


def _random_actions(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.c_[rng.uniform(-1, 1, n), rng.uniform(0, 1, n), np.zeros(n)].astype(np.float32)


def bare_envpool(cfg: BenchConfig) -> dict:
    """EnvPool alone: one pool, all slots stepped together, nothing else done with the frames."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import envpool

        pool = envpool.make(
            "CarRacing-v3",
            env_type="gymnasium",
            num_envs=cfg.envs,
            seed=0,
            num_threads=os.cpu_count(),
        )
    pool.reset()
    rng = np.random.default_rng(0)
    steps = 0
    start = time.perf_counter()
    while steps < cfg.envpool_steps:
        pool.step(_random_actions(rng, cfg.envs))
        steps += cfg.envs
    return {"steps_per_s": steps / (time.perf_counter() - start), "envs": cfg.envs}


def _gym_worker(steps: int) -> float:
    env = make_official_env()
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(_random_actions(rng, 1)[0])
        if terminated or truncated:
            env.reset()
    return time.perf_counter() - start


def bare_gymnasium(cfg: BenchConfig) -> dict:
    """Official env alone, one process per core, each stepping its own env."""
    procs = os.cpu_count() or 1
    per = cfg.gymnasium_steps // procs
    with mp.get_context("spawn").Pool(procs) as pool:
        pool.map(_gym_worker, [10] * procs)  # warm up imports
        start = time.perf_counter()
        pool.map(_gym_worker, [per] * procs)
        wall = time.perf_counter() - start
    return {"steps_per_s": per * procs / wall, "processes": procs}


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


MEASUREMENTS = {
    "bare_envpool": bare_envpool,
    "bare_gymnasium": bare_gymnasium,
    "collect_envpool": collect_envpool,
    "collect_gymnasium": collect_gymnasium,
}


def _ratios(results: dict) -> dict:
    def rate(name: str) -> float | None:
        return results.get(name, {}).get("steps_per_s")

    pairs = {
        "collect_envpool_over_collect_gymnasium": ("collect_envpool", "collect_gymnasium"),
        "collect_envpool_over_bare_envpool": ("collect_envpool", "bare_envpool"),
        "collect_gymnasium_over_bare_gymnasium": ("collect_gymnasium", "bare_gymnasium"),
    }
    out = {}
    for key, (a, b) in pairs.items():
        if rate(a) and rate(b):
            out[key] = round(rate(a) / rate(b), 3)
    return out


def run(cfg: BenchConfig) -> dict:
    import torch

    os.environ.setdefault("WORLDMODELS_PROGRESS", "0")
    wanted = [n for n in cfg.only.split(",") if n] or list(MEASUREMENTS)
    results: dict = {}
    for name in wanted:
        if name not in MEASUREMENTS:
            from worldmodels.errors import UserError

            raise UserError(f"unknown measurement {name!r}: choose from {', '.join(MEASUREMENTS)}")
        if not cfg.json:
            log(f"bench: {name} ...")
        figures = MEASUREMENTS[name](cfg)
        results[name] = {k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()}
        if not cfg.json:
            log(f"bench: {name}: {results[name]}")
    doc = {
        "machine": {
            "cpu_cores": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "results": results,
        "ratios": _ratios(results),
    }
    print(json.dumps(doc, indent=2))
    return doc
