"""The controller's CMA-ES search, and a state of plain numbers that resumes it exactly.

One run can hold several independent searches stepped side by side (each its own pycma
optimizer, all playing the same tracks each generation; pycma draws from numpy's global
generator, which the last optimizer built seeds, so the searches share one seeded stream) until a cull keeps the one whose recent
checks are best: the same V and M gave final scores 175 points apart for two CMA-ES seeds, so
trying two for a while and keeping the better is cheaper than hoping for a good one.

The saved state (`es_state.json`) is JSON only. pycma is deterministic given its seed and the
fitness it was told, so the optimizers are rebuilt by replaying what they were told, generation
by generation; the replayed means must equal the saved ones, or the state is refused. Nothing
is ever unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from worldmodels.errors import UserError
from worldmodels.io import atomic_write_text
from worldmodels.progress import log

SEED_STRIDE = 10_007  # pycma's seed option of search k of run seed s: s + 1 + SEED_STRIDE * k


@dataclass(frozen=True)
class SearchSettings:
    stds: np.ndarray  # per-parameter initial std (scaled by sigma0)
    sigma0: float
    population: int
    diagonal: bool  # separable CMA-ES
    seed: int
    searches: int = 1
    mirrors: bool = False  # candidates in pairs mean ± d (pycma's unconditional mirroring)
    start: np.ndarray | None = None  # every search's first mean (None: the zero vector)

    def first_mean(self) -> np.ndarray:
        return np.zeros(len(self.stds)) if self.start is None else np.asarray(self.start, float)


def _tell(optimizer, population, costs, cap: float | None) -> None:
    """One search's update, as run and as replayed on resume, then σ capped at `cap` (None:
    pycma's σ alone). On two noisy tracks a generation, CMA-ES's own step-size rule may keep σ
    near its start, and the mean then takes steps as large as the candidates' and wanders; a
    falling cap makes the steps shrink however the ranking went."""
    optimizer.tell(list(population), costs)
    if cap is not None:
        optimizer.sigma = min(optimizer.sigma, cap)


def no_cap(generation: int) -> None:
    return None


def _new_optimizer(settings: SearchSettings, index: int):
    import cma

    options = {
        "popsize": settings.population,
        "seed": settings.seed + 1 + SEED_STRIDE * index,
        "CMA_stds": settings.stds,
        "CMA_diagonal": settings.diagonal,
        "verbose": -9,
    }
    if settings.mirrors:
        options.update(CMA_mirrors=settings.population // 2, CMA_mirrormethod=0)
    return cma.CMAEvolutionStrategy(settings.first_mean(), settings.sigma0, options)


@dataclass
class Checked:
    """A checked CMA-ES mean: a candidate for the final selection."""

    generation: int
    search: int
    check_mean: float
    vector: np.ndarray


@dataclass
class SearchState:
    """Everything a controller run needs to go on after a kill."""

    settings: SearchSettings
    optimizers: list = field(default_factory=list)
    alive: list[int] = field(default_factory=list)  # searches still stepped (one after the cull)
    told: list = field(default_factory=list)  # per generation: [search, costs] in asking order
    caps: list = field(default_factory=list)  # per generation: the σ cap it applied, or None
    generation: int = 0
    elapsed: float = 0.0  # seconds of training, for the time budget
    best: tuple[float, np.ndarray | None] = (-np.inf, None)  # best single candidate so far
    checked: list[Checked] = field(default_factory=list)
    check_s_per_episode: float = 0.0  # measured on the checks, to reserve time for the selection
    selected: bool = False
    np_random: tuple | None = None  # numpy's global generator when saved (pycma draws from it)

    @classmethod
    def new(cls, settings: SearchSettings) -> SearchState:
        optimizers = [_new_optimizer(settings, k) for k in range(settings.searches)]
        return cls(settings, optimizers, list(range(settings.searches)))

    # --- stepping --------------------------------------------------------------------------

    def ask(self) -> list[np.ndarray]:
        """One population (P, n) per running search, in `alive` order."""
        return [np.asarray(self.optimizers[k].ask()) for k in self.alive]

    def tell(self, asked: list[np.ndarray], fitness: np.ndarray, cap: float | None = None) -> None:
        """Fitness (higher is better) of the concatenated populations `ask` gave; σ is then
        capped at `cap` (recorded, so that a resume replays it whatever rule chose it)."""
        costs = [(-f).tolist() for f in np.split(np.asarray(fitness), len(self.alive))]
        told = [[k, c] for k, c in zip(self.alive, costs)]
        self.generation += 1
        for (k, c), population in zip(told, asked):
            _tell(self.optimizers[k], population, c, cap)
        self.told.append(told)
        self.caps.append(cap)
        self.selected = False  # a new generation may hold a better mean

    def means(self) -> list[tuple[int, np.ndarray]]:
        return [(k, np.asarray(self.optimizers[k].mean).copy()) for k in self.alive]

    def sigma(self) -> float:
        return float(np.mean([self.optimizers[k].sigma for k in self.alive]))

    # --- checks and the cull -----------------------------------------------------------------

    def recent_check(self, search: int) -> float:
        """Mean of a search's last two checks: one 8-track check is too noisy to pick on alone."""
        checks = [c.check_mean for c in self.checked if c.search == search]
        return float(np.mean(checks[-2:])) if checks else -np.inf

    def leader(self) -> int:
        return max(self.alive, key=self.recent_check)

    def cull(self) -> None:
        """Keep only the search with the best recent checks; its rivals stop for good."""
        scores = {k: self.recent_check(k) for k in self.alive}
        self.alive = [self.leader()]
        log(
            f"train-controller: generation {self.generation}: search {self.alive[0]} goes on "
            f"(recent checks: {', '.join(f'search {k} {v:.0f}' for k, v in scores.items())})"
        )

    # --- saving and resuming -----------------------------------------------------------------

    def save(self, path: Path) -> None:
        kind, key, pos, has_gauss, cached = np.random.get_state()
        fitness, vector = self.best
        data = {
            "format": 1,
            "generation": self.generation,
            "elapsed": self.elapsed,
            "alive": self.alive,
            "told": self.told,
            "caps": self.caps,
            "means": [np.asarray(es.mean).tolist() for es in self.optimizers],
            "start": self.settings.first_mean().tolist(),
            "best": {
                "fitness": float(fitness) if np.isfinite(fitness) else None,
                "vector": None if vector is None else np.asarray(vector).tolist(),
            },
            "np_random": [kind, np.asarray(key).tolist(), int(pos), int(has_gauss), float(cached)],
            "checked": [{**vars(c), "vector": np.asarray(c.vector).tolist()} for c in self.checked],
            "check_s_per_episode": self.check_s_per_episode,
            "selected": self.selected,
        }
        atomic_write_text(path, json.dumps(data))

    @classmethod
    def load(
        cls, settings: SearchSettings, path: Path, cap_of: Callable[[int], float | None] = no_cap
    ) -> SearchState:
        """Rebuild a saved state; one line naming the way out if it cannot be trusted.
        `cap_of(generation)` gives the σ caps of a file saved before caps were recorded; the
        first mean is the saved one (a file saved before it was recorded started at zero)."""
        try:
            saved = json.loads(Path(path).read_text())
            kind, key, pos, has_gauss, cached = saved["np_random"]
            start = np.asarray(saved.get("start") or np.zeros(len(settings.stds)), dtype=float)
            if start.shape != settings.stds.shape:
                raise ValueError(f"a first mean of {start.size} numbers")
            settings = replace(settings, start=start)
            state = cls.new(settings)
            caps = saved.get("caps") or [cap_of(g) for g in range(1, len(saved["told"]) + 1)]
            for generation, cap in zip(saved["told"], caps, strict=True):
                asked = {k: state.optimizers[k].ask() for k, _ in generation}
                for k, costs in generation:
                    _tell(state.optimizers[k], asked[k], costs, cap)
            best = saved["best"]
            state.alive = [int(k) for k in saved["alive"]]
            state.told = saved["told"]
            state.caps = list(caps)
            state.generation = int(saved["generation"])
            state.elapsed = float(saved["elapsed"])
            state.best = (
                -np.inf if best["fitness"] is None else float(best["fitness"]),
                None if best["vector"] is None else np.asarray(best["vector"], dtype=float),
            )
            state.np_random = (kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached)
            np.random.RandomState().set_state(state.np_random)  # malformed: refused below
            state.checked = [
                Checked(int(c["generation"]), int(c["search"]), float(c["check_mean"]),
                        np.asarray(c["vector"], dtype=float))
                for c in saved["checked"]
            ]  # fmt: skip
            state.check_s_per_episode = float(saved["check_s_per_episode"])
            state.selected = bool(saved["selected"])
            means = saved["means"]
        except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
            raise UserError(
                f"{path} is unreadable ({type(err).__name__}): rerun with --force to start over"
            ) from None
        if len(means) != len(state.optimizers) or not all(
            np.allclose(es.mean, mean, rtol=0, atol=1e-9)
            for es, mean in zip(state.optimizers, means)
        ):
            raise UserError(
                f"{path} does not replay to its saved CMA-ES means (another pycma version?): "
                "rerun with --force to start over"
            )
        return state


# --- the final selection's record (selection.json) ----------------------------------------


def kept_finalist(selection: dict) -> dict:
    """The finalist a selection kept (files written before the centroid name it by generation)."""
    if "winner" in selection:
        return selection["finalists"][selection["winner"]]
    return next(f for f in selection["finalists"] if f["generation"] == selection["generation"])


def describe_finalist(finalist: dict) -> str:
    """How logs and the report name a finalist: a checked mean, or the average of several."""
    if "centroid_of" in finalist:
        generations = ", ".join(str(g) for g in finalist["centroid_of"])
        return f"the average of the means of generations {generations}"
    return f"the mean of generation {finalist['generation']}"
