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
"""

from __future__ import annotations

import json
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worldmodels.agent import Agent
from worldmodels.artifacts import load_world_model
from worldmodels.checkpoint import save_model
from worldmodels.config import option, require_same_settings, save_config
from worldmodels.envs import BACKENDS, MAX_EPISODE_STEPS
from worldmodels.errors import UserError
from worldmodels.evaluators import BACKENDS as EVALUATOR_BACKENDS
from worldmodels.evaluators import EpisodeSettings, LocalEvaluator, RayEvaluator, make_evaluator
from worldmodels.io import atomic_write_bytes, atomic_write_text
from worldmodels.layout import RunDir, writable_dir
from worldmodels.metrics import MetricsLog
from worldmodels.models import LinearController, controller_param_count
from worldmodels.progress import log, progress_bar
from worldmodels.runtime import use_acting_threads
from worldmodels.seeds import first, require_within

ES_STATE = "es_state.pkl"
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
    "env",
    "z_only",
    "seed",
    "check_episodes",
    "check_steps",
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
        if self.ray_chunks < 0 or self.ray_cpus_per_task < 1:
            raise UserError("need --ray-chunks >= 0 and --ray-cpus-per-task >= 1")
        if self.select_top < 0 or (self.select_top and self.select_episodes < 1):
            raise UserError("need --select-top >= 0 and, with it, --select-episodes >= 1")
        if self.check_every < 0 or (self.check_every and self.check_episodes < 1):
            raise UserError("need --check-every >= 0 and, with it, --check-episodes >= 1")
        if self.time_budget_min < 0:
            raise UserError("--time-budget-min must be >= 0 (0 = no limit)")
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
) -> tuple[np.ndarray, int]:
    """Mean return per candidate over the same `seeds`; also the env steps simulated."""
    count, repeats = len(candidates), len(seeds)
    played = evaluator.play(np.repeat(candidates, repeats, axis=0), seeds * count, early_stop)
    return played.returns.reshape(count, repeats).mean(axis=1), played.env_steps


def _save_state(folder: Path, state: dict) -> None:
    atomic_write_bytes(folder / ES_STATE, pickle.dumps(state))


def _load_state(folder: Path) -> dict | None:
    path = folder / ES_STATE
    if not path.exists():
        return None
    try:
        return pickle.loads(path.read_bytes())
    except Exception as err:
        raise UserError(
            f"{path} is corrupt ({type(err).__name__}): rerun `worldmodels train-controller --force`"
        ) from None


def save_controller(folder: Path, vector: np.ndarray, agent: Agent, extra: dict) -> None:
    controller = LinearController.from_flat(torch.as_tensor(vector, dtype=torch.float32))
    arch = {"input_dim": agent.input_dim, "action_dim": 3}
    save_model(folder, controller, arch, {"z_only": agent.z_only, **extra})


def _new_state(cfg: TrainControllerConfig, agent: Agent) -> dict:
    import cma

    stds = initial_stds(agent, cfg.h_sigma_scale)
    options = {
        "popsize": cfg.population,
        "seed": cfg.seed + 1,
        "CMA_stds": stds,
        "CMA_diagonal": cfg.diagonal,
        "verbose": -9,
    }
    es = cma.CMAEvolutionStrategy(np.zeros(len(stds)), cfg.sigma0, options)
    return {
        "es": es,
        "generation": 0,
        "elapsed": 0.0,
        "best": (-np.inf, None),
        "np_random": None,
        "checked": [],  # every checked mean: {"generation", "check_mean", "vector"}
        "check_s_per_episode": 0.0,  # measured on the checks, to reserve time for the selection
        "selected": False,
    }


def _check_mean(
    evaluator: LocalEvaluator | RayEvaluator, mean: np.ndarray, episodes: int, steps: int
) -> tuple[float, float]:
    """The CMA-ES mean on fixed held-out tracks, no early stop: the learning curve we trust."""
    seeds = [CHECK_SEED_BASE + i for i in range(episodes)]
    returns = evaluator.play(np.tile(mean, (len(seeds), 1)), seeds, 0, steps).returns
    return float(returns.mean()), float(returns.std())


def _out_of_time(cfg: TrainControllerConfig, state: dict) -> bool:
    """Whether another generation would leave too little of the budget for the selection."""
    if not cfg.time_budget_min:
        return False
    reserve = cfg.select_top * cfg.select_episodes * state["check_s_per_episode"]
    return state["elapsed"] + reserve >= cfg.time_budget_min * 60


def _generation(
    cfg: TrainControllerConfig,
    state: dict,
    evaluator: LocalEvaluator | RayEvaluator,
) -> dict:
    """One CMA-ES step (ask, play the population, tell), then the periodic check; the metrics row."""
    es = state["es"]
    gen = state["generation"] + 1
    started = time.perf_counter()
    candidates = np.asarray(es.ask())
    seeds = [TRAIN_SEED_BASE + gen * cfg.rollouts + r for r in range(cfg.rollouts)]
    fitness, env_steps = evaluate_candidates(evaluator, candidates, seeds, cfg.early_stop)
    es.tell(list(candidates), (-fitness).tolist())
    wall = time.perf_counter() - started

    if fitness.max() > state["best"][0]:
        state["best"] = (float(fitness.max()), candidates[fitness.argmax()].copy())
    row = {
        "generation": gen,
        "best": float(fitness.max()),
        "mean": float(fitness.mean()),
        "worst": float(fitness.min()),
        "sigma": float(es.sigma),
        "steps_per_s": env_steps / wall,
        "seconds": wall,
    }
    if cfg.check_every and (gen % cfg.check_every == 0 or gen == cfg.generations):
        mean = np.asarray(es.mean).copy()
        check_started = time.perf_counter()
        row["check_mean"], row["check_std"] = _check_mean(
            evaluator, mean, cfg.check_episodes, cfg.check_steps
        )
        state["check_s_per_episode"] = (time.perf_counter() - check_started) / cfg.check_episodes
        state["checked"].append(
            {"generation": gen, "check_mean": row["check_mean"], "vector": mean}
        )
    state["elapsed"] += time.perf_counter() - started
    state["generation"] = gen
    state["np_random"] = np.random.get_state()
    state["selected"] = False  # a new generation may hold a better mean
    return row


def _select(
    cfg: TrainControllerConfig, state: dict, evaluator: LocalEvaluator | RayEvaluator
) -> dict:
    """The checked mean that plays best on fresh held-out tracks, among those with the best checks.

    The finalists are ranked by tracks that played no part in picking them, so the winner's
    score is not inflated by the luck that made it a finalist.
    """
    started = time.perf_counter()
    ranked = sorted(state["checked"], key=lambda c: c["check_mean"], reverse=True)
    finalists = ranked[: cfg.select_top]
    seeds = [SELECT_SEED_BASE + i for i in range(cfg.select_episodes)]
    vectors = np.stack([f["vector"] for f in finalists])
    returns = evaluator.play(
        np.repeat(vectors, len(seeds), axis=0), seeds * len(finalists), 0, cfg.check_steps
    )
    scores = returns.returns.reshape(len(finalists), len(seeds))
    winner = int(scores.mean(axis=1).argmax())
    state["elapsed"] += time.perf_counter() - started
    return {
        "generation": finalists[winner]["generation"],
        "episodes": len(seeds),
        "seeds": [seeds[0], seeds[-1]],
        "finalists": [
            {
                "generation": f["generation"],
                "check_mean": f["check_mean"],
                "select_mean": float(score.mean()),
                "select_std": float(score.std()),
            }
            for f, score in zip(finalists, scores)
        ],
        "vector": finalists[winner]["vector"],
    }


def _save_selection(folder: Path, choice: dict, agent: Agent) -> None:
    summary = {k: v for k, v in choice.items() if k != "vector"}
    save_controller(folder, choice["vector"], agent, {"generation": choice["generation"]})
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

    state = None if cfg.force else _load_state(folder)
    if state is not None:
        require_same_settings(
            cfg,
            folder / "config.json",
            _IDENTITY,
            "a CMA-ES run",
            "rerun with the same settings to resume, add --force to start over, or use another "
            "--run-dir",
        )
    if state is None:
        state = _new_state(cfg, agent)
    else:
        np.random.set_state(state["np_random"])  # pycma samples from numpy's global RNG
        for key, value in (("checked", []), ("check_s_per_episode", 0.0), ("selected", False)):
            state.setdefault(key, value)  # a state saved before selection existed
    done = state["generation"] >= cfg.generations or _out_of_time(cfg, state)
    wants_selection = bool(cfg.select_top and not state["selected"] and state["checked"])
    if done and not wants_selection:
        log(f"train-controller: {state['generation']} generations already done in {folder}")
        return folder
    if state["generation"]:
        log(f"train-controller: resuming after generation {state['generation']}")
    save_config(cfg, folder / "config.json")
    metrics = MetricsLog(folder, resume_after=state["generation"] or None, key="generation")

    evaluator = make_evaluator(
        cfg.backend,
        agent,
        EpisodeSettings(cfg.env, cfg.max_steps),
        cfg.workers,
        cfg.ray_address,
        cfg.ray_chunks,
        cfg.ray_cpus_per_task,
    )
    bar = progress_bar(cfg.generations, "train-controller", unit="gen", initial=state["generation"])
    try:
        while state["generation"] < cfg.generations:
            if _out_of_time(cfg, state):
                log(f"train-controller: time budget of {cfg.time_budget_min} min reached")
                break
            row = _generation(cfg, state, evaluator)
            gen = state["generation"]
            save_controller(folder, np.asarray(state["es"].mean), agent, {"generation": gen})
            best_fitness, best_vector = state["best"]
            save_controller(
                folder / "best", best_vector, agent, {"generation": gen, "fitness": best_fitness}
            )
            _save_state(folder, state)
            metrics.write(row, gen)
            bar.update(1)
            bar.set_postfix(
                best=f"{row['best']:.0f}",
                mean=f"{row['mean']:.0f}",
                sps=f"{row['steps_per_s']:.0f}",
            )
        bar.close()
        if cfg.select_top and state["checked"] and not state["selected"]:
            log(
                f"train-controller: final selection, {min(cfg.select_top, len(state['checked']))} "
                f"checked means × {cfg.select_episodes} fresh held-out tracks"
            )
            _save_selection(folder, _select(cfg, state, evaluator), agent)
            state["selected"] = True
            _save_state(folder, state)
    finally:
        evaluator.close()
        bar.close()
        metrics.close()
    return folder
