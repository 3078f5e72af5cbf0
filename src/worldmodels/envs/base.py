"""One batched contract for every env backend.

A `BatchedEnv` runs one episode per slot per `reset(seeds)`: slot i plays the track of `seeds[i]`
until it terminates (off the playfield, or the lap is done) or is truncated at `max_steps`. After
that the slot is frozen: it is not stepped again (no hidden auto-reset, no wasted rendering), its
reward is 0 and its obs stays the last one. Seeds are explicit so every episode can be replayed.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAX_EPISODE_STEPS = 1000
ACTION_LOW = np.array([-1.0, 0.0, 0.0], dtype=np.float32)
ACTION_HIGH = np.array([1.0, 1.0, 1.0], dtype=np.float32)


@dataclass
class StepResult:
    obs: np.ndarray  # (N,96,96,3) uint8
    reward: np.ndarray  # (N,) float32, 0 for slots that had already finished
    terminated: np.ndarray  # (N,) bool: ended by the env (lap complete or off the playfield)
    truncated: np.ndarray  # (N,) bool: cut at max_steps


class BatchedEnv(abc.ABC):
    """N CarRacing-v3 slots stepped together; subclasses implement `_reset` and `_step`."""

    name: str = "base"

    def __init__(self, num_envs: int, max_steps: int = MAX_EPISODE_STEPS):
        if num_envs < 1:
            raise ValueError("num_envs must be >= 1")
        if not 1 <= max_steps <= MAX_EPISODE_STEPS:
            raise ValueError(f"max_steps must be in 1..{MAX_EPISODE_STEPS}")
        self.num_envs = num_envs
        self.max_steps = max_steps
        self.seeds = np.zeros(num_envs, dtype=np.int64)
        self.steps = np.zeros(num_envs, dtype=np.int64)
        self.active = np.zeros(num_envs, dtype=bool)
        self.terminated = np.zeros(num_envs, dtype=bool)
        self.truncated = np.zeros(num_envs, dtype=bool)
        self.last_obs = np.zeros((num_envs, 96, 96, 3), dtype=np.uint8)

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        """Start one episode per slot on the given tracks; returns the first frames."""
        if len(seeds) != self.num_envs:
            raise ValueError(f"need {self.num_envs} seeds, got {len(seeds)}")
        self.seeds = np.asarray(seeds, dtype=np.int64)
        self.steps[:] = 0
        self.active[:] = True
        self.terminated[:] = False
        self.truncated[:] = False
        self.last_obs = self._reset([int(s) for s in self.seeds])
        return self.last_obs.copy()

    def step(self, actions: np.ndarray) -> StepResult:
        """Step the slots still playing; finished slots are left untouched."""
        actions = np.clip(np.asarray(actions, dtype=np.float32), ACTION_LOW, ACTION_HIGH)
        ids = np.flatnonzero(self.active)
        reward = np.zeros(self.num_envs, dtype=np.float32)
        if len(ids):
            obs, rew, term = self._step(ids, actions[ids])
            self.last_obs[ids] = obs
            reward[ids] = rew
            self.steps[ids] += 1
            self.terminated[ids] = term
            self.truncated[ids] = ~term & (self.steps[ids] >= self.max_steps)
            self.active[ids] = ~(self.terminated[ids] | self.truncated[ids])
        return StepResult(
            self.last_obs.copy(), reward, self.terminated.copy(), self.truncated.copy()
        )

    def stop(self, mask: np.ndarray) -> None:
        """End the episodes of the slots in `mask` now (counted as truncated): early stopping."""
        mask = np.asarray(mask, dtype=bool) & self.active
        self.truncated[mask] = True
        self.active[mask] = False

    @property
    def done(self) -> bool:
        return not self.active.any()

    @abc.abstractmethod
    def _reset(self, seeds: list[int]) -> np.ndarray: ...

    @abc.abstractmethod
    def _step(
        self, ids: np.ndarray, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Step slots `ids`; return their (obs, reward, terminated-by-env)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> BatchedEnv:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
