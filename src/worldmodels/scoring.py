"""How the controller search scores what it tries: candidates on shared training tracks, the
CMA-ES mean on fixed held-out tracks (the check), and the final choice among checked means.

Every candidate of a generation plays the same tracks (common random seeds, fresh each
generation), so candidates are compared on equal terms. The kept agent is a CMA-ES *mean*: a
best single candidate, ranked on a couple of noisy tracks, scored far worse in calibration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worldmodels.agent import Agent
from worldmodels.data.latents import load_latents, open_latents
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
INPUT_STATS_EPISODES = 50  # recorded episodes that measure the inputs' scale


def initial_stds(
    agent: Agent, h_sigma_scale: float = H_SIGMA_SCALE, rms: np.ndarray | None = None
) -> np.ndarray:
    """Per-parameter initial std: 1 for z-weights and biases, `h_sigma_scale` for h-weights.

    h has eight times z's dims; with one σ for all weights the h-term swamps the z-term and
    training stalls near its start. Given `rms`, the root mean square of each input, a weight's
    std is divided by its input's rms relative to its group's (z or h), so every input moves
    the actions by the same amount at the start: a unit of h that barely varies gets steps big
    enough to matter, one that swings gets smaller ones, and each group's total stays the same.
    """
    per_input = np.ones(agent.input_dim)
    z_dim = agent.vae.z_dim
    per_input[z_dim:] = h_sigma_scale
    if rms is not None:
        for group in (slice(0, z_dim), slice(z_dim, agent.input_dim)):
            if group.start == group.stop:  # --z-only: no h
                continue
            part = np.maximum(rms[group], 1e-3)
            per_input[group] *= np.sqrt(np.mean(part**2)) / part
    n = controller_param_count(agent.input_dim)
    stds = np.ones(n)
    stds[: 3 * agent.input_dim] = np.tile(per_input, 3)
    return stds


def input_rms(agent: Agent, latents: Path, episodes: int = INPUT_STATS_EPISODES) -> np.ndarray:
    """Root mean square of each controller input [z; h] along recorded episodes (h from M run
    over them), for `initial_stds`."""
    rows = []
    with torch.inference_mode():
        for entry in open_latents(latents, episodes):
            ep = load_latents(latents / entry.file)
            z = torch.from_numpy(ep.mu[:-1]).unsqueeze(0)
            if agent.z_only:
                rows.append(z[0])
                continue
            h = agent.mdnrnn.states_before(z, torch.from_numpy(ep.actions)[None])
            rows.append(torch.cat([z, h], dim=-1)[0])
    return torch.cat(rows).pow(2).mean(0).sqrt().numpy()


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


def adds_centroid(finalists: int, centroid: bool) -> bool:
    """Whether a selection among `finalists` also plays their average (one finalist has none)."""
    return centroid and finalists > 1


def select_mean(
    evaluator: Evaluator,
    checked: list[Checked],
    top: int,
    episodes: int,
    steps: int,
    centroid: bool = False,
) -> dict:
    """The checked mean that plays best on fresh held-out tracks, among the `top` best checks
    (and, with `centroid`, their average as one more finalist).

    The mean wanders as training goes on (its check swings by hundreds of points over the last
    generations of a run), so the last one is a lottery ticket. The finalists are ranked by
    tracks that played no part in picking them, so the winner's score is not inflated by the
    luck that made it a finalist. Their average cancels part of that wander, as averaging the
    weights along a run does for networks trained by gradient descent.
    """
    finalists = sorted(checked, key=lambda c: c.check_mean, reverse=True)[:top]
    entries = [{"generation": f.generation, "search": f.search, "check_mean": f.check_mean}
               for f in finalists]  # fmt: skip
    vectors = [f.vector for f in finalists]
    if adds_centroid(len(finalists), centroid):
        entries.append(
            {
                "generation": max(f.generation for f in finalists),
                "search": finalists[0].search,
                "check_mean": None,
                "centroid_of": [f.generation for f in finalists],
            }
        )
        vectors.append(np.mean(vectors, axis=0))
    seeds = [SELECT_SEED_BASE + i for i in range(episodes)]
    returns = evaluator.play(
        np.repeat(np.stack(vectors), len(seeds), axis=0), seeds * len(vectors), 0, steps
    )
    scores = returns.returns.reshape(len(vectors), len(seeds))
    winner = int(scores.mean(axis=1).argmax())
    for entry, score in zip(entries, scores):
        entry |= {"select_mean": float(score.mean()), "select_std": float(score.std())}
    return {
        "generation": entries[winner]["generation"],
        "winner": winner,
        "episodes": len(seeds),
        "seeds": [seeds[0], seeds[-1]],
        "finalists": entries,
        "vector": vectors[winner],
    }
