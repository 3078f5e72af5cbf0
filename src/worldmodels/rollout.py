"""The one episode loop: controller training, evaluation and play all run episodes through it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from worldmodels.agent import Agent
from worldmodels.envs import BatchedEnv, Stepped

TIME_PENALTY = 0.1  # CarRacing charges 0.1 per frame


@dataclass
class RolloutResult:
    returns: np.ndarray  # (N,) float64, early-stop charge included
    steps: np.ndarray  # (N,) steps actually played
    terminated: np.ndarray  # (N,) bool
    stopped_early: np.ndarray  # (N,) bool
    env_steps: int  # env steps actually simulated (for steps/s)


def run_episodes(
    env: BatchedEnv,
    agent: Agent,
    params: torch.Tensor,
    seeds: Sequence[int],
    early_stop: int = 0,
    on_step: Callable[[Stepped], None] | None = None,
) -> RolloutResult:
    """Play one episode per slot, slot i with controller `params[i]` on track `seeds[i]`.

    Slots are served as their steps come back (`env.recv`): with Gymnasium's worker processes a
    worker that finishes first gets its next actions at once instead of waiting for the slowest.
    `early_stop` > 0 stops an episode after that many consecutive steps without a positive
    reward (the car is off the track or stuck) and charges it honestly: the 0.1 a frame it
    would at least have lost for every remaining step, as if it never found a tile again.
    `on_step(stepped)` sees every step (GIFs, the live window, progress bars).
    """
    n = env.num_envs
    obs = env.reset(seeds)
    agent.reset(n)
    returns = np.zeros(n)
    since_reward = np.zeros(n, dtype=np.int64)
    stopped = np.zeros(n, dtype=bool)
    simulated = 0
    ids = np.arange(n)
    env.send(ids, agent.act(obs, params, ids))
    while env.in_flight.any():
        got = env.recv()
        ids = got.ids
        simulated += len(ids)
        returns[ids] += got.reward
        if on_step is not None:
            on_step(got)
        if early_stop > 0:
            since_reward[ids] = np.where(got.reward > 0, 0, since_reward[ids] + 1)
            hopeless = ids[env.active[ids] & (since_reward[ids] >= early_stop)]
            if len(hopeless):
                returns[hopeless] -= TIME_PENALTY * (env.max_steps - env.steps[hopeless])
                stopped[hopeless] = True
                env.stop(np.isin(np.arange(n), hopeless))
        playing = env.active[ids]
        if playing.any():
            live = ids[playing]
            env.send(live, agent.act(got.obs[playing], params[live], live))
    return RolloutResult(returns, env.steps.copy(), env.terminated.copy(), stopped, simulated)
