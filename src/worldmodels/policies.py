"""Exploration policies for collecting data, vectorised over env slots.

Every slot draws from its own generator seeded by its episode's seed, so an episode is
reproducible on its own, whichever wave or worker it ran in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

POLICIES = ("random", "brownian")


class RandomPolicy:
    """I.i.d. actions biased toward gas, like the reference's data set: the car moves but
    jitters in place, so frames cluster around the start of the track."""

    def __init__(self, seeds: Sequence[int]):
        self.rngs = [np.random.default_rng([int(s), 1]) for s in seeds]

    def act(self) -> np.ndarray:
        draws = np.stack([rng.random(3) for rng in self.rngs]).astype(np.float32)
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

    def act(self) -> np.ndarray:
        noise = np.stack([rng.standard_normal(3) for rng in self.rngs]).astype(np.float32)
        self.state = np.clip(self.state + noise * self.scale, [-1, -0.2, -1], [1, 1, 1])
        # brake walks below zero most of the time: it only bites on the positive part
        return np.clip(self.state, [-1, 0, 0], [1, 1, 1]).astype(np.float32)


def make_policy(name: str, seeds: Sequence[int]):
    if name == "random":
        return RandomPolicy(seeds)
    if name == "brownian":
        return BrownianPolicy(seeds)
    raise ValueError(f"unknown policy {name!r}")
