"""EnvPool's C++ CarRacing-v3: ~10× faster than Gymnasium's, for collection and training.

EnvPool seeds env i of a pool with `env_seed[i]` when the pool is built, so each `reset(seeds)`
builds a fresh pool (about 20 ms): that is what gives explicit per-episode seeds. Only the slots
still playing are stepped (`step(actions, env_id)`), so finished episodes cost nothing.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from worldmodels.envs.base import BatchedEnv


def _import_envpool():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import envpool

    return envpool


class EnvPoolEnv(BatchedEnv):
    name = "envpool"

    def __init__(self, num_envs: int, max_steps: int = 1000, num_threads: int = 0):
        super().__init__(num_envs, max_steps)
        self.num_threads = num_threads or min(num_envs, os.cpu_count() or 1)
        self._pool = None

    def _reset(self, seeds: list[int]) -> np.ndarray:
        envpool = _import_envpool()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._pool = envpool.make(
                "CarRacing-v3",
                env_type="gymnasium",
                num_envs=self.num_envs,
                env_seed=seeds,
                num_threads=self.num_threads,
                max_episode_steps=self.max_steps + 1,  # we truncate ourselves, at max_steps
            )
        obs, _ = self._pool.reset()
        return obs

    def _step(self, ids: np.ndarray, actions: np.ndarray):
        if len(ids) == self.num_envs:  # all slots playing: the plain (faster) call
            obs, reward, terminated, _, info = self._pool.step(actions)
        else:
            obs, reward, terminated, _, info = self._pool.step(actions, ids.astype(np.int32))
        env_id = info["env_id"]
        if np.all(env_id[1:] > env_id[:-1]):  # the usual case: rows already in slot order
            return obs, reward.astype(np.float32), terminated.astype(bool)
        order = np.argsort(env_id)  # rows may come back in any env order; ids is sorted
        return obs[order], reward[order].astype(np.float32), terminated[order].astype(bool)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
