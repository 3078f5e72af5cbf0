"""The Ray backend on a local Ray instance started here: same returns as local, survives a kill."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from worldmodels.agent import Agent
from worldmodels.errors import UserError
from worldmodels.evaluators import EpisodeSettings, LocalEvaluator, RayEvaluator
from worldmodels.models import MDNRNN, ConvVAE, controller_param_count

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # starts a Ray instance


def test_an_unreachable_ray_cluster_is_one_line_not_a_hang():
    """Runs before the local Ray of the other tests starts: nothing listens on that port (left
    to itself, ray.init retries such an address for many minutes)."""
    assert not ray.is_initialized()
    started = time.monotonic()
    with pytest.raises(UserError, match="cannot reach the Ray cluster at '127.0.0.1:9'") as err:
        RayEvaluator(tiny_agent(), EpisodeSettings("envpool", 20), address="127.0.0.1:9")
    ray.shutdown()
    assert "--ray-address" in str(err.value) and "\n" not in str(err.value)
    assert time.monotonic() - started < 30


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def tiny_agent() -> Agent:
    torch.manual_seed(0)
    return Agent(ConvVAE(8, (4, 8, 8, 16)), MDNRNN(8, 3, 16, 2), bf16=False)


def generation(count: int = 6, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """`count` candidates, each on the same two tracks, as train-controller lays them out."""
    rng = np.random.default_rng(seed)
    candidates = rng.normal(0, 0.5, (count, controller_param_count(8 + 16)))
    candidates[:, 3 * 24 + 1] += 2.0  # plenty of gas, so returns differ between candidates
    return np.repeat(candidates, 2, axis=0), [300, 301] * count


def _chunk_workers() -> list[int]:
    """PIDs of Ray workers busy with a chunk (Ray titles a worker by the task it runs)."""
    pids = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"play_chunk" in f.read():
                    pids.append(int(pid))
        except (OSError, ValueError):
            continue
    return pids


def test_ray_gives_the_local_returns_for_the_same_seeds(local_ray):
    params, seeds = generation()
    settings = EpisodeSettings("envpool", max_steps=80)
    local = LocalEvaluator(tiny_agent(), settings).play(params, seeds, early_stop=30)
    remote = RayEvaluator(tiny_agent(), settings, chunks=3).play(params, seeds, early_stop=30)
    # chunks batch V differently, so float rounding may differ; measured: equal to 1e-4
    np.testing.assert_allclose(remote.returns, local.returns, atol=1e-3)
    assert remote.env_steps == local.env_steps
    assert np.ptp(local.returns) > 1.0  # the candidates really drove differently


def test_a_killed_ray_worker_does_not_lose_the_generation(local_ray):
    params, seeds = generation(count=8, seed=1)
    settings = EpisodeSettings("envpool", max_steps=300)
    expected = LocalEvaluator(tiny_agent(), settings).play(params, seeds).returns
    evaluator = RayEvaluator(tiny_agent(), settings, chunks=2)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(played=evaluator.play(params, seeds)))
    thread.start()
    deadline, killed = time.monotonic() + 60, None
    while killed is None and time.monotonic() < deadline and thread.is_alive():
        busy = _chunk_workers()
        if busy:
            killed = busy[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    thread.join(timeout=120)
    assert killed is not None, "no Ray worker was caught running a chunk"
    assert "played" in result, "the generation was lost with the killed worker"
    np.testing.assert_allclose(result["played"].returns, expected, atol=1e-3)


def test_ray_tasks_that_take_too_long_end_in_one_line_not_a_hang(local_ray):
    from worldmodels.errors import UserError

    params, seeds = generation(count=2)
    remote = RayEvaluator(tiny_agent(), EpisodeSettings("envpool", 200), chunks=2, timeout_s=0.01)
    with pytest.raises(UserError, match="gave no result in 0.01 s"):
        remote.play(params, seeds)
