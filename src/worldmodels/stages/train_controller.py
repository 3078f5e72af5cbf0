"""`worldmodels train-controller`: CMA-ES over the linear controller, population in one env pool.

Each generation evaluates the whole population at once: pop × rollouts env slots, slot i driven
by its own candidate, so V and M run once per step for everyone. Every candidate sees the same
tracks (common random seeds, fresh each generation), so candidates are compared fairly. The
agent we keep is a CMA-ES *mean*: a best single candidate, ranked on a couple of noisy tracks,
scored far worse in calibration.

Which mean: the mean wanders as training goes on (its held-out check swung between 520 and 860
over the last 50 generations of one run), so the last one is a lottery ticket. Every checked mean
is kept; at the end the few with the best checks play fresh held-out tracks, and the best of them
on those tracks (which played no part in picking the finalists) is the agent.

With `--searches 2`, two independent searches play side by side until `--cull-after`, then only
the one with the better recent checks goes on (`worldmodels.search`, which also holds the state
that resumes a run: plain JSON, never a pickle).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worldmodels.agent import Agent
from worldmodels.artifacts import load_world_model, world_model_sources
from worldmodels.checkpoint import save_model
from worldmodels.config import option, require_same_settings, save_config
from worldmodels.envs import BACKENDS, MAX_EPISODE_STEPS
from worldmodels.errors import UserError
from worldmodels.evaluators import BACKENDS as EVALUATOR_BACKENDS
from worldmodels.evaluators import (
    EpisodeSettings,
    LocalEvaluator,
    Played,
    RayEvaluator,
    make_evaluator,
)
from worldmodels.io import atomic_write_text
from worldmodels.layout import RunDir, writable_dir
from worldmodels.metrics import MetricsLog
from worldmodels.models import LinearController, controller_param_count
from worldmodels.progress import log, progress_bar
from worldmodels.runtime import use_acting_threads
from worldmodels.search import Checked, SearchSettings, SearchState
from worldmodels.seeds import first, require_within

ES_STATE = "es_state.json"
PICKLED_STATE = "es_state.pkl"  # what versions before 0.2 wrote; never read (pickle runs code)
TRAIN_SEED_BASE = first("train")  # tracks for training: generation g plays base + g*rollouts + r
CHECK_SEED_BASE = first("check")  # fixed held-out tracks for the periodic check of the mean
SELECT_SEED_BASE = first("select")  # fresh held-out tracks for the final choice among means
SELECTION = "selection.json"
# Settings that define the search being resumed; changing them needs --force or a new run dir.
_IDENTITY = (
    "population",
    "rollouts",
    "sigma0",
    "diagonal",
    "h_sigma_scale",
    "max_steps",
    "early_stop",
    "lap_bonus",
    "env",
    "z_only",
    "seed",
    "check_episodes",
    "check_steps",
    "deterministic",
    "searches",
    "cull_after",
)


@dataclass
class TrainControllerConfig:
    run_dir: Path = option(
        Path("runs/default"), "run directory with trained V (vae/) and M (mdnrnn/)"
    )
    generations: int = option(40, "CMA-ES generations")
    population: int = option(16, "candidates per generation")
    rollouts: int = option(2, "episodes per candidate per generation (same tracks for all)")
    sigma0: float = option(0.1, "initial CMA-ES step size")
    searches: int = option(
        1,
        "independent CMA-ES searches run side by side until --cull-after; then only the one "
        "whose last two checks average best goes on (same-seed runs ended 175 points apart)",
    )
    cull_after: int = option(
        20, "generation after which all searches but the best stop (with --searches > 1)"
    )
    diagonal: bool = option(
        False,
        "separable CMA-ES: learn a diagonal covariance (its learning rate is ~n/3 times the full "
        "one's, which at n=867 barely moves in 100 generations)",
    )
    h_sigma_scale: float = option(0.1, "initial std of the weights on h relative to those on z")
    max_steps: int = option(
        MAX_EPISODE_STEPS,
        "step limit of training episodes: shorter ones see more tracks per minute and reward "
        "speed more (a car twice as fast gains twice the tiles, not a few points at the lap end)",
    )
    check_steps: int = option(
        MAX_EPISODE_STEPS,
        "step limit of the periodic check and of the final selection (evaluation's is 1000)",
    )
    early_stop: int = option(100, "stop an episode after this many steps without reward (0 = off)")
    lap_bonus: float = option(
        0.0,
        "added to a training episode's fitness when its lap finished (every tile visited): a "
        "missed tile costs only ~3 points of return but the lap, and 900 needs every lap; "
        "checks, selection and evaluation score the plain return",
    )
    env: str = option("envpool", "env backend for training episodes", BACKENDS)
    workers: int = option(0, "envpool threads or gymnasium processes (0 = one per core)")
    backend: str = option(
        "local",
        "where a generation's episodes run: one env pool in this process, or Ray tasks",
        EVALUATOR_BACKENDS,
    )
    ray_address: str = option(
        "", "Ray cluster to join (e.g. auto or ray://host:10001); empty = start a local Ray"
    )
    ray_chunks: int = option(0, "Ray tasks per generation (0 = one per ray-cpus-per-task CPUs)")
    ray_cpus_per_task: int = option(1, "CPUs per Ray task (its env threads and torch threads)")
    ray_timeout_min: float = option(
        30.0, "give up (in one line; a rerun resumes) when a batch of Ray tasks takes longer"
    )
    z_only: bool = option(False, "controller sees z only, not the memory h (the paper's ablation)")
    seed: int = option(0, "CMA-ES seed; training tracks are 100000 + generation*rollouts + r")
    check_every: int = option(
        5, "evaluate the CMA-ES mean on fixed held-out tracks every N generations (0 = never)"
    )
    check_episodes: int = option(8, "episodes of that periodic check")
    select_top: int = option(
        4,
        "at the end, the N checked means with the best checks play fresh held-out tracks and the "
        "best there is kept (0 = keep the last mean)",
    )
    select_episodes: int = option(24, "episodes per finalist in that final selection")
    time_budget_min: float = option(
        0.0, "stop after this many minutes, the final selection included (0 = no limit)"
    )
    deterministic: bool = option(
        False,
        "reproducible to the bit: all envs step in lockstep (so V and M always see the same "
        "batches) and the run is as long as --generations, never a time budget; slower",
    )
    device: str = option("cpu", "torch device for V and M")
    force: bool = option(False, "start over, discarding the saved optimizer state")

    def validate(self) -> None:
        if self.population < 2 or self.rollouts < 1 or self.generations < 0:
            raise UserError("need --population >= 2, --rollouts >= 1, --generations >= 0")
        if not (
            1 <= self.max_steps <= MAX_EPISODE_STEPS and 1 <= self.check_steps <= MAX_EPISODE_STEPS
        ):
            raise UserError(f"--max-steps and --check-steps must be in 1..{MAX_EPISODE_STEPS}")
        if self.sigma0 <= 0:
            raise UserError("--sigma0 must be > 0")
        if self.ray_chunks < 0 or self.ray_cpus_per_task < 1 or self.ray_timeout_min <= 0:
            raise UserError(
                "need --ray-chunks >= 0, --ray-cpus-per-task >= 1 and --ray-timeout-min > 0"
            )
        if self.select_top < 0 or (self.select_top and self.select_episodes < 1):
            raise UserError("need --select-top >= 0 and, with it, --select-episodes >= 1")
        if self.check_every < 0 or (self.check_every and self.check_episodes < 1):
            raise UserError("need --check-every >= 0 and, with it, --check-episodes >= 1")
        if self.searches < 1:
            raise UserError("--searches must be >= 1")
        if self.searches > 1 and not (self.check_every and self.cull_after >= self.check_every):
            raise UserError(
                "--searches > 1 picks its survivor by the checks: need --check-every >= 1 and "
                "--cull-after >= --check-every"
            )
        if self.time_budget_min < 0:
            raise UserError("--time-budget-min must be >= 0 (0 = no limit)")
        if self.deterministic and (self.time_budget_min or self.backend != "local"):
            raise UserError(
                "--deterministic counts generations, not minutes, in this process: add "
                "--time-budget-min 0 (and --backend local), and set --generations"
            )
        train_tracks = (self.generations + 1) * self.rollouts
        require_within("train", TRAIN_SEED_BASE, train_tracks, "--generations/--rollouts")
        require_within("check", CHECK_SEED_BASE, self.check_episodes, "--check-episodes")
        require_within("select", SELECT_SEED_BASE, self.select_episodes, "--select-episodes")


def initial_stds(agent: Agent, h_sigma_scale: float) -> np.ndarray:
    """Per-parameter initial std: 1 for z-weights and biases, `h_sigma_scale` for h-weights.

    h has 256 dims against z's 32; with one σ for all 867 weights the h-term swamps the z-term
    and training stalled below 60 in calibration.
    """
    n = controller_param_count(agent.input_dim)
    stds = np.ones(n)
    if not agent.z_only:
        z_dim = agent.vae.z_dim
        for row in range(3):
            start = row * agent.input_dim
            stds[start + z_dim : start + agent.input_dim] = h_sigma_scale
    return stds


def evaluate_candidates(
    evaluator: LocalEvaluator | RayEvaluator,
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


def save_controller(folder: Path, vector: np.ndarray, agent: Agent, extra: dict) -> None:
    controller = LinearController.from_flat(torch.as_tensor(vector, dtype=torch.float32))
    arch = {"input_dim": agent.input_dim, "action_dim": 3}
    save_model(folder, controller, arch, {"z_only": agent.z_only, **extra})


def _settings(cfg: TrainControllerConfig, agent: Agent) -> SearchSettings:
    stds = initial_stds(agent, cfg.h_sigma_scale)
    return SearchSettings(stds, cfg.sigma0, cfg.population, cfg.diagonal, cfg.seed, cfg.searches)


def _load_state(cfg: TrainControllerConfig, agent: Agent, folder: Path) -> SearchState | None:
    if (folder / ES_STATE).exists():
        return SearchState.load(_settings(cfg, agent), folder / ES_STATE)
    if (folder / PICKLED_STATE).exists():
        raise UserError(
            f"{folder / PICKLED_STATE} is an older pickled state, never read (unpickling can "
            "run code): rerun with --force to start over"
        )
    return None


def _check_mean(
    evaluator: LocalEvaluator | RayEvaluator, mean: np.ndarray, episodes: int, steps: int
) -> tuple[float, float]:
    """The CMA-ES mean on fixed held-out tracks, no early stop: the learning curve we trust."""
    seeds = [CHECK_SEED_BASE + i for i in range(episodes)]
    returns = evaluator.play(np.tile(mean, (len(seeds), 1)), seeds, 0, steps).returns
    return float(returns.mean()), float(returns.std())


def _out_of_time(cfg: TrainControllerConfig, state: SearchState) -> bool:
    """Whether another generation would leave too little of the budget for the selection."""
    if not cfg.time_budget_min:
        return False
    reserve = cfg.select_top * cfg.select_episodes * state.check_s_per_episode
    return state.elapsed + reserve >= cfg.time_budget_min * 60


def _generation(
    cfg: TrainControllerConfig,
    state: SearchState,
    evaluator: LocalEvaluator | RayEvaluator,
) -> dict:
    """One CMA-ES step of every running search (ask, play all populations at once on the same
    tracks, tell), then the periodic check of each search's mean; the metrics row."""
    gen = state.generation + 1
    started = time.perf_counter()
    asked = state.ask()
    candidates = np.concatenate(asked)
    seeds = [TRAIN_SEED_BASE + gen * cfg.rollouts + r for r in range(cfg.rollouts)]
    fitness, played = evaluate_candidates(
        evaluator, candidates, seeds, cfg.early_stop, cfg.lap_bonus
    )
    state.tell(asked, fitness)
    wall = time.perf_counter() - started

    if fitness.max() > state.best[0]:
        state.best = (float(fitness.max()), candidates[fitness.argmax()].copy())
    row = {
        "generation": gen,
        "best": float(fitness.max()),
        "mean": float(fitness.mean()),
        "worst": float(fitness.min()),
        "sigma": state.sigma(),
        "laps": float(played.laps.mean()),
        "steps_per_s": played.env_steps / wall,
        "seconds": wall,
    }
    if cfg.check_every and (gen % cfg.check_every == 0 or gen == cfg.generations):
        check_started = time.perf_counter()
        for k, mean in state.means():
            check, spread = _check_mean(evaluator, mean, cfg.check_episodes, cfg.check_steps)
            state.checked.append(Checked(gen, k, check, mean))
            if cfg.searches > 1:
                row[f"check_mean_search{k}"] = check
            if "check_mean" not in row or check > row["check_mean"]:
                row["check_mean"], row["check_std"] = check, spread
        seconds = time.perf_counter() - check_started
        state.check_s_per_episode = seconds / (cfg.check_episodes * len(state.alive))
    state.elapsed += time.perf_counter() - started
    if len(state.alive) > 1 and gen >= cfg.cull_after:
        state.cull()
    return row


