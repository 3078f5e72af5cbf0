"""Where a batch of episodes runs: in this process, or spread over Ray tasks.

Every evaluator answers the same question, `play(params, seeds)`: the return of controller
`params[i]` on track `seeds[i]`, for every i. The local one runs every episode in one env pool so V
and M run once per step for the whole batch. The Ray one cuts the batch into chunks; each chunk is
a Ray task that rebuilds the agent from V and M in the object store (once per worker process) and
plays its episodes the same way. Ray retries a task whose worker dies, so a generation survives.
`worldmodels.dream.DreamEvaluator` answers it too, with dreams of M instead of episodes.
"""

from __future__ import annotations

import copy
import os
import socket
import uuid
from dataclasses import dataclass

import numpy as np
import torch

from worldmodels.agent import Agent
from worldmodels.envs import BatchedEnv, default_workers, make_env
from worldmodels.errors import UserError
from worldmodels.rollout import run_episodes

BACKENDS = ("local", "ray")
KEPT_ENVS = 3  # env pools kept open per evaluator: training, the check, the final selection


@dataclass
class Played:
    returns: np.ndarray  # (N,) one return per (params, seed) pair, in order
    env_steps: int  # env steps simulated, for steps/s
    laps: np.ndarray  # (N,) bool: the episode ended with every tile visited


@dataclass
class EpisodeSettings:
    env: str  # env backend
    max_steps: int
    lockstep: bool = False  # all slots step together: reproducible batches (see make_env)


class Evaluator:
    """What every evaluator answers: the return of controller `params[i]` on track (or dream)
    `seeds[i]`, for every i. Subclasses play in `_play`."""

    max_steps: int  # the step limit of an episode unless `play` is given another

    def play(
        self,
        params: np.ndarray,
        seeds: list[int],
        early_stop: int = 0,
        max_steps: int | None = None,
    ) -> Played:
        """`early_stop` as in `run_episodes`; `max_steps` overrides the step limit (checks play
        whole episodes whatever the training length)."""
        return self._play(np.asarray(params), list(seeds), early_stop, max_steps or self.max_steps)

    def _play(self, params: np.ndarray, seeds: list[int], early_stop: int, steps: int) -> Played:
        raise NotImplementedError

    def close(self) -> None:
        """Let go of what the evaluator holds open (env pools); nothing by default."""


class LocalEvaluator(Evaluator):
    """All episodes as one batch in one env pool in this process (the default)."""

    def __init__(self, agent: Agent, settings: EpisodeSettings, workers: int = 0):
        self.agent = agent
        self.settings = settings
        self.max_steps = settings.max_steps
        self.workers = default_workers(workers)
        # by (batch size, step limit): gymnasium workers are slow to start
        self._envs: dict[tuple[int, int], BatchedEnv] = {}

    def _play(self, params: np.ndarray, seeds: list[int], early_stop: int, steps: int) -> Played:
        key = (len(seeds), steps)
        if key not in self._envs:
            if len(self._envs) >= KEPT_ENVS:  # e.g. --max-rollouts grew the training batch
                self._envs.pop(next(iter(self._envs))).close()
            self._envs[key] = make_env(
                self.settings.env, key[0], key[1], self.workers, self.settings.lockstep
            )
        self._envs[key] = self._envs.pop(key)  # most recently used last
        batch = torch.as_tensor(params, dtype=torch.float32)
        result = run_episodes(self._envs[key], self.agent, batch, seeds, early_stop=early_stop)
        return Played(result.returns, result.env_steps, result.laps)

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs = {}


# --- Ray --------------------------------------------------------------------------------------

_AGENTS: dict[str, Agent] = {}  # per Ray worker process: agents already rebuilt, by key


def _worker_agent(key: str, world_model: dict) -> Agent:
    """The agent of `world_model`, built once per worker process and reused by later tasks."""
    if key not in _AGENTS:
        _AGENTS.clear()  # a new run's models replace the old ones
        _AGENTS[key] = Agent(**world_model)
    return _AGENTS[key]


def _threads_of_this_task() -> int:
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    return max(1, int(cpus))


