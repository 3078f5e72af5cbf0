"""Env backends behind one batched contract, plus the frame preprocessing every stage uses."""

from __future__ import annotations

import os

from worldmodels.envs.base import MAX_EPISODE_STEPS, BatchedEnv, Stepped, StepResult
from worldmodels.envs.preprocess import CROP_ROWS, FRAME_SIZE, preprocess_frames
from worldmodels.errors import UserError

BACKENDS = ("envpool", "gymnasium")


def default_workers(workers: int) -> int:
    """The CLI's `--workers 0`: one thread or process per CPU core."""
    return workers if workers > 0 else (os.cpu_count() or 1)


def make_env(
    backend: str,
    num_envs: int,
    max_steps: int = MAX_EPISODE_STEPS,
    workers: int = 0,
    lockstep: bool = False,
) -> BatchedEnv:
    """`workers`: threads for envpool (0 = one per core), processes for gymnasium (0 = in-process).

    `lockstep`: every playing slot steps together, so the batches V and M see never depend on
    which envs happened to finish first (reproducible to the bit, slower).
    """
    if backend == "envpool":
        from worldmodels.envs.envpool_backend import EnvPoolEnv

        return EnvPoolEnv(num_envs, max_steps, workers, batch_size=num_envs if lockstep else 0)
    if backend == "gymnasium":
        from worldmodels.envs.gymnasium_backend import GymnasiumEnv

        return GymnasiumEnv(num_envs, max_steps, workers=0 if lockstep else workers)
    raise UserError(f"unknown env backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def official_track_tiles(seeds: list[int]) -> list[int]:
    """Tiles of the official (Gymnasium) track of each seed."""
    from worldmodels.envs.gymnasium_backend import official_track_tiles as count_tiles

    return count_tiles(seeds)


__all__ = [
    "BACKENDS",
    "CROP_ROWS",
    "FRAME_SIZE",
    "MAX_EPISODE_STEPS",
    "BatchedEnv",
    "StepResult",
    "Stepped",
    "default_workers",
    "make_env",
    "official_track_tiles",
    "preprocess_frames",
]
