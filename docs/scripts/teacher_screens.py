"""Variants of the road start's pixel teacher, screened by driving on their own
(docs/experiments.md, "Ten more minutes for the search": the screens before it).

    python docs/scripts/teacher_screens.py bend-gas 0.08 0.2 2    # gas from the far strip's bend
    python docs/scripts/teacher_screens.py bend-brake 0.2 0.1 0.3 # gas on straights, brake in bends
    python docs/scripts/teacher_screens.py fallback 30:50 0        # when no road is ahead, steer
                                                                    # toward road anywhere in view
                                                                    # (else by the last number)

Every variant steers like the follower of `road_follower.py` (clip(2 × the road centre's
offset in rows 30–50, or the rows given), no brake unless said) and drives the same 48 envpool
tracks 200000–200047 through the project's one episode loop.
"""

import sys

import numpy as np

import worldmodels.warm_start as warm_start
from worldmodels.envs import make_env
from worldmodels.policies import PolicyActor, road_heading
from worldmodels.rollout import run_episodes

TRACKS = 48
NEAR = slice(30, 50)
FAR = slice(10, 30)  # the bend ahead
VIEW = slice(0, 84)  # everything above the dashboard


def offset(frames: np.ndarray, rows: slice) -> tuple[np.ndarray, np.ndarray]:
    return road_heading(frames, rows, warm_start.MIN_ROAD_PIXELS)


class Teacher:
    def __init__(self, mode: str, args: list[str]):
        self.mode, self.args = mode, args
        self.near = NEAR
        if mode == "fallback":
            start, stop = (int(r) for r in args[0].split(":"))
            self.near = slice(start, stop)

    def act(self, frames: np.ndarray, ids: np.ndarray) -> np.ndarray:
        near, seen = offset(frames, self.near)
        steer = np.clip(2 * near, -1, 1)
        gas, brake = np.full(len(ids), 0.1), np.zeros(len(ids))
        far, far_seen = offset(frames, FAR)
        bend = np.where(far_seen, np.abs(far), 1.0)
        if self.mode == "bend-gas":  # gas from gmin (bend ≥ 1/k) to gmax (straight)
            gmin, gmax, k = (float(a) for a in self.args)
            gas = gmin + (gmax - gmin) * np.clip(1 - k * bend, 0, 1)
        elif self.mode == "bend-brake":  # gas on straights, brake in sharp bends
            fast, straight, sharp = (float(a) for a in self.args)
            gas = np.where(bend < straight, fast, 0.0)
            brake = np.where(bend > sharp, 0.3, 0.0)
        if self.mode == "fallback":
            wide, wide_seen = offset(frames, VIEW)
            lost = float(self.args[1])
            steer = np.where(seen, steer, np.where(wide_seen, np.clip(2 * wide, -1, 1), lost))
        else:
            steer = np.where(seen, steer, 0.0)
        return np.stack([steer, gas, brake], axis=1).astype(np.float32)


if __name__ == "__main__":
    teacher = Teacher(sys.argv[1], sys.argv[2:])
    with make_env("envpool", TRACKS, lockstep=True) as env:
        seeds = list(range(200_000, 200_000 + TRACKS))
        played = run_episodes(env, PolicyActor(teacher), np.zeros((TRACKS, 0)), seeds)
    returns = played.returns
    print(
        f"{' '.join(sys.argv[1:])}: {returns.mean():.0f} ± {returns.std():.0f} on {TRACKS} "
        f"tracks, worst {returns.min():.0f}, laps {played.laps.mean():.0%}"
    )
