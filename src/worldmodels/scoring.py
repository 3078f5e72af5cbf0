"""How the controller search scores what it tries: candidates on shared training tracks, the
CMA-ES mean on fixed held-out tracks (the check), and the final choice among checked means.

Every candidate of a generation plays the same tracks (common random seeds, fresh each
generation), so candidates are compared on equal terms. The kept agent is a CMA-ES *mean*: a
best single candidate, ranked on a couple of noisy tracks, scored far worse in calibration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from worldmodels.agent import Agent
from worldmodels.evaluators import Evaluator, Played
from worldmodels.models import controller_param_count
from worldmodels.search import Checked
from worldmodels.seeds import first

TRAIN_SEED_BASE = first("train")  # tracks for training: generation g plays base + g*rollouts + r
EXTRA_TRAIN_SEED_BASE = first("train_extra")  # its tracks beyond --rollouts (--max-rollouts)
CHECK_SEED_BASE = first("check")  # fixed held-out tracks for the periodic check of the mean
SELECT_SEED_BASE = first("select")  # fresh held-out tracks for the final choice among means


@dataclass
class Venues:
    """Where each generation plays: in the dream for the first `dream_generations` (all of them
    with --env dream), in the real env after. Checks and the selection play where training
    ends, so a dream-then-real run keeps only means checked on real tracks."""

    real: Evaluator | None
    dream: Evaluator | None
    dream_generations: int

    def training(self, generation: int) -> Evaluator:
        in_dream = self.real is None or generation <= self.dream_generations
        return self.dream if in_dream else self.real

    def checking(self, generation: int) -> Evaluator | None:
        if self.real is not None and generation <= self.dream_generations:
            return None
        return self.training(generation)

    def selecting(self) -> Evaluator:
        return self.real or self.dream

    def close(self) -> None:
        for evaluator in (self.real, self.dream):
            if evaluator is not None:
                evaluator.close()


H_SIGMA_SCALE = 0.1  # the default std of the weights on h, relative to those on z


def initial_stds(agent: Agent, h_sigma_scale: float = H_SIGMA_SCALE) -> np.ndarray:
    """Per-parameter initial std: 1 for z-weights and biases, `h_sigma_scale` for h-weights.

    h has eight times z's dims; with one σ for all weights the h-term swamps the z-term and
    training stalls near its start.
    """
    n = controller_param_count(agent.input_dim)
    stds = np.ones(n)
    if not agent.z_only:
        z_dim = agent.vae.z_dim
        for row in range(3):
            start = row * agent.input_dim
            stds[start + z_dim : start + agent.input_dim] = h_sigma_scale
    return stds


def rollouts_at(sigma: float, sigma0: float, rollouts: int, max_rollouts: int) -> int:
    """Episodes per candidate when CMA-ES's step size is `sigma`: `rollouts` at the start, growing
    as sqrt(sigma0 / sigma) up to `max_rollouts` (0 = never grow). Late candidates differ from
    each other by less than one track's luck, so they need more tracks to be told apart."""
    if not max_rollouts:
        return rollouts
    grown = int(round(rollouts * math.sqrt(sigma0 / sigma)))
    return min(max_rollouts, max(rollouts, grown))


def training_tracks(generation: int, count: int, rollouts: int, max_rollouts: int) -> list[int]:
    """The `count` tracks every candidate of `generation` plays. The first `rollouts` are the
    same whatever `max_rollouts` is (a run that grows equals the plain one until it grows); the
    extra ones come from a range of their own."""
    base = [TRAIN_SEED_BASE + generation * rollouts + r for r in range(rollouts)]
    extra_stride = max(0, max_rollouts - rollouts)
    start = EXTRA_TRAIN_SEED_BASE + generation * extra_stride
    return (base + [start + r for r in range(extra_stride)])[:count]


def evaluate_candidates(
    evaluator: Evaluator,
    candidates: np.ndarray,
    seeds: list[int],
    early_stop: int,
    lap_bonus: float = 0.0,
) -> tuple[np.ndarray, Played]:
    """Mean fitness per candidate over the same `seeds` (return, plus `lap_bonus` for each
    finished lap), and what was played."""
    count, repeats = len(candidates), len(seeds)
    played = evaluator.play(np.repeat(candidates, repeats, axis=0), seeds * count, early_stop)
    fitness = played.returns + lap_bonus * played.laps
    return fitness.reshape(count, repeats).mean(axis=1), played


def check_mean(
    evaluator: Evaluator, mean: np.ndarray, episodes: int, steps: int
) -> tuple[float, float]:
    """The CMA-ES mean on fixed held-out tracks, no early stop: the learning curve we trust."""
    seeds = [CHECK_SEED_BASE + i for i in range(episodes)]
    returns = evaluator.play(np.tile(mean, (len(seeds), 1)), seeds, 0, steps).returns
    return float(returns.mean()), float(returns.std())


def select_mean(
    evaluator: Evaluator, checked: list[Checked], top: int, episodes: int, steps: int
) -> dict:
    """The checked mean that plays best on fresh held-out tracks, among the `top` best checks.

    The mean wanders as training goes on (its check swings by hundreds of points over the last
    generations of a run), so the last one is a lottery ticket. The finalists are ranked by
    tracks that played no part in picking them, so the winner's score is not inflated by the
    luck that made it a finalist.
    """
    finalists = sorted(checked, key=lambda c: c.check_mean, reverse=True)[:top]
    seeds = [SELECT_SEED_BASE + i for i in range(episodes)]
    vectors = np.stack([f.vector for f in finalists])
    returns = evaluator.play(
        np.repeat(vectors, len(seeds), axis=0), seeds * len(finalists), 0, steps
    )
    scores = returns.returns.reshape(len(finalists), len(seeds))
    winner = int(scores.mean(axis=1).argmax())
    return {
        "generation": finalists[winner].generation,
        "episodes": len(seeds),
        "seeds": [seeds[0], seeds[-1]],
        "finalists": [
            {
                "generation": f.generation,
                "search": f.search,
                "check_mean": f.check_mean,
                "select_mean": float(score.mean()),
                "select_std": float(score.std()),
            }
            for f, score in zip(finalists, scores)
        ],
        "vector": finalists[winner].vector,
    }
