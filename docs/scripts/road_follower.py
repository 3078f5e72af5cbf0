"""How well the road start's teacher and its fitted first mean drive, before any search
(docs/experiments.md, "A farther look-ahead").

    python docs/scripts/road_follower.py follower 40:66 30:50      # the pixel follower itself
    python docs/scripts/road_follower.py first-mean RUN 40:66 30:50  # the fit on RUN's V, no search

`follower`: the road follower (steer = clip(2 × the road centre's offset in rows START:STOP of
the 96-row frame), gas 0.1, no brake) drives N (env N, default 48) envpool tracks 200000.. by
pixels alone. `first-mean`: the road start fitted with those rows on RUN's recorded frames and
V, played on the training env's N (default 32) check tracks. Same tracks for every strip, so
the strips compare paired.
"""

import os
import sys
from pathlib import Path

import numpy as np

import worldmodels.warm_start as warm_start
from worldmodels.envs import MAX_EPISODE_STEPS, make_env
from worldmodels.policies import PolicyActor, road_heading
from worldmodels.rollout import run_episodes


class Follower:
    """Steer toward the road centre in `rows`, hold `gas`, never brake (no memory)."""

    def __init__(self, rows: slice, gain: float = 2.0, gas: float = 0.1):
        self.rows, self.gain, self.gas = rows, gain, gas

    def act(self, frames: np.ndarray, ids: np.ndarray) -> np.ndarray:
        offset, seen = road_heading(frames, self.rows, warm_start.MIN_ROAD_PIXELS)
        steer = np.where(seen, np.clip(self.gain * offset, -1, 1), 0.0)
        gas, brake = np.full(len(ids), self.gas), np.zeros(len(ids))
        return np.stack([steer, gas, brake], axis=1).astype(np.float32)


def follower(rows: slice, tracks: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns and which laps finished, through the project's one episode loop."""
    with make_env("envpool", tracks, lockstep=True) as env:
        seeds = list(range(200_000, 200_000 + tracks))
        played = run_episodes(env, PolicyActor(Follower(rows)), np.zeros((tracks, 0)), seeds)
    return played.returns, played.laps


def first_mean(run: Path, rows: slice, tracks: int) -> tuple[np.ndarray, np.ndarray]:
    from worldmodels.artifacts import load_world_model
    from worldmodels.evaluators import EpisodeSettings, make_evaluator
    from worldmodels.runtime import use_acting_threads
    from worldmodels.scoring import CHECK_SEED_BASE
    from worldmodels.stages.train_controller import TrainControllerConfig, _first_mean

    use_acting_threads("cpu")
    warm_start.AHEAD_ROWS = rows
    agent = load_world_model(run, "cpu", False)
    mean = _first_mean(TrainControllerConfig(run_dir=run, start="road"), agent)
    evaluator = make_evaluator("local", agent, EpisodeSettings("envpool", MAX_EPISODE_STEPS))
    seeds = [CHECK_SEED_BASE + i for i in range(tracks)]
    played = evaluator.play(np.tile(mean, (tracks, 1)), seeds, 0, MAX_EPISODE_STEPS)
    return played.returns, played.laps


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    run = Path(args.pop(0)) if mode == "first-mean" else None
    tracks = int(os.environ.get("N", 48 if run is None else 32))
    for spec in args:
        start, stop = (int(row) for row in spec.split(":"))
        rows = slice(start, stop)
        returns, laps = follower(rows, tracks) if run is None else first_mean(run, rows, tracks)
        print(
            f"rows {start}-{stop}: {returns.mean():.0f} ± {returns.std():.0f} on {tracks} "
            f"tracks, worst {returns.min():.0f}, laps {laps.mean():.0%}",
            flush=True,
        )
