"""The one episode loop: controller training, evaluation and play all run episodes through it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from worldmodels.agent import Agent
from worldmodels.envs import BatchedEnv, Stepped

TIME_PENALTY = 0.1  # CarRacing charges 0.1 per frame
OFF_PLAYFIELD = -100.0  # and this on the step a car leaves the playfield (which ends it)


@dataclass
class RolloutResult:
    returns: np.ndarray  # (N,) float64, early-stop charge included
    steps: np.ndarray  # (N,) steps actually played
    terminated: np.ndarray  # (N,) bool
    stopped_early: np.ndarray  # (N,) bool
    env_steps: int  # env steps actually simulated (for steps/s)
    laps: np.ndarray  # (N,) bool: ended because every tile was visited (not off the playfield)


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
    last_reward = np.zeros(n)
    stopped = np.zeros(n, dtype=bool)
    simulated = 0
    ids = np.arange(n)
    env.send(ids, agent.act(obs, params, ids))
    while env.in_flight.any():
        got = env.recv()
        ids = got.ids
        simulated += len(ids)
        returns[ids] += got.reward
        last_reward[ids] = got.reward
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
    laps = env.terminated & (last_reward > OFF_PLAYFIELD / 2)
    return RolloutResult(returns, env.steps.copy(), env.terminated.copy(), stopped, simulated, laps)


class Recorder:
    """Stands in for the actor in `run_episodes` and keeps what each slot saw and did.

    Frames are kept as `keep(frames)` makes them (e.g. V's 64×64 crops), one row per step, the
    actions beside them; `last_frames` adds the frame after a slot's last step, which no actor
    ever sees. collect records its episodes this way, dream the agent's drives.
    """

    def __init__(self, actor, slots: int, max_steps: int, keep: Callable[[np.ndarray], np.ndarray]):
        self.actor = actor
        self.keep = keep
        self.max_steps = max_steps
        self.taken = np.zeros(slots, dtype=np.int64)  # actions chosen so far, per slot
        self.frames: np.ndarray | None = None  # (slots, max_steps + 1, *kept frame)
        self.actions: np.ndarray | None = None  # (slots, max_steps, action size)

    def reset(self, num_envs: int) -> None:
        self.actor.reset(num_envs)
        self.taken[:] = 0

    def act(self, frames: np.ndarray, params: torch.Tensor, ids: np.ndarray) -> np.ndarray:
        actions = self.actor.act(frames, params, ids)
        kept = self.keep(frames)
        if self.frames is None:
            slots = len(self.taken)
            self.frames = np.empty((slots, self.max_steps + 1, *kept.shape[1:]), kept.dtype)
            self.actions = np.zeros((slots, self.max_steps, actions.shape[1]), np.float32)
        steps = self.taken[ids]
        self.frames[ids, steps] = kept
        self.actions[ids, steps] = actions
        self.taken[ids] += 1
        return actions

    def last_frames(self, ids: np.ndarray, frames: np.ndarray) -> None:
        if len(ids):
            self.frames[ids, self.taken[ids]] = self.keep(frames)

    def episode(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """(frames (T+1, ...), actions (T, A)) of a finished slot, as copies."""
        steps = int(self.taken[slot])
        return self.frames[slot, : steps + 1].copy(), self.actions[slot, :steps].copy()
