"""`worldmodels check`: is this machine ready? Versions, threads, display, and live env steps."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass

import numpy as np

from worldmodels.config import Config, option
from worldmodels.envs import BACKENDS, make_env
from worldmodels.envs.gymnasium_backend import ensure_headless_display
from worldmodels.errors import UserError


@dataclass
class CheckConfig(Config):
    steps: int = option(300, "env steps to run on each backend", low=1)
    envs: str = option("envpool,gymnasium", "comma-separated backends to step")


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception as err:  # a broken install is exactly what check should report
        return f"MISSING ({type(err).__name__})"
    return getattr(mod, "__version__", "?")


def steps_per_second(backend: str, steps: int, num_envs: int = 4) -> float:
    """Step `num_envs` slots of `backend` with gas-only actions; total env steps per second."""
    rng = np.random.default_rng(0)
    env = make_env(backend, num_envs, max_steps=1000, workers=1 if backend == "gymnasium" else 0)
    try:
        env.reset(list(range(num_envs)))
        done = 0
        start = time.perf_counter()
        while done < steps:
            action = np.c_[
                rng.uniform(-0.2, 0.2, num_envs), np.full(num_envs, 0.5), np.zeros(num_envs)
            ]
            result = env.step(action)
            if not np.isfinite(result.reward).all() or result.obs.shape[1:] != (96, 96, 3):
                raise UserError(f"{backend} returned malformed steps")
            done += num_envs
        return done / (time.perf_counter() - start)
    finally:
        env.close()


def run(cfg: CheckConfig) -> None:
    ensure_headless_display()
    import torch

    display = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    print(f"python      {platform.python_version()} ({platform.machine()})")
    for module in ("torch", "gymnasium", "envpool", "numpy", "cv2", "cma"):
        print(f"{module:<11} {_version(module)}")
    print(f"cpu cores   {os.cpu_count()}, torch threads {torch.get_num_threads()}")
    print(f"cuda        {torch.cuda.is_available()}")
    print(
        f"display     {display or 'none (SDL_VIDEODRIVER=' + os.environ.get('SDL_VIDEODRIVER', '') + ')'}"
    )
    backends = [b.strip() for b in cfg.envs.split(",") if b.strip()]
    for backend in backends:
        if backend not in BACKENDS:
            raise UserError(f"unknown backend {backend!r}: choose from {', '.join(BACKENDS)}")
        try:
            rate = steps_per_second(backend, cfg.steps)
        except UserError:
            raise
        except Exception as err:
            raise UserError(
                f"{backend} CarRacing-v3 failed to step: {type(err).__name__}: {err}"
            ) from None
        print(
            f"{backend:<11} {rate:,.0f} steps/s (4 envs, {'1 process' if backend == 'gymnasium' else 'threads'})"
        )
    print("ok")