def _select(
    cfg: TrainControllerConfig, state: SearchState, evaluator: LocalEvaluator | RayEvaluator
) -> dict:
    """The checked mean that plays best on fresh held-out tracks, among those with the best checks.

    The finalists are ranked by tracks that played no part in picking them, so the winner's
    score is not inflated by the luck that made it a finalist.
    """
    started = time.perf_counter()
    finalists = sorted(state.checked, key=lambda c: c.check_mean, reverse=True)[: cfg.select_top]
    seeds = [SELECT_SEED_BASE + i for i in range(cfg.select_episodes)]
    vectors = np.stack([f.vector for f in finalists])
    returns = evaluator.play(
        np.repeat(vectors, len(seeds), axis=0), seeds * len(finalists), 0, cfg.check_steps
    )
    scores = returns.returns.reshape(len(finalists), len(seeds))
    winner = int(scores.mean(axis=1).argmax())
    state.elapsed += time.perf_counter() - started
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


def _save_selection(folder: Path, choice: dict, agent: Agent, sources: dict) -> None:
    summary = {k: v for k, v in choice.items() if k != "vector"}
    save_controller(
        folder, choice["vector"], agent, {**sources, "generation": choice["generation"]}
    )
    atomic_write_text(folder / SELECTION, json.dumps(summary, indent=2) + "\n")
    best = max(summary["finalists"], key=lambda f: f["select_mean"])
    log(
        f"train-controller: kept the mean of generation {choice['generation']}: "
        f"{best['select_mean']:.0f} ± {best['select_std']:.0f} on {choice['episodes']} "
        f"fresh held-out tracks (finalists: generations "
        f"{', '.join(str(f['generation']) for f in summary['finalists'])})"
    )


