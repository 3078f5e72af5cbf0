"""Which tiles a run's kept controller misses on official tracks, and where along the lap
(docs/experiments.md, "Where the runs on the faster machine lose their points").

    python docs/scripts/missed_tiles.py runs/seed7 1000003 1000010

For each track: its return, the tiles missed, how many of them lie behind the last tile the car
reached (skipped: in corners it cut) and how many lie beyond it (not reached in 1000 steps).
The car acts as in `evaluate` (one car, the kept mean, V, M and C in this process).
"""

import sys
from pathlib import Path

import numpy as np
import torch

from worldmodels.artifacts import load_controller, load_world_model
from worldmodels.envs.gymnasium_backend import make_official_env


def main(run: Path, seeds: list[int]) -> None:
    agent = load_world_model(run)
    params, _ = load_controller(run)
    env = make_official_env()
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        agent.reset(1)
        total, done, step = 0.0, False, 0
        tiles = env.unwrapped.road
        first_visit = [None] * len(tiles)  # the step each tile was first visited
        while not done:
            action = agent.act(obs[None], params[None])[0]
            obs, reward, terminated, truncated, _ = env.step(action.astype(np.float64))
            total, step = total + reward, step + 1
            done = terminated or truncated
            for i, tile in enumerate(tiles):
                if tile.road_visited and first_visit[i] is None:
                    first_visit[i] = step
        # the car starts on tile 0 and may touch the last ones behind it in its first steps
        reached = max(i for i, s in enumerate(first_visit) if s is not None and s > 10)
        missed = [i for i, s in enumerate(first_visit) if s is None]
        skipped = sum(1 for i in missed if i < reached)
        print(
            f"track {seed}: {total:.1f}, {len(missed)} of {len(tiles)} tiles missed: "
            f"{skipped} skipped behind the farthest tile reached ({reached}), "
            f"{len(missed) - skipped} beyond it; missed: {missed}"
        )


if __name__ == "__main__":
    with torch.inference_mode():
        main(Path(sys.argv[1]), [int(s) for s in sys.argv[2:]])
