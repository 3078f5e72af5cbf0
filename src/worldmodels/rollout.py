"""The one episode loop: controller training, evaluation and play all run episodes through it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from worldmodels.agent import Agent
from worldmodels.envs import BatchedEnv, StepResult

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
    on_step: Callable[[StepResult, np.ndarray], None] | None = None,
) -> RolloutResult:
    """Play one episode per slot, slot i with controller `params[i]` on track `seeds[i]`.

    `early_stop` > 0 stops an episode after that many consecutive steps without a positive
    reward (the car is off the track or stuck) and charges it honestly: the 0.1 a frame it
    would at least have lost for every remaining step, as if it never found a tile again.
    `on_step(result, actions)` sees every step (GIFs, the live window).
    """
    n = env.num_envs
    obs = env.reset(seeds)
    agent.reset(n)
    returns = np.zeros(n)
    since_reward = np.zeros(n, dtype=np.int64)
    stopped = np.zeros(n, dtype=bool)
    actions = np.zeros((n, 3), np.float32)
    simulated = 0
    while not env.done:
        ids = np.flatnonzero(env.active)
        actions[ids] = agent.act(obs[ids], params[ids], ids)
        result = env.step(actions)
        simulated += len(ids)
        obs = result.obs
        returns += result.reward
        if on_step is not None:
            on_step(result, actions)
        if early_stop > 0:
            since_reward[ids] = np.where(result.reward[ids] > 0, 0, since_reward[ids] + 1)
            hopeless = env.active & (since_reward >= early_stop)
            if hopeless.any():
                returns[hopeless] -= TIME_PENALTY * (env.max_steps - env.steps[hopeless])
                stopped |= hopeless
                env.stop(hopeless)
    return RolloutResult(returns, env.steps.copy(), env.terminated.copy(), stopped, simulated)
