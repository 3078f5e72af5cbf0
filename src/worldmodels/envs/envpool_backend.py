"""EnvPool's C++ CarRacing-v3: ~10× faster than Gymnasium's, for collection and training.

EnvPool seeds env i of a pool with `env_seed[i]` when the pool is built, so each `reset(seeds)`
builds fresh pools (about 20 ms): that is what gives explicit per-episode seeds. Only the slots
still playing are stepped (`step(actions, env_id)`), so finished episodes cost nothing.

The slots are split into `groups` pools, each stepped on a thread of its own (EnvPool releases
the GIL). `send` starts a group and returns at once, `recv` hands back whichever group finishes
first, so the caller encodes frames and picks actions for one group while the other steps,
instead of leaving the env threads idle while Python works.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import numpy as np

from worldmodels.envs.base import BatchedEnv


def _import_envpool():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import envpool

    return envpool


class EnvPoolEnv(BatchedEnv):
    name = "envpool"

    def __init__(self, num_envs: int, max_steps: int = 1000, num_threads: int = 0, groups: int = 2):
        super().__init__(num_envs, max_steps)
        self.num_threads = num_threads or os.cpu_count() or 1
        self._blocks = [b for b in np.array_split(np.arange(num_envs), groups) if len(b)]
        self._pools: list = []
        self._executor = ThreadPoolExecutor(max_workers=len(self._blocks))
        self._running: dict[int, tuple[np.ndarray, Future]] = {}  # group -> (slots, step)

    def _make_pool(self, seeds: list[int]):
        envpool = _import_envpool()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return envpool.make(
                "CarRacing-v3",
                env_type="gymnasium",
                num_envs=len(seeds),
                env_seed=seeds,
                num_threads=min(len(seeds), self.num_threads),
                max_episode_steps=self.max_steps + 1,  # we truncate ourselves, at max_steps
            )

    def _reset(self, seeds: list[int]) -> np.ndarray:
        self._drain()
        self.close_pools()
        self._pools = [self._make_pool([seeds[i] for i in block]) for block in self._blocks]
        return np.concatenate([pool.reset()[0] for pool in self._pools])

    def _send(self, ids: np.ndarray, actions: np.ndarray) -> None:
        for g, block in enumerate(self._blocks):
            mine = (ids >= block[0]) & (ids <= block[-1])
            if mine.any():
                if g in self._running:
                    raise ValueError(f"group {g} already has a step in flight")
                local = ids[mine] - block[0]
                step = self._executor.submit(self._step_pool, g, local, actions[mine])
                self._running[g] = (ids[mine], step)

    def _recv(self):
        futures = {step: g for g, (_, step) in self._running.items()}
        done, _ = wait(futures, return_when=FIRST_COMPLETED)
        g = min(futures[f] for f in done)
        ids, step = self._running.pop(g)
        obs, reward, terminated = step.result()
        return ids, obs, reward, terminated

    def _step(self, ids: np.ndarray, actions: np.ndarray):
        self._send(ids, actions)
        parts = [self._recv() for _ in range(len(self._running))]
        parts.sort(key=lambda part: part[0][0])
        return tuple(np.concatenate([p[k] for p in parts]) for k in range(1, 4))

    def _step_pool(self, g: int, local: np.ndarray, actions: np.ndarray):
        pool = self._pools[g]
        if len(local) == len(self._blocks[g]):  # all slots playing: the plain (faster) call
            obs, reward, terminated, _, info = pool.step(actions)
        else:
            obs, reward, terminated, _, info = pool.step(actions, local.astype(np.int32))
        env_id = info["env_id"]
        if np.all(env_id[1:] > env_id[:-1]):  # the usual case: rows already in slot order
            return obs, reward.astype(np.float32), terminated.astype(bool)
        order = np.argsort(env_id)  # rows may come back in any env order; ids is sorted
        return obs[order], reward[order].astype(np.float32), terminated[order].astype(bool)

    def _drain(self) -> None:
        """Wait out steps still in flight (an abandoned episode) before the pools go away."""
        for _, step in self._running.values():
            step.result()
        self._running = {}

    def close_pools(self) -> None:
        for pool in self._pools:
            pool.close()
        self._pools = []

    def close(self) -> None:
        self._drain()
        self.close_pools()
        self._executor.shutdown(wait=True)
