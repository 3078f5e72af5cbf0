"""`worldmodels train-controller`: CMA-ES over the linear controller, population in one env pool.

Each generation evaluates the whole population at once: pop × rollouts env slots, slot i driven
by its own candidate, so V and M run once per step for everyone. Every checked CMA-ES mean is
kept; at the end the few with the best checks play fresh held-out tracks and the best there is
the agent (`worldmodels.scoring`: what each candidate, check and finalist is scored on).

With `--searches 2`, two independent searches play side by side until `--cull-after`, then only
the one with the better recent checks goes on (`worldmodels.search`, which also holds the state
that resumes a run: plain JSON, never a pickle).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from worldmodels.agent import Agent
from worldmodels.artifacts import load_world_model, save_controller, world_model_sources
from worldmodels.config import Config, option, require_same_settings, save_config
from worldmodels.data.latents import first_latents
from worldmodels.dream import DreamEvaluator
from worldmodels.envs import BACKENDS, MAX_EPISODE_STEPS
from worldmodels.errors import UserError
from worldmodels.evaluators import BACKENDS as EVALUATOR_BACKENDS
from worldmodels.evaluators import EpisodeSettings, make_evaluator
from worldmodels.io import atomic_write_text
from worldmodels.layout import RunDir, writable_dir
from worldmodels.metrics import MetricsLog
from worldmodels.progress import log, progress_bar
from worldmodels.runtime import dream_in_bf16, use_acting_threads, use_all_threads
from worldmodels.scoring import (
    CHECK_SEED_BASE,
    EXTRA_TRAIN_SEED_BASE,
    H_SIGMA_SCALE,
    SELECT_SEED_BASE,
    TRAIN_SEED_BASE,
    Evaluator,
    Venues,
    adds_centroid,
    check_mean,
    evaluate_candidates,
    initial_stds,
    input_rms,
    rollouts_at,
    select_mean,
    training_tracks,
)
from worldmodels.search import (
    Checked,
    SearchSettings,
    SearchState,
    describe_finalist,
    kept_finalist,
)
from worldmodels.seeds import require_within
from worldmodels.warm_start import fit_steering, recorded_steering, road_following_start

ES_STATE = "es_state.json"
PICKLED_STATE = "es_state.pkl"  # what versions before 0.2 wrote; never read (pickle runs code)
SELECTION = "selection.json"
# What a resumed search may change; every other setting defines the search (so a setting added
# later is guarded by default) and changing it needs --force or a new run dir.
_MAY_CHANGE = {"run_dir", "generations", "workers", "backend", "ray_address", "ray_chunks"}
_MAY_CHANGE |= {"ray_cpus_per_task", "ray_timeout_min", "check_every", "select_top"}
_MAY_CHANGE |= {"select_episodes", "time_budget_min", "device", "force"}


@dataclass
class TrainControllerConfig(Config):
    run_dir: Path = option(
        Path("runs/default"), "run directory with trained V (vae/) and M (mdnrnn/)"
    )
    generations: int = option(40, "CMA-ES generations", low=0)
    population: int = option(16, "candidates per generation", low=2)
    rollouts: int = option(2, "episodes per candidate per generation (same tracks for all)", low=1)
    max_rollouts: int = option(
        0,
        "grow the episodes per candidate as CMA-ES narrows: rollouts * sqrt(sigma0 / sigma), "
        "up to this many (0 = always --rollouts); late candidates differ by less than track luck",
    )
    sigma0: float = option(0.1, "initial CMA-ES step size", above=0)
    sigma_halflife: float = option(
        0.0,
        "cap CMA-ES's step size at sigma0 * 2^(-generation / N), so the mean's steps shrink even "
        "where two noisy tracks a generation keep CMA-ES's own rule from shrinking them (0 = off)",
        low=0,
    )
    sigma_halvings: float = option(
        0.0,
        "the same cap, halved this many times over the whole run: sigma0 * 2^(-H * progress), "
        "progress the share of --time-budget-min used (of --generations without a budget), so "
        "a slower machine, with fewer generations, still ends with small steps (0 = off)",
        low=0,
    )
    searches: int = option(
        1,
        "independent CMA-ES searches run side by side until --cull-after; then only the one "
        "whose last two checks average best goes on (same-seed runs ended 175 points apart)",
        low=1,
    )
    cull_after: int = option(
        20, "generation after which all searches but the best stop (with --searches > 1)"
    )
    diagonal: bool = option(
        False,
        "separable CMA-ES: learn a diagonal covariance (its learning rate is ~n/3 times the full "
        "one's, which at n=867 barely moves in 100 generations)",
    )
    mirrors: bool = option(
        False,
        "mirrored sampling: candidates come in pairs mean ± d on the same tracks, so the track "
        "luck both share cancels in the mean's update (needs an even --population)",
    )
    start: str = option(
        "zero",
        "CMA-ES's first mean: zero (every weight 0: half gas, straight ahead) or road (steering "
        "fitted by least squares to a road follower's on the recorded frames, gas at "
        "--start-gas, no brake: the search starts from a car that follows the road)",
        ("zero", "road"),
    )
    start_gas: float = option(
        0.1,
        "with --start road: the first mean's gas (a slow car stays on the road; the search "
        "learns the speed)",
        above=0,
        below=1,
    )
    h_sigma_scale: float = option(
        H_SIGMA_SCALE, "initial std of the weights on h relative to those on z"
    )
    scale_inputs: bool = option(
        False,
        "divide each weight's initial std by its input's root mean square on the recorded "
        "episodes (within z and within h), so every input moves the actions alike at the start",
    )
    max_steps: int = option(
        MAX_EPISODE_STEPS,
        "step limit of training episodes: shorter ones see more tracks per minute and reward "
        "speed more (a car twice as fast gains twice the tiles, not a few points at the lap end)",
        low=1,
        high=MAX_EPISODE_STEPS,
    )
    check_steps: int = option(
        MAX_EPISODE_STEPS,
        "step limit of the periodic check and of the final selection (evaluation's is 1000)",
        low=1,
        high=MAX_EPISODE_STEPS,
    )
    early_stop: int = option(100, "stop an episode after this many steps without reward (0 = off)")
    lap_bonus: float = option(
        0.0,
        "added to a training episode's fitness when its lap finished (every tile visited): a "
        "missed tile costs only ~3 points of return but the lap, and 900 needs every lap; "
        "checks, selection and evaluation score the plain return",
    )
    env: str = option(
        "envpool",
        "where training episodes run: a real env backend, or dream (inside M: its reward and "
        "episode-end heads, starting from real first frames; checks and selection dream too)",
        (*BACKENDS, "dream"),
    )
    dream_generations: int = option(
        0,
        "with a real --env: play the first N generations inside M, then go on in the real env "
        "from where the dream left the search (checks start with the real generations)",
        low=0,
    )
    dream_temperature: float = option(
        1.0, "temperature tau of the dream's sampling (--env dream, --dream-generations)", above=0
    )
    dream_precision: str = option(
        "fp32",
        "precision of M's matrix products in the dream: bf16 (the cell state stays fp32) is "
        "faster on CPUs with native bf16 and many times slower elsewhere; auto = bf16 only "
        "where native (README: what it gains and what it changes)",
        ("fp32", "bf16", "auto"),
    )
    workers: int = option(0, "envpool threads or gymnasium processes (0 = one per core)")
    backend: str = option(
        "local",
        "where a generation's episodes run: one env pool in this process, or Ray tasks",
        EVALUATOR_BACKENDS,
    )
    ray_address: str = option(
        "", "Ray cluster to join (e.g. auto or ray://host:10001); empty = start a local Ray"
    )
    ray_chunks: int = option(
        0, "Ray tasks per generation (0 = one per ray-cpus-per-task CPUs)", low=0
    )
    ray_cpus_per_task: int = option(
        1, "CPUs per Ray task (its env threads and torch threads)", low=1
    )
    ray_timeout_min: float = option(
        30.0,
        "give up (in one line; a rerun resumes) when a batch of Ray tasks takes longer",
        above=0,
    )
    z_only: bool = option(False, "controller sees z only, not the memory h (the paper's ablation)")
    seed: int = option(0, "CMA-ES seed; training tracks are 100000 + generation*rollouts + r")
    check_every: int = option(
        5,
        "evaluate the CMA-ES mean on fixed held-out tracks every N generations, and the last "
        "mean when the time budget ends the search between two checks (0 = never)",
        low=0,
    )
    check_episodes: int = option(8, "episodes of that periodic check")
    select_top: int = option(
        4,
        "at the end, the N checked means with the best checks play fresh held-out tracks and the "
        "best there is kept (0 = keep the last mean)",
        low=0,
    )
    select_episodes: int = option(24, "episodes per finalist in that final selection")
    select_centroid: bool = option(
        False,
        "add the average of those finalists to them: it cancels part of the mean's wander "
        "between checks, and wins only if it plays best on the same fresh tracks",
    )
    time_budget_min: float = option(
        0.0, "stop after this many minutes, the final selection included (0 = no limit)", low=0
    )
    deterministic: bool = option(
        False,
        "reproducible to the bit: all envs step in lockstep (so V and M always see the same "
        "batches) and the run is as long as --generations, never a time budget; slower",
    )
    device: str = option("cpu", "torch device for V and M")
    force: bool = option(False, "start over, discarding the saved optimizer state")

    def check(self) -> None:
        if self.mirrors and self.population % 2:
            raise UserError("--mirrors pairs the candidates: give an even --population")
        if self.select_top and self.select_episodes < 1:
            raise UserError("--select-episodes must be >= 1 with --select-top")
        if self.check_every and self.check_episodes < 1:
            raise UserError("--check-episodes must be >= 1 with --check-every")
        if self.searches > 1 and not (self.check_every and self.cull_after >= self.check_every):
            raise UserError(
                "--searches > 1 picks its survivor by the checks: need --check-every >= 1 and "
                "--cull-after >= --check-every"
            )
        if self.deterministic and (self.time_budget_min or self.backend != "local"):
            raise UserError(
                "--deterministic counts generations, not minutes, in this process: add "
                "--time-budget-min 0 (and --backend local), and set --generations"
            )
        if self.env != "dream" and self.dream_generations >= max(1, self.generations):
            raise UserError("--dream-generations must be below --generations (the rest is real)")
        if self.searches > 1 and self.dream_generations >= self.cull_after:
            raise UserError("--cull-after must come after --dream-generations (it needs checks)")
        if (self.env == "dream" or self.dream_generations) and self.backend != "local":
            raise UserError("dreams run in this process: use --backend local with the dream")
        if self.max_rollouts and self.max_rollouts < self.rollouts:
            raise UserError("--max-rollouts must be 0 (off) or >= --rollouts")
        train_tracks = (self.generations + 1) * self.rollouts
        require_within("train", TRAIN_SEED_BASE, train_tracks, "--generations/--rollouts")
        extra_tracks = (self.generations + 1) * max(0, self.max_rollouts - self.rollouts)
        require_within(
            "train_extra", EXTRA_TRAIN_SEED_BASE, extra_tracks, "--generations/--max-rollouts"
        )
        require_within("check", CHECK_SEED_BASE, self.check_episodes, "--check-episodes")
        require_within("select", SELECT_SEED_BASE, self.select_episodes, "--select-episodes")


def _settings(
    cfg: TrainControllerConfig, agent: Agent, start: np.ndarray | None = None
) -> SearchSettings:
    rms = input_rms(agent, RunDir(cfg.run_dir).latents) if cfg.scale_inputs else None
    stds = initial_stds(agent, cfg.h_sigma_scale, rms)
    return SearchSettings(
        stds, cfg.sigma0, cfg.population, cfg.diagonal, cfg.seed, cfg.searches, cfg.mirrors, start
    )


def _first_mean(cfg: TrainControllerConfig, agent: Agent) -> np.ndarray | None:
    """--start road's fitted first mean (None: zero). Computed once, when a search starts; a
    resumed one reads it back from its state."""
    if cfg.start == "zero":
        return None
    layout = RunDir(cfg.run_dir)
    fit = fit_steering(*recorded_steering(layout.episodes, layout.latents))
    log(
        f"train-controller: first mean steers like a road follower (fitted on {fit.frames} "
        f"recorded frames, R² {fit.r2:.2f}), gas {cfg.start_gas}"
    )
    return road_following_start(fit, agent.input_dim, cfg.start_gas)


def _load_state(cfg: TrainControllerConfig, agent: Agent, folder: Path) -> SearchState | None:
    if (folder / ES_STATE).exists():
        # a state saved before caps were recorded had only --sigma-halflife's
        legacy = dataclasses.replace(cfg, sigma_halvings=0.0)
        return SearchState.load(
            _settings(cfg, agent), folder / ES_STATE, lambda g: sigma_cap(legacy, g, 0.0, 0.0)
        )
    if (folder / PICKLED_STATE).exists():
        raise UserError(
            f"{folder / PICKLED_STATE} is an older pickled state, never read (unpickling can "
            "run code): rerun with --force to start over"
        )
    return None


def _make_venues(cfg: TrainControllerConfig, agent: Agent) -> Venues:
    dream = None
    if cfg.env == "dream" or cfg.dream_generations:
        starts = first_latents(RunDir(cfg.run_dir).latents)
        bf16 = dream_in_bf16(cfg.dream_precision, agent.device)
        log(f"train-controller: dreams step M in {'bf16' if bf16 else 'fp32'}")
        dream = DreamEvaluator(
            agent.mdnrnn, starts, cfg.max_steps, cfg.dream_temperature, agent.z_only, bf16=bf16
        )
    real = None
    if cfg.env != "dream":
        real = make_evaluator(
            cfg.backend,
            agent,
            EpisodeSettings(cfg.env, cfg.max_steps, lockstep=cfg.deterministic),
            cfg.workers,
            cfg.ray_address,
            cfg.ray_chunks,
            cfg.ray_cpus_per_task,
            cfg.ray_timeout_min * 60,
        )
    return Venues(real, dream, cfg.dream_generations)


def sigma_cap(
    cfg: TrainControllerConfig, gen: int, elapsed_s: float, reserve_s: float
) -> float | None:
    """The cap on σ after generation `gen`, `elapsed_s` seconds into the training: the tighter
    of --sigma-halflife's and --sigma-halvings' (None: neither is on). The run's progress is
    the share of the generations or of the minutes left for them, whichever ends it first,
    so the last generation has all the halvings."""
    halvings = []
    if cfg.sigma_halflife:
        halvings.append(gen / cfg.sigma_halflife)
    if cfg.sigma_halvings:
        progress = gen / cfg.generations
        if cfg.time_budget_min:
            progress = max(progress, elapsed_s / max(1.0, cfg.time_budget_min * 60 - reserve_s))
        halvings.append(cfg.sigma_halvings * min(1.0, progress))
    return cfg.sigma0 * 0.5 ** max(halvings) if halvings else None


def _endgame_reserve_s(cfg: TrainControllerConfig, state: SearchState) -> float:
    """Seconds the end of the run will take at the checks' measured pace: the check of the last
    means (`_check_last_means`) and the final selection among the means checked by then."""
    if not cfg.select_top:
        return 0.0
    last_checks = len(state.alive) if cfg.check_every else 0
    finalists = min(cfg.select_top, len(state.checked) + last_checks)
    finalists += adds_centroid(finalists, cfg.select_centroid)
    episodes = last_checks * cfg.check_episodes + finalists * cfg.select_episodes
    return episodes * state.check_s_per_episode


def _out_of_time(cfg: TrainControllerConfig, state: SearchState) -> bool:
    """Whether another generation would leave too little of the budget for the end of the run."""
    if not cfg.time_budget_min:
        return False
    return state.elapsed + _endgame_reserve_s(cfg, state) >= cfg.time_budget_min * 60


def _generation(
    cfg: TrainControllerConfig,
    state: SearchState,
    venues: Venues,
) -> dict:
    """One CMA-ES step of every running search (ask, play all populations at once on the same
    tracks, tell), then the periodic check of each search's mean; the metrics row."""
    gen = state.generation + 1
    started = time.perf_counter()
    asked = state.ask()
    candidates = np.concatenate(asked)
    rollouts = rollouts_at(state.sigma(), cfg.sigma0, cfg.rollouts, cfg.max_rollouts)
    seeds = training_tracks(gen, rollouts, cfg.rollouts, cfg.max_rollouts)
    fitness, played = evaluate_candidates(
        venues.training(gen), candidates, seeds, cfg.early_stop, cfg.lap_bonus
    )
    wall = time.perf_counter() - started
    cap = sigma_cap(cfg, gen, state.elapsed + wall, _endgame_reserve_s(cfg, state))
    state.tell(asked, fitness, cap)

    if fitness.max() > state.best[0]:
        state.best = (float(fitness.max()), candidates[fitness.argmax()].copy())
    row = {
        "generation": gen,
        "best": float(fitness.max()),
        "mean": float(fitness.mean()),
        "worst": float(fitness.min()),
        "sigma": state.sigma(),
        **({"sigma_cap": cap} if cap is not None else {}),
        "laps": float(played.laps.mean()),
        "rollouts": rollouts,
        "steps_per_s": played.env_steps / wall,
        "seconds": wall,
    }
    state.elapsed += time.perf_counter() - started
    checker = venues.checking(gen)
    if checker and cfg.check_every and (gen % cfg.check_every == 0 or gen == cfg.generations):
        row |= _check_means(cfg, state, checker)
    if len(state.alive) > 1 and gen >= cfg.cull_after:
        state.cull()
    return row


