"""Gymnasium's official CarRacing-v3, the only backend whose scores we report.

It is render-bound (nearly all of a step is Python drawing a 1000×800 frame). Each env skips the
polygons that lie far off screen before Gymnasium's per-polygon work (`make_official_env`): no
pixel changes, and most of that work goes. Its slots are spread over worker processes; each
worker owns a contiguous block of slots and steps only the ones still playing. `workers=0` keeps
everything in this process (tests, debugging).

A worker's slots are sent in two halves. While the caller runs the agent on one half's frames,
the worker is already stepping the other half, queued in its pipe, so it never waits for us.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import warnings
from collections import deque
from multiprocessing.connection import Connection, wait

import numpy as np

from worldmodels.envs.base import MAX_EPISODE_STEPS, BatchedEnv


def ensure_headless_display() -> None:
    """pygame needs a video driver; with no display the dummy one avoids a hang or a crash.
    Its import banner is silenced too: our commands print only their own lines."""
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")


def make_official_env(cull: bool = True):
    """Gymnasium's CarRacing-v3, as `gym.make` builds it. `cull` (the default) skips, before
    gymnasium's own per-polygon work, the grass and road polygons that gymnasium would skip
    itself (wholly outside its box around the screen): they are most of the ~730 a frame, each
    turned into pygame vectors and tested in Python. The frames, rewards and physics stay byte
    for byte the official ones (tests/test_envs.py compares them with `cull=False`; the grass
    grid re-stated here is gymnasium 1.4.0's, the pinned version)."""
    ensure_headless_display()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import gymnasium as gym

        # Our own step limit governs truncation; keep gymnasium's at the official 1000.
        env = gym.make("CarRacing-v3", max_episode_steps=MAX_EPISODE_STEPS)
    if cull:
        _cull_offscreen_polygons(env.unwrapped)
    return env


def _cull_offscreen_polygons(car_racing) -> None:
    """Replace this env's `_render_road` by one that draws the same polygons in the same order
    through gymnasium's own `_draw_colored_polygon`, but only those with a corner within a
    pixel of gymnasium's own bounds, found for all of them at once with numpy. A polygon that
    passes is transformed and tested again, exactly, by gymnasium's method; the one-pixel margin
    only absorbs rounding between numpy's transform and pygame's, so nothing gymnasium would
    draw is skipped."""
    from gymnasium.envs.box2d import car_racing as official

    margin = official.MAX_SHAPE_DIM + 1.0
    x_high, y_high = official.WINDOW_W + margin, official.WINDOW_H + margin
    draw = car_racing._draw_colored_polygon  # the bound official method
    # gymnasium's background square and its checkerboard of grass squares, in its order
    edge, size = official.PLAYFIELD, official.GRASS_DIM
    field = [(edge, edge), (edge, -edge), (-edge, -edge), (-edge, edge)]
    grass = [
        [(size * x + dx, size * y + dy) for dx, dy in ((size, 0), (0, 0), (0, size), (size, size))]
        for x in range(-20, 20, 2)
        for y in range(-20, 20, 2)
    ]
    grass_corners = np.array(grass, dtype=np.float64)
    road: dict = {}  # the track's polygons as gymnasium passes them, rebuilt after a reset

    def near_screen(corners: np.ndarray, zoom, translation, angle) -> np.ndarray:
        # pygame's Vector2.rotate_rad: (x cos a − y sin a, x sin a + y cos a), then zoom, shift
        cos, sin = math.cos(angle) * zoom, math.sin(angle) * zoom
        x, y = corners[..., 0], corners[..., 1]
        px = x * cos - y * sin + translation[0]
        py = x * sin + y * cos + translation[1]
        inside = (px >= -margin) & (px <= x_high) & (py >= -margin) & (py <= y_high)
        return np.flatnonzero(inside.any(axis=1))

    def render_road(zoom, translation, angle) -> None:
        surface = car_racing.surf
        draw(surface, field, car_racing.bg_color, zoom, translation, angle, clip=False)
        for i in near_screen(grass_corners, zoom, translation, angle):
            draw(surface, grass[i], car_racing.grass_color, zoom, translation, angle)
        if road.get("source") is not car_racing.road_poly:
            road["source"] = car_racing.road_poly
            road["polys"] = [[(p[0], p[1]) for p in poly] for poly, _ in car_racing.road_poly]
            road["corners"] = np.array(road["polys"], dtype=np.float64).reshape(-1, 4, 2)
        for i in near_screen(road["corners"], zoom, translation, angle):
            # read now: a tile's colour changes in place when the car first touches it
            color = [int(c) for c in car_racing.road_poly[i][1]]
            draw(surface, road["polys"][i], color, zoom, translation, angle)

    car_racing._render_road = render_road


def official_track_tiles(seeds: list[int]) -> list[int]:
    """Tiles of each official track: a reset builds the track from its seed, so no episode is
    played. Each tile is worth 1000/tiles, which turns a return back into tiles visited."""
    env = make_official_env()
    try:
        counts = []
        for seed in seeds:
            env.reset(seed=seed)
            counts.append(len(env.unwrapped.track))
        return counts
    finally:
        env.close()


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
    def __init__(self, num_envs: int, max_steps: int = MAX_EPISODE_STEPS, workers: int = 0):
        super().__init__(num_envs, max_steps)
        self.workers = min(workers, num_envs)
        if self.workers == 0:
            self._local = _Slots(num_envs)
            return
        self._local = None
        bounds = np.linspace(0, num_envs, self.workers + 1).astype(int)
        self._bounds = bounds  # worker w owns slots bounds[w] .. bounds[w+1]-1
        # each worker's slots in two halves (one if it has a single slot): (worker, slots)
        self._halves = [
            (w, half)
            for w, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))
            for half in np.array_split(np.arange(a, b), min(2, b - a))
        ]
        ctx = mp.get_context("spawn")  # no forked torch/OpenMP state in the workers
        self._conns: list[Connection] = []
        self._queued: list[deque] = [deque() for _ in range(self.workers)]  # slots per request
        self._procs = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, b - a), daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    def _reset(self, seeds: list[int]) -> np.ndarray:
        if self._local is not None:
            return self._local.reset(seeds)
        for conn, queued in zip(self._conns, self._queued):
            while queued:  # an abandoned step's answer must not pass for the reset's
                conn.recv()
                queued.popleft()
        bounds = self._bounds
        for conn, a, b in zip(self._conns, bounds[:-1], bounds[1:]):
            conn.send(("reset", seeds[a:b]))
        return np.concatenate([conn.recv() for conn in self._conns])

    def _step(self, ids: np.ndarray, actions: np.ndarray):
        return self._local.step(list(ids), actions)

    def _send(self, ids: np.ndarray, actions: np.ndarray) -> None:
        """Each half of `ids` goes down its worker's pipe at once; a worker steps its requests
        in the order they came and answers in that order (`send` has checked that no slot is
        in flight twice)."""
        if self._local is not None:
            return super()._send(ids, actions)
        for w, half in self._halves:
            mine = (ids >= half[0]) & (ids <= half[-1])
            if mine.any():
                local = list(ids[mine] - self._bounds[w])
                self._conns[w].send(("step", (local, actions[mine])))
                self._queued[w].append(ids[mine])

    def _recv(self):
        """Every answer already back, or else the first one to come: the caller then runs V
        and M once on all of them, not once per half."""
        if self._local is not None:
            return super()._recv()
        busy = [conn for conn, queued in zip(self._conns, self._queued) if queued]
        wait(busy)
        parts = []
        for conn, queued in zip(self._conns, self._queued):
            while queued and conn.poll():
                parts.append((queued.popleft(), *conn.recv()))
        ids, obs, reward, terminated = (np.concatenate(p) for p in zip(*parts))
        order = np.argsort(ids)
        return ids[order], obs[order], reward[order], terminated[order]

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