def play_chunk(
    key: str,
    world_model: dict,
    settings: EpisodeSettings,
    params: np.ndarray,
    seeds: list[int],
    early_stop: int,
    max_steps: int | None = None,
) -> tuple[np.ndarray, int, np.ndarray]:
    """The body of one Ray task: play `seeds` with `params` on this worker's CPUs."""
    threads = _threads_of_this_task()
    torch.set_num_threads(threads)  # two tasks on two cores must not each take both
    agent = _worker_agent(key, world_model)
    evaluator = LocalEvaluator(agent, settings, workers=threads)
    try:
        played = evaluator.play(params, seeds, early_stop, max_steps)
    finally:
        evaluator.close()
    return played.returns, played.env_steps, played.laps


class RayEvaluator(Evaluator):
    """Chunks of the batch as Ray tasks, on a local Ray instance or a cluster (`address`).

    V and M go to the object store once; each task gets `cpus_per_task` CPUs and uses them all
    for its env pool and its torch threads. A task whose worker dies is retried up to
    `max_retries` times, so a killed worker costs time but not the generation. Closing it
    leaves Ray up: the Ray instance belongs to the process (or the cluster).
    """

    def __init__(
        self,
        agent: Agent,
        settings: EpisodeSettings,
        address: str | None = None,
        chunks: int = 0,
        cpus_per_task: int = 1,
        max_retries: int = 3,
        timeout_s: float = 1800.0,
    ):
        ray = import_ray()
        if not ray.is_initialized():
            problem = _unreachable(address or "")
            if problem:  # ray.init itself retries an unreachable address for many minutes
                raise UserError(
                    f"cannot reach the Ray cluster at {address!r} ({problem}): check "
                    "--ray-address (empty starts a local Ray) or use --backend local"
                )
            try:
                ray.init(address=address or None, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError, TimeoutError) as err:
                raise UserError(
                    f"cannot reach the Ray cluster at {address!r} ({type(err).__name__}): check "
                    "--ray-address (empty starts a local Ray) or use --backend local"
                ) from None
        self.settings = settings
        self.max_steps = settings.max_steps
        self.timeout_s = timeout_s
        self.chunks = chunks or max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus_per_task)
        self._key = uuid.uuid4().hex
        self._world_model = ray.put(
            {
                "vae": copy.deepcopy(agent.vae).cpu(),
                "mdnrnn": copy.deepcopy(agent.mdnrnn).cpu(),
                "crop": agent.crop,
                "z_only": agent.z_only,
                "bf16": agent.bf16,
            }
        )
        self._task = ray.remote(num_cpus=cpus_per_task, max_retries=max_retries)(play_chunk)

    def _play(self, params: np.ndarray, seeds: list[int], early_stop: int, steps: int) -> Played:
        import ray

        bounds = np.linspace(0, len(seeds), min(self.chunks, len(seeds)) + 1).astype(int)
        futures = [
            self._task.remote(
                self._key,
                self._world_model,
                self.settings,
                params[a:b],
                seeds[a:b],
                early_stop,
                steps,
            )
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
        try:
            parts = ray.get(futures, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            for future in futures:
                ray.cancel(future, force=True)
            raise UserError(
                f"Ray tasks gave no result in {self.timeout_s:g} s (a stuck or overloaded "
                "cluster?): rerun to resume after the last finished generation"
            ) from None
        returns = np.concatenate([part[0] for part in parts])
        laps = np.concatenate([part[2] for part in parts])
        return Played(returns, int(sum(part[1] for part in parts)), laps)


def _unreachable(address: str, timeout_s: float = 10.0) -> str | None:
    """Why a `host:port` (or `ray://host:port`) address takes no connection, or None; other
    forms (empty, `auto`) are left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return None
    except OSError as err:
        return err.strerror or type(err).__name__


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(
            "--backend ray needs Ray: `pip install ray` (or use --backend local)"
        ) from None
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    return ray


def make_evaluator(
    backend: str,
    agent: Agent,
    settings: EpisodeSettings,
    workers: int = 0,
    ray_address: str | None = None,
    ray_chunks: int = 0,
    ray_cpus_per_task: int = 1,
    ray_timeout_s: float = 1800.0,
) -> Evaluator:
    if backend == "local":
        return LocalEvaluator(agent, settings, workers)
    if backend == "ray":
        return RayEvaluator(
            agent, settings, ray_address, ray_chunks, ray_cpus_per_task, timeout_s=ray_timeout_s
        )
    raise UserError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