def _check_means(cfg: TrainControllerConfig, state: SearchState, checker: Evaluator) -> dict:
    """Check each running search's mean on the held-out tracks, keep it as a finalist-to-be
    (its minutes count toward the time budget); the check's fields of the generation's metrics
    row."""
    started, row = time.perf_counter(), {}
    for k, mean in state.means():
        check, spread = check_mean(checker, mean, cfg.check_episodes, cfg.check_steps)
        state.checked.append(Checked(state.generation, k, check, mean))
        if cfg.searches > 1:
            row[f"check_mean_search{k}"] = check
        if "check_mean" not in row or check > row["check_mean"]:
            row["check_mean"], row["check_std"] = check, spread
    seconds = time.perf_counter() - started
    state.elapsed += seconds
    state.check_s_per_episode = seconds / (cfg.check_episodes * len(state.alive))
    return row


def _check_last_means(
    cfg: TrainControllerConfig,
    state: SearchState,
    venues: Venues,
    metrics: MetricsLog,
    folder: Path,
) -> None:
    """Check the last generation's means when the time budget ended the run between checks.
    Only checked means can be kept, so without this the generations after the last check
    would count for nothing; the time budget reserves the minutes for it."""
    gen = state.generation
    checker = venues.checking(gen)
    if not (cfg.check_every and gen and checker) or any(c.generation == gen for c in state.checked):
        return
    row = _check_means(cfg, state, checker)
    log(f"train-controller: checked the last mean (generation {gen}): {row['check_mean']:.0f}")
    metrics.amend(gen, row)
    state.save(folder / ES_STATE)


