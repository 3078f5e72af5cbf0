"""Exploration policies for collecting data, vectorised over env slots.

Every slot draws from its own generator seeded by its episode's seed, and `act(frames, ids)`
advances only the slots asked for, so an episode is reproducible on its own, whichever wave,
worker or order of service it ran in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

POLICIES = ("random", "brownian", "road")


class RandomPolicy:
    """I.i.d. actions biased toward gas, like the reference's data set: the car moves but
    jitters in place, so frames cluster around the start of the track."""

    def __init__(self, seeds: Sequence[int]):
        self.rngs = [np.random.default_rng([int(s), 1]) for s in seeds]

    def act(self, frames: np.ndarray | None = None, ids: Sequence[int] | None = None) -> np.ndarray:
        ids = range(len(self.rngs)) if ids is None else ids
        draws = np.stack([self.rngs[i].random(3) for i in ids]).astype(np.float32)
        steer = draws[:, 0] * 2 - 1
        gas = 0.3 + 0.7 * draws[:, 1]
        brake = np.where(draws[:, 2] < 0.1, draws[:, 2], 0.0)
        return np.stack([steer, gas, brake], axis=1).astype(np.float32)


class BrownianPolicy:
    """Smooth random actions: each dimension follows a clipped random walk.

    Held steering makes real turns and held gas real speed, so the car drives along and off the
    track instead of dithering at the start: far better coverage of what a controller will see.
    """

    def __init__(self, seeds: Sequence[int], dt: float = 1 / 50):
        self.rngs = [np.random.default_rng([int(s), 2]) for s in seeds]
        self.scale = np.sqrt(dt) * np.array([1.5, 1.0, 1.0], dtype=np.float32)
        self.state = np.tile(np.array([0.0, 0.6, -0.5], dtype=np.float32), (len(seeds), 1))

    def act(self, frames: np.ndarray | None = None, ids: Sequence[int] | None = None) -> np.ndarray:
        ids = np.arange(len(self.rngs)) if ids is None else np.asarray(ids)
        noise = np.stack([self.rngs[i].standard_normal(3) for i in ids]).astype(np.float32)
        self.state[ids] = np.clip(self.state[ids] + noise * self.scale, [-1, -0.2, -1], [1, 1, 1])
        # brake walks below zero most of the time: it only bites on the positive part
        return np.clip(self.state[ids], [-1, 0, 0], [1, 1, 1]).astype(np.float32)


AHEAD_ROWS = slice(40, 66)  # the strip of the 96x96 frame just in front of the car


def road_heading(
    frames: np.ndarray, rows: slice = AHEAD_ROWS, min_pixels: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Where the road is ahead: (offset in [-1, 1] of its centre from the car's column, whether
    at least `min_pixels` of road are in view). The car sits at the horizontal centre and the
    camera turns with it; `rows` is the strip just in front of it. Road is grey (R = G = B);
    grass is green and kerbs red or white."""
    band = frames[:, rows].astype(np.int16)
    r, g, b = band[..., 0], band[..., 1], band[..., 2]
    road = (np.abs(r - g) < 20) & (np.abs(g - b) < 20) & (r > 60) & (r < 160)
    per_column = road.sum(axis=1)  # (N, width)
    seen = per_column.sum(axis=1)
    width = frames.shape[2]
    centre = (per_column * np.arange(width)).sum(axis=1) / np.maximum(seen, 1)
    car_column = width / 2
    return (centre - car_column) / car_column, seen >= min_pixels


class RoadPolicy:
    """A clumsy road follower: steers toward the road ahead, blended per episode with the
    brownian walk (from 20 % to 80 % noise), at a gas level drawn per episode.

    Random actions leave the track within seconds, so V and M would learn mostly grass; this
    policy covers what a good driver sees (road, curves, kerbs, speed) and still drifts off and
    back often enough to show recoveries."""

    def __init__(self, seeds: Sequence[int]):
        self.noise = BrownianPolicy(seeds)
        draws = np.array([np.random.default_rng([int(s), 3]).random(2) for s in seeds])
        self.follow = (0.2 + 0.6 * draws[:, 0]).astype(np.float32)[:, None]
        self.gas = (0.1 + 0.4 * draws[:, 1]).astype(np.float32)

    def act(self, frames: np.ndarray | None = None, ids: Sequence[int] | None = None) -> np.ndarray:
        ids = np.arange(len(self.gas)) if ids is None else np.asarray(ids)
        noise = self.noise.act(None, ids)
        if frames is None:
            return noise
        offset, seen = road_heading(frames)
        steer = np.where(seen, np.clip(3.0 * offset, -1, 1), noise[:, 0])
        driver = np.stack([steer, self.gas[ids], np.zeros(len(ids), np.float32)], axis=1)
        follow = self.follow[ids]
        return (follow * driver + (1 - follow) * noise).astype(np.float32)


def make_policy(name: str, seeds: Sequence[int]):
    if name == "random":
        return RandomPolicy(seeds)
    if name == "brownian":
        return BrownianPolicy(seeds)
    if name == "road":
        return RoadPolicy(seeds)
    raise ValueError(f"unknown policy {name!r}")


class PolicyActor:
    """An exploration policy in the agent's place in `run_episodes`: no parameters, no memory."""

    def __init__(self, policy):
        self.policy = policy

    def reset(self, num_envs: int) -> None:
        pass

    def act(self, frames: np.ndarray, params: object, ids: np.ndarray) -> np.ndarray:
        return self.policy.act(frames, ids)
