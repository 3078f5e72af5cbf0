"""Gymnasium's official CarRacing-v3, the only backend whose scores we report.

It is render-bound (~98 % of a step is Python drawing a 1000×800 frame), so its slots are spread
over worker processes; each worker owns a contiguous block of slots and steps only the ones still
playing. `workers=0` keeps everything in this process (tests, debugging).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import warnings
from multiprocessing.connection import Connection, wait

import numpy as np

from worldmodels.envs.base import MAX_EPISODE_STEPS, BatchedEnv


def ensure_headless_display() -> None:
    """pygame needs a video driver; with no display the dummy one avoids a hang or a crash."""
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")


def make_official_env():
    ensure_headless_display()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import gymnasium as gym

        # Our own step limit governs truncation; keep gymnasium's at the official 1000.
        return gym.make("CarRacing-v3", max_episode_steps=MAX_EPISODE_STEPS)


class _Slots:
    """A block of official envs, stepped in-process; the worker body and the workers=0 path."""

    def __init__(self, count: int):
        self.envs = [make_official_env() for _ in range(count)]

    def reset(self, seeds: list[int]) -> np.ndarray:
        return np.stack([env.reset(seed=seed)[0] for env, seed in zip(self.envs, seeds)])

    def step(self, local_ids: list[int], actions: np.ndarray):
        obs, rewards, terms = [], [], []
        for i, action in zip(local_ids, actions):
            o, r, terminated, _, _ = self.envs[i].step(action)
            obs.append(o)
            rewards.append(r)
            terms.append(terminated)
        empty = np.zeros((0, 96, 96, 3), np.uint8)
        return (
            np.stack(obs) if obs else empty,
            np.array(rewards, np.float32),
            np.array(terms, bool),
        )

    def close(self) -> None:
        for env in self.envs:
            env.close()


def _worker(conn: Connection, count: int) -> None:
    slots = _Slots(count)
    try:
        while True:
            command, payload = conn.recv()
            if command == "reset":
                conn.send(slots.reset(payload))
            elif command == "step":
                conn.send(slots.step(*payload))
            else:
                break
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        slots.close()
        conn.close()


class GymnasiumEnv(BatchedEnv):
    name = "gymnasium"

    def __init__(self, num_envs: int, max_steps: int = MAX_EPISODE_STEPS, workers: int = 0):
        super().__init__(num_envs, max_steps)
        self.workers = min(workers, num_envs)
        if self.workers == 0:
            self._local = _Slots(num_envs)
            self._blocks = [range(num_envs)]
            return
        self._local = None
        bounds = np.linspace(0, num_envs, self.workers + 1).astype(int)
        self._blocks = [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        ctx = mp.get_context("spawn")  # no forked torch/OpenMP state in the workers
        self._conns: list[Connection] = []
        self._waiting: dict[int, np.ndarray] = {}  # worker -> slots it is stepping
        self._procs = []
        for block in self._blocks:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, len(block)), daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    def _reset(self, seeds: list[int]) -> np.ndarray:
        if self._local is not None:
            return self._local.reset(seeds)
        for w in list(self._waiting):  # an abandoned step's answer must not pass for the reset's
            self._conns[w].recv()
            del self._waiting[w]
        for conn, block in zip(self._conns, self._blocks):
            conn.send(("reset", [seeds[i] for i in block]))
        return np.concatenate([conn.recv() for conn in self._conns])

    def _step(self, ids: np.ndarray, actions: np.ndarray):
        return self._local.step(list(ids), actions)

    def _send(self, ids: np.ndarray, actions: np.ndarray) -> None:
        """Each worker gets its share of `ids` and starts stepping them at once."""
        if self._local is not None:
            return super()._send(ids, actions)
        for w, (conn, block) in enumerate(zip(self._conns, self._blocks)):
            mine = (ids >= block.start) & (ids < block.stop)
            if mine.any():
                if w in self._waiting:
                    raise ValueError(f"worker {w} already has a step in flight")
                conn.send(("step", (list(ids[mine] - block.start), actions[mine])))
                self._waiting[w] = ids[mine]

    def _recv(self):
        """The block of whichever busy worker finishes first."""
        if self._local is not None:
            return super()._recv()
        ready = wait([self._conns[w] for w in self._waiting])
        w = self._conns.index(ready[0])
        obs, reward, terminated = self._conns[w].recv()
        return self._waiting.pop(w), obs, reward, terminated

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
            return
        for conn in self._conns:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(("close", None))
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
        self._conns, self._procs = [], []