def _select(cfg: TrainControllerConfig, state: SearchState, evaluator: Evaluator) -> dict:
    started = time.perf_counter()
    choice = select_mean(
        evaluator,
        state.checked,
        cfg.select_top,
        cfg.select_episodes,
        cfg.check_steps,
        cfg.select_centroid,
    )
    state.elapsed += time.perf_counter() - started
    return choice


def _save_selection(folder: Path, choice: dict, agent: Agent, sources: dict) -> None:
    summary = {k: v for k, v in choice.items() if k != "vector"}
    kept = kept_finalist(summary)
    save_controller(folder, choice["vector"], agent, {**sources, **_kept_meta(kept)})
    atomic_write_text(folder / SELECTION, json.dumps(summary, indent=2) + "\n")
    log(
        f"train-controller: kept {describe_finalist(kept)}: "
        f"{kept['select_mean']:.0f} ± {kept['select_std']:.0f} on {choice['episodes']} "
        f"fresh held-out tracks (finalists: "
        f"{', '.join(describe_finalist(f) for f in summary['finalists'])})"
    )


def _kept_meta(kept: dict) -> dict:
    meta = {"generation": kept["generation"]}
    return meta | ({"centroid_of": kept["centroid_of"]} if "centroid_of" in kept else {})


def run(cfg: TrainControllerConfig) -> Path:
    cfg.validate()
    layout = RunDir(cfg.run_dir)
    folder = writable_dir(layout.controller)
    if cfg.env == "dream":  # all torch: no env threads to leave cores for
        use_all_threads()
    elif cfg.backend == "local":
        use_acting_threads(cfg.device)
    agent = load_world_model(cfg.run_dir, cfg.device, cfg.z_only)
    sources = world_model_sources(cfg.run_dir)  # recorded with C: it acts only with this V and M

    if not cfg.force and (folder / ES_STATE).exists():
        require_same_settings(
            cfg,
            folder / "config.json",
            tuple(f.name for f in fields(cfg) if f.name not in _MAY_CHANGE),
            "a CMA-ES run",
            "rerun with the same settings to resume, add --force to start over, or use another "
            "--run-dir",
        )
    if cfg.force:  # nothing of the old search may be resumed under the new settings
        for name in (ES_STATE, SELECTION):
            (folder / name).unlink(missing_ok=True)
    state = None if cfg.force else _load_state(cfg, agent, folder)
    if state is None:
        state = SearchState.new(_settings(cfg, agent, _first_mean(cfg, agent)))
    done = state.generation >= cfg.generations or _out_of_time(cfg, state)
    # a run killed before its end (the last check, the selection) finishes it when rerun
    can_select = state.checked or (cfg.check_every and state.generation)
    wants_selection = bool(cfg.select_top and not state.selected and can_select)
    if done and not wants_selection:
        log(f"train-controller: {state.generation} generations already done in {folder}")
        return folder
    if state.generation:
        log(f"train-controller: resuming after generation {state.generation}")
    save_config(cfg, folder / "config.json")
    metrics = MetricsLog(folder, resume_after=state.generation or None, key="generation")

    venues = _make_venues(cfg, agent)
    if state.np_random is not None:  # pycma samples from numpy's global RNG: as it was saved
        np.random.set_state(state.np_random)
    bar = progress_bar(cfg.generations, "train-controller", unit="gen", initial=state.generation)
    try:
        while state.generation < cfg.generations:
            if _out_of_time(cfg, state):
                log(f"train-controller: time budget of {cfg.time_budget_min} min reached")
                break
            row = _generation(cfg, state, venues)
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
        if cfg.select_top and not state.selected:
            _check_last_means(cfg, state, venues, metrics, folder)
        if cfg.select_top and state.checked and not state.selected:
            log(
                f"train-controller: final selection, {min(cfg.select_top, len(state.checked))} "
                f"checked means × {cfg.select_episodes} fresh held-out tracks"
            )
            _save_selection(folder, _select(cfg, state, venues.selecting()), agent, sources)
            state.selected = True
            state.save(folder / ES_STATE)
    finally:
        venues.close()
        bar.close()
        metrics.close()
    return folder
