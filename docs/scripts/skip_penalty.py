"""One `worldmodels` command whose training fitness charges every tile a lap left unvisited
(docs/experiments.md, "The zero start on a faster machine; skipped tiles in the fitness").

    python docs/scripts/skip_penalty.py 10 30 train-controller --run-dir ARM ...

The kept cars cut the apex of sharp bends and skip 10-20 tiles a lap. The return charges such a
tile ~3.4 points plus the lap's early end, which two training tracks cannot tell from track luck.
Here a training episode (one played with an early stop; checks, selection and evaluation play
without one and keep the plain return) whose lap did not finish loses PENALTY points for each
tile it left unvisited, at most CAP tiles. EnvPool says nothing about tiles, so they are counted
from the rewards: a step that visits k new tiles earns k * 1000 / N - 0.1 on a track of N tiles.
"""

import sys

import numpy as np

import worldmodels.evaluators as evaluators
from worldmodels.rollout import TIME_PENALTY, run_episodes

PENALTY, CAP = 0.0, 0


def tiles_left(tile_rewards: list[list[float]]) -> np.ndarray:
    """Tiles never visited per slot. The median tile reward of a step is one tile's, 1000 / N
    (a few steps visit two tiles, and a rare step's reward is off by a fraction of a tile); a
    slot that visited none is charged CAP."""
    left = np.full(len(tile_rewards), float(CAP))
    for slot, rewards in enumerate(tile_rewards):
        if rewards:
            unit = float(np.median(rewards))
            visited = np.round(np.asarray(rewards) / unit).sum()
            left[slot] = max(0.0, round(1000.0 / unit) - visited)
    return left


def charged_run_episodes(env, agent, params, seeds, early_stop=0, on_step=None):
    if early_stop == 0 or PENALTY == 0:
        return run_episodes(env, agent, params, seeds, early_stop=early_stop, on_step=on_step)
    tile_rewards: list[list[float]] = [[] for _ in range(env.num_envs)]

    def count(got):
        for slot, reward in zip(got.ids[got.reward > 0], got.reward[got.reward > 0]):
            tile_rewards[slot].append(float(reward) + TIME_PENALTY)
        if on_step is not None:
            on_step(got)

    result = run_episodes(env, agent, params, seeds, early_stop=early_stop, on_step=count)
    left = np.minimum(tiles_left(tile_rewards), CAP)
    result.returns = result.returns - PENALTY * np.where(result.laps, 0.0, left)
    return result


if __name__ == "__main__":
    PENALTY, CAP = float(sys.argv[1]), int(sys.argv[2])
    evaluators.run_episodes = charged_run_episodes
    print(
        f"training episodes charged {PENALTY} a tile left unvisited, at most {CAP} tiles",
        file=sys.stderr,
    )
    from worldmodels.cli import main

    sys.exit(main(sys.argv[3:]))
