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


@dataclass
class Stepped:
    """What `recv` returns: the rows of the slots `ids` that just took a step."""

    ids: np.ndarray  # (K,) slot indices, ascending
    obs: np.ndarray  # (K,96,96,3) uint8
    reward: np.ndarray  # (K,) float32
    terminated: np.ndarray  # (K,) bool
    truncated: np.ndarray  # (K,) bool


class BatchedEnv(abc.ABC):
    """N CarRacing-v3 slots; subclasses implement `_reset`, and either `_step` (all requests
    stepped at once) or `_send`/`_recv` (slots served as they come back)."""

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
        self.in_flight = np.zeros(num_envs, dtype=bool)
        self._requests: list[tuple[np.ndarray, np.ndarray]] = []

    def reset(self, seeds: Sequence[int]) -> np.ndarray:
        """Start one episode per slot on the given tracks; returns the first frames."""
        if len(seeds) != self.num_envs:
            raise ValueError(f"need {self.num_envs} seeds, got {len(seeds)}")
        self.seeds = np.asarray(seeds, dtype=np.int64)
        self.steps[:] = 0
        self.active[:] = True
        self.terminated[:] = False
        self.truncated[:] = False
        self.in_flight[:] = False
        self._requests = []
        self.last_obs = self._reset([int(s) for s in self.seeds])
        return self.last_obs.copy()

    def step(self, actions: np.ndarray) -> StepResult:
        """Step the slots still playing; finished slots are left untouched."""
        reward = np.zeros(self.num_envs, dtype=np.float32)
        ids = np.flatnonzero(self.active)
        if len(ids):
            self.send(ids, np.asarray(actions)[ids])
            while self.in_flight.any():
                got = self.recv()
                reward[got.ids] = got.reward
        return StepResult(
            self.last_obs.copy(), reward, self.terminated.copy(), self.truncated.copy()
        )

    def send(self, ids: np.ndarray, actions: np.ndarray) -> None:
        """Start stepping the playing slots `ids` with `actions` (one row per id); `recv` gets
        the results. Slots already in flight cannot be sent again until they come back."""
        ids = np.asarray(ids, dtype=np.int64)
        if not (self.active[ids].all() and not self.in_flight[ids].any()):
            raise ValueError("send() takes playing slots that are not already in flight")
        actions = np.clip(np.asarray(actions, dtype=np.float32), ACTION_LOW, ACTION_HIGH)
        self.in_flight[ids] = True
        self._send(ids, actions)

    def recv(self) -> Stepped:
        """Results of some slots in flight: every one of them for in-process backends, the
        first worker's block to finish for gymnasium, so no worker waits for another."""
        ids, obs, reward, terminated = self._recv()
        self.in_flight[ids] = False
        self.last_obs[ids] = obs
        self.steps[ids] += 1
        self.terminated[ids] = terminated
        self.truncated[ids] = ~terminated & (self.steps[ids] >= self.max_steps)
        self.active[ids] = ~(self.terminated[ids] | self.truncated[ids])
        return Stepped(ids, obs, reward, self.terminated[ids], self.truncated[ids])

    def _send(self, ids: np.ndarray, actions: np.ndarray) -> None:
        """Default: remember the request; `_recv` steps all of it at once."""
        self._requests.append((ids, actions))

    def _recv(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        requests, self._requests = self._requests, []
        ids = np.concatenate([r[0] for r in requests])
        actions = np.concatenate([r[1] for r in requests])
        order = np.argsort(ids)
        ids, actions = ids[order], actions[order]
        obs, reward, terminated = self._step(ids, actions)
        return ids, obs, reward, terminated

    def stop(self, mask: np.ndarray) -> None:
        """End the episodes of the slots in `mask` now (counted as truncated): early stopping."""
        mask = np.asarray(mask, dtype=bool) & self.active
        if (mask & self.in_flight).any():
            raise ValueError("cannot stop a slot while its step is in flight")
        self.truncated[mask] = True
        self.active[mask] = False

    @property
    def done(self) -> bool:
        return not self.active.any()

    @abc.abstractmethod
    def _reset(self, seeds: list[int]) -> np.ndarray: ...

    def _step(
        self, ids: np.ndarray, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Step slots `ids`; return their (obs, reward, terminated-by-env)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither _step nor _recv")

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> BatchedEnv:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
