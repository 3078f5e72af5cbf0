"""`worldmodels bench` / `make bench`: throughput figures measured in one run, printed as JSON.

Every comparison the issues ask for (collect vs bare env, backend vs backend) is measured in the
same process on the same machine, so the ratios mean something. The measurements live in
`bench_envs` (the env alone, the agent in the loop, collect) and `bench_models` (M, the dream,
V); this module names them, runs the ones asked for and prints the figures with their ratios.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass

from worldmodels import bench_envs, bench_models
from worldmodels.config import Config, option
from worldmodels.envs import MAX_EPISODE_STEPS
from worldmodels.errors import UserError
from worldmodels.progress import log


@dataclass
class BenchConfig(Config):
    json: bool = option(False, "print only the JSON document (no progress lines)")
    envpool_steps: int = option(20_000, "env steps for each envpool measurement", low=1)
    gymnasium_steps: int = option(1_200, "env steps of the gymnasium collect measurement", low=1)
    eval_episodes: int = option(
        100, "episodes of the agent on gymnasium, all at once as `evaluate` plays them", low=1
    )
    eval_steps: int = option(
        300,
        "steps per episode of bare gymnasium and of the agent on it, from reset (an episode is "
        "1000 steps; 300 keeps the bench short)",
        low=1,
        high=MAX_EPISODE_STEPS,
    )
    envs: int = option(16, "env slots for envpool measurements", low=1)
    only: str = option("", "comma-separated measurement names to run (default: all)")


MEASUREMENTS = {
    "bare_envpool": bench_envs.bare_envpool,
    "bare_envpool_pop64": bench_envs.bare_envpool_pop64,
    "agent_envpool_pop64": bench_envs.agent_envpool_pop64,
    "agent_gymnasium_eval": bench_envs.agent_gymnasium_eval,
    "bare_gymnasium": bench_envs.bare_gymnasium,
    "bare_gymnasium_stock": bench_envs.bare_gymnasium_stock,
    "collect_envpool": bench_envs.collect_envpool,
    "collect_gymnasium": bench_envs.collect_gymnasium,
    "mdnrnn_train": bench_models.mdnrnn_train,
    "dream_batch1": bench_models.dream_batch1,
    "dream_batch1024": bench_models.dream_batch1024,
    "dream_train_pop1024": bench_models.dream_train_pop1024,
    "dream_train_pop1024_bf16": bench_models.dream_train_pop1024_bf16,
    "vae_train": bench_models.vae_train,
    "vae_encode": bench_models.vae_encode,
    "collect_peak_rss": bench_envs.collect_peak_rss,
}


def _ratios(results: dict) -> dict:
    def rate(name: str) -> float | None:
        return results.get(name, {}).get("steps_per_s")

    pairs = {
        "collect_envpool_over_collect_gymnasium": ("collect_envpool", "collect_gymnasium"),
        "collect_envpool_over_bare_envpool": ("collect_envpool", "bare_envpool"),
        "collect_gymnasium_over_bare_gymnasium": ("collect_gymnasium", "bare_gymnasium"),
        "bare_gymnasium_over_bare_gymnasium_stock": ("bare_gymnasium", "bare_gymnasium_stock"),
        "dream_batch1024_over_bare_envpool": ("dream_batch1024", "bare_envpool"),
        "dream_train_pop1024_over_bare_envpool": ("dream_train_pop1024", "bare_envpool"),
        "dream_train_pop1024_bf16_over_bare_envpool": ("dream_train_pop1024_bf16", "bare_envpool"),
        "agent_envpool_pop64_over_bare_envpool_pop64": (
            "agent_envpool_pop64",
            "bare_envpool_pop64",
        ),
        "agent_gymnasium_eval_over_bare_gymnasium": ("agent_gymnasium_eval", "bare_gymnasium"),
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