def run(cfg: TrainControllerConfig) -> Path:
    cfg.validate()
    layout = RunDir(cfg.run_dir)
    folder = writable_dir(layout.controller)
    if cfg.backend == "local":
        use_acting_threads(cfg.device)
    agent = load_world_model(cfg.run_dir, cfg.device, cfg.z_only)
    sources = world_model_sources(cfg.run_dir)  # recorded with C: it acts only with this V and M

    if not cfg.force and (folder / ES_STATE).exists():
        require_same_settings(
            cfg,
            folder / "config.json",
            _IDENTITY,
            "a CMA-ES run",
            "rerun with the same settings to resume, add --force to start over, or use another "
            "--run-dir",
        )
    if cfg.force:  # nothing of the old search may be resumed under the new settings
        for name in (ES_STATE, SELECTION):
            (folder / name).unlink(missing_ok=True)
    state = None if cfg.force else _load_state(cfg, agent, folder)
    if state is None:
        state = SearchState.new(_settings(cfg, agent))
    done = state.generation >= cfg.generations or _out_of_time(cfg, state)
    wants_selection = bool(cfg.select_top and not state.selected and state.checked)
    if done and not wants_selection:
        log(f"train-controller: {state.generation} generations already done in {folder}")
        return folder
    if state.generation:
        log(f"train-controller: resuming after generation {state.generation}")
    save_config(cfg, folder / "config.json")
    metrics = MetricsLog(folder, resume_after=state.generation or None, key="generation")

    evaluator = make_evaluator(
        cfg.backend,
        agent,
        EpisodeSettings(cfg.env, cfg.max_steps, lockstep=cfg.deterministic),
        cfg.workers,
        cfg.ray_address,
        cfg.ray_chunks,
        cfg.ray_cpus_per_task,
        cfg.ray_timeout_min * 60,
    )
    if state.np_random is not None:  # pycma samples from numpy's global RNG: as it was saved
        np.random.set_state(state.np_random)
    bar = progress_bar(cfg.generations, "train-controller", unit="gen", initial=state.generation)
    try:
        while state.generation < cfg.generations:
            if _out_of_time(cfg, state):
                log(f"train-controller: time budget of {cfg.time_budget_min} min reached")
                break
            row = _generation(cfg, state, evaluator)
            gen = state.generation
            leader = np.asarray(state.optimizers[state.leader()].mean)
            save_controller(folder, leader, agent, {**sources, "generation": gen})
            best_fitness, best_vector = state.best
            save_controller(
                folder / "best",
                best_vector,
                agent,
                {**sources, "generation": gen, "fitness": best_fitness},
            )
            metrics.write(row, gen)  # before the state: a kill in between redoes the generation
            state.save(folder / ES_STATE)
            bar.update(1)
            bar.set_postfix(
                best=f"{row['best']:.0f}",
                mean=f"{row['mean']:.0f}",
                sps=f"{row['steps_per_s']:.0f}",
            )
        bar.close()
        if cfg.select_top and state.checked and not state.selected:
            log(
                f"train-controller: final selection, {min(cfg.select_top, len(state.checked))} "
                f"checked means × {cfg.select_episodes} fresh held-out tracks"
            )
            _save_selection(folder, _select(cfg, state, evaluator), agent, sources)
            state.selected = True
            state.save(folder / ES_STATE)
    finally:
        evaluator.close()
        bar.close()
        metrics.close()
    return folder
