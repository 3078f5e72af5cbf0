"""EnvPool's C++ CarRacing-v3: many times faster than Gymnasium's (`make bench`), for
collection and training.

EnvPool seeds env i of a pool with `env_seed[i]` when the pool is built, so each `reset(seeds)`
builds a fresh pool (about 20 ms): that is what gives explicit per-episode seeds. Only the slots
still playing are stepped, so finished episodes cost nothing.

An even number of slots runs in EnvPool's own asynchronous mode: `recv` hands back whichever
half of the slots finished stepping first, and EnvPool's C++ threads go on stepping the other
half while Python resizes frames, runs V and M and picks actions. This kept collection closer
to the bare env's speed than stepping two pools from Python threads, where a pool's thread
waits for the GIL before it can hand its frames back.
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


def default_batch_size(num_envs: int) -> int:
    """Half the slots when they split evenly (served as ready), else all of them (lockstep).

    EnvPool's `recv` returns exactly `batch_size` envs, and the first frames after a reset come
    back in such batches too, so the batch size must divide the slot count."""
    return num_envs // 2 if num_envs % 2 == 0 else num_envs


class EnvPoolEnv(BatchedEnv):
    def __init__(
        self, num_envs: int, max_steps: int = 1000, num_threads: int = 0, batch_size: int = 0
    ):
        super().__init__(num_envs, max_steps)
        self.num_threads = num_threads or os.cpu_count() or 1
        self.batch_size = batch_size or default_batch_size(num_envs)
        if num_envs % self.batch_size:
            raise ValueError(f"batch_size {self.batch_size} must divide num_envs {num_envs}")
        self._pool = None
        self._stepping = np.zeros(num_envs, dtype=bool)  # inside EnvPool: ours or padding

    @property
    def served_as_ready(self) -> bool:
        return self.batch_size < self.num_envs

    def _make_pool(self, seeds: list[int]):
        envpool = _import_envpool()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return envpool.make(
                "CarRacing-v3",
                env_type="gymnasium",
                num_envs=len(seeds),
                batch_size=self.batch_size,
                env_seed=seeds,
                num_threads=min(len(seeds), self.num_threads),
                max_episode_steps=self.max_steps + 1,  # we truncate ourselves, at max_steps
            )

    def _reset(self, seeds: list[int]) -> np.ndarray:
        self.close_pool()
        self._pool = self._make_pool(seeds)
        self._stepping[:] = False
        if not self.served_as_ready:
            return self._pool.reset()[0]
        self._pool.async_reset()
        frames = np.empty((self.num_envs, 96, 96, 3), dtype=np.uint8)
        for _ in range(self.num_envs // self.batch_size):
            obs, *_, info = self._pool.recv()
            frames[info["env_id"]] = obs
        return frames

    def _step(self, ids: np.ndarray, actions: np.ndarray):
        """Lockstep mode: the requests of `send` stepped in one call."""
        env_id = ids.astype(np.int32)
        if len(ids) == self.num_envs:  # all slots playing: the plain (faster) call
            env_id = None
        obs, reward, terminated, _, info = self._pool.step(actions, env_id)
        return self._in_slot_order(info["env_id"], obs, reward, terminated)[1:]

    def _send(self, ids: np.ndarray, actions: np.ndarray) -> None:
        if not self.served_as_ready:
            return super()._send(ids, actions)
        self._pool.send(actions, ids.astype(np.int32))
        self._stepping[ids] = True

    def _recv(self):
        """The first batch EnvPool finishes, without the padding rows (see `_pad_to_a_batch`)."""
        if not self.served_as_ready:
            return super()._recv()
        while True:
            self._pad_to_a_batch()
            obs, reward, terminated, _, info = self._pool.recv()
            env_id = info["env_id"]
            self._stepping[env_id] = False
            ours = self.in_flight[env_id]
            if ours.any():
                return self._in_slot_order(env_id[ours], obs[ours], reward[ours], terminated[ours])

    def _pad_to_a_batch(self) -> None:
        """EnvPool's `recv` waits for a full batch. Near the end of a wave fewer slots than that
        may be playing, so finished slots step along (no gas) and their rows are dropped."""
        short = self.batch_size - int(self._stepping.sum())
        if short <= 0:
            return
        idle = np.flatnonzero(~self._stepping & ~self.active)[:short]
        if len(idle) < short:
            raise ValueError("recv() needs every playing slot sent first")
        self._pool.send(np.zeros((short, 3), np.float32), idle.astype(np.int32))
        self._stepping[idle] = True

    @staticmethod
    def _in_slot_order(env_id, obs, reward, terminated):
        order = np.argsort(env_id)  # rows come back in the order the envs finished
        rows = env_id[order], obs[order], reward[order].astype(np.float32)
        return (*rows, terminated[order].astype(bool))

    def close_pool(self) -> None:
        if self._pool is not None:
            self._pool.close()  # steps still inside EnvPool (padding) are simply dropped
            self._pool = None

    def close(self) -> None:
        self.close_pool()
