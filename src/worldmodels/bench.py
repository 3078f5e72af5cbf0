"""`worldmodels bench` / `make bench`: throughput figures measured in one run, printed as JSON.

Every comparison the issues ask for (collect vs bare env, backend vs backend) is measured in the
same process on the same machine, so the ratios mean something.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worldmodels.config import Config, option
from worldmodels.envs import MAX_EPISODE_STEPS
from worldmodels.envs.gymnasium_backend import make_official_env
from worldmodels.progress import log


@dataclass
class BenchConfig(Config):
    json: bool = option(False, "print only the JSON document (no progress lines)")
    envpool_steps: int = option(20_000, "env steps for each envpool measurement", low=1)
    gymnasium_steps: int = option(1_200, "env steps of the gymnasium collect measurement", low=1)
    eval_episodes: int = option(
        100, "episodes of the agent on gymnasium, all at once as `evaluate` plays them", low=1
    )
    eval_steps: int = option(
        300,
        "steps per episode of bare gymnasium and of the agent on it, from reset (an episode is "
        "1000 steps; 300 keeps the bench short)",
        low=1,
        high=MAX_EPISODE_STEPS,
    )
    envs: int = option(16, "env slots for envpool measurements", low=1)
    only: str = option("", "comma-separated measurement names to run (default: all)")


def _random_actions(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.c_[rng.uniform(-1, 1, n), rng.uniform(0, 1, n), np.zeros(n)].astype(np.float32)


def bare_envpool(cfg: BenchConfig, envs: int | None = None) -> dict:
    """EnvPool alone: one pool, all slots stepped together, nothing else done with the frames."""
    envs = envs or cfg.envs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import envpool

        pool = envpool.make(
            "CarRacing-v3",
            env_type="gymnasium",
            num_envs=envs,
            seed=0,
            num_threads=os.cpu_count(),
        )
    pool.reset()
    rng = np.random.default_rng(0)
    steps = 0
    start = time.perf_counter()
    while steps < cfg.envpool_steps:
        pool.step(_random_actions(rng, envs))
        steps += envs
    return {"steps_per_s": steps / (time.perf_counter() - start), "envs": envs}


POPULATION = 64


def bare_envpool_pop64(cfg: BenchConfig) -> dict:
    return bare_envpool(cfg, POPULATION)


def _full_size_agent():
    """Full-size V and M with random weights: speed does not depend on what they learned."""
    import torch

    from worldmodels.agent import Agent
    from worldmodels.models import MDNRNN, ConvVAE
    from worldmodels.runtime import use_acting_threads

    use_acting_threads()  # as train-controller and evaluate do
    torch.manual_seed(0)
    return Agent(ConvVAE(), MDNRNN())


def agent_envpool_pop64(cfg: BenchConfig) -> dict:
    """Controller training's inner loop: 64 envs, each driven by its own candidate, V and M
    batched over all of them, as `train-controller` runs it."""
    import torch

    from worldmodels.envs import make_env
    from worldmodels.models import controller_param_count
    from worldmodels.rollout import run_episodes

    agent = _full_size_agent()
    params = torch.randn(POPULATION, controller_param_count(agent.input_dim)) * 0.1
    max_steps = max(50, cfg.envpool_steps // POPULATION)
    with make_env("envpool", POPULATION, max_steps) as env:
        start = time.perf_counter()
        result = run_episodes(env, agent, params, list(range(POPULATION)))
        wall = time.perf_counter() - start
    return {"steps_per_s": result.env_steps / wall, "envs": POPULATION, "max_steps": max_steps}


def agent_gymnasium_eval(cfg: BenchConfig) -> dict:
    """Official-env evaluation with the agent, as `evaluate` runs it: every episode at once,
    spread over one process per core, V and M batched over all of them in this process."""
    import torch

    from worldmodels.envs import make_env
    from worldmodels.models import controller_param_count
    from worldmodels.rollout import run_episodes

    procs, episodes = os.cpu_count() or 1, cfg.eval_episodes
    agent = _full_size_agent()
    params = torch.randn(1, controller_param_count(agent.input_dim)).repeat(episodes, 1) * 0.1
    with make_env("gymnasium", episodes, cfg.eval_steps, workers=procs) as env:
        env.reset(list(range(episodes)))  # start the workers and import gymnasium in them
        start = time.perf_counter()
        result = run_episodes(env, agent, params, list(range(episodes)))
        wall = time.perf_counter() - start
    return {
        "steps_per_s": result.env_steps / wall,
        "processes": procs,
        "episodes": episodes,
        "max_steps": cfg.eval_steps,
    }


def _gym_worker(seed: int, episodes: int, steps: int) -> tuple[float, int]:
    """(seconds, steps) to play `episodes` episodes of `steps` random actions, each from reset
    (included, as an evaluation pays it: it builds the track, and the first 50 frames zoom in
    on it)."""
    env = make_official_env()
    env.reset(seed=seed + 1000)  # warm up: imports, first render
    rng = np.random.default_rng(seed)
    played, start = 0, time.perf_counter()
    for episode in range(episodes):
        env.reset(seed=seed + episode)
        for _ in range(steps):
            _, _, terminated, truncated, _ = env.step(_random_actions(rng, 1)[0])
            played += 1
            if terminated or truncated:
                break
    return time.perf_counter() - start, played


BARE_EPISODES = 4  # per process: ~6 s of stepping, long enough to measure


def bare_gymnasium(cfg: BenchConfig) -> dict:
    """Official env alone, one process per core, each stepping one env: episodes of
    `eval_steps` from reset, like the agent measurement's."""
    procs = os.cpu_count() or 1
    jobs = [(seed * BARE_EPISODES, BARE_EPISODES, cfg.eval_steps) for seed in range(procs)]
    with mp.get_context("spawn").Pool(procs) as pool:
        pool.starmap(_gym_worker, [(0, 1, 10)] * procs)  # start the processes, import gymnasium
        walls, played = zip(*pool.starmap(_gym_worker, jobs))
    return {
        "steps_per_s": sum(played) / max(walls),
        "processes": procs,
        "episodes_per_process": BARE_EPISODES,
        "max_steps": cfg.eval_steps,
    }


def _collect(env: str, episodes: int, max_steps: int, envs: int) -> dict:
    from worldmodels.stages import collect

    with tempfile.TemporaryDirectory() as tmp:
        cfg = collect.CollectConfig(
            run_dir=Path(tmp), episodes=episodes, max_steps=max_steps, env=env, envs=envs
        )
        start = time.perf_counter()
        collect.run(cfg)
        wall = time.perf_counter() - start
        from worldmodels.data import read_manifest

        steps = sum(e.steps for e in read_manifest(Path(tmp) / "data" / "episodes"))
    return {
        "steps_per_s": steps / wall,
        "episodes": episodes,
        "max_steps": max_steps,
        "wall_s": wall,
    }


def collect_envpool(cfg: BenchConfig) -> dict:
    max_steps = 500
    return _collect("envpool", max(cfg.envs, cfg.envpool_steps // max_steps), max_steps, cfg.envs)


def collect_gymnasium(cfg: BenchConfig) -> dict:
    procs = os.cpu_count() or 1
    max_steps = 200
    return _collect("gymnasium", max(procs, cfg.gymnasium_steps // max_steps), max_steps, 2 * procs)


# The child reports its own high-water mark: VmHWM belongs to the process's memory map, which
# starts afresh at exec. (getrusage's ru_maxrss does not: Linux carries it over from the forked
# parent, so it would report the bench's own size, whatever collect used.)
_RSS_CHILD = """
import re, resource, sys
from pathlib import Path
from worldmodels.cli import main
code = main(sys.argv[1:])
status = Path("/proc/self/status")
hwm = re.search(r"VmHWM:\\s+(\\d+) kB", status.read_text()) if status.exists() else None
print(hwm.group(1) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def _collect_peak_rss_mb(episodes: int, max_steps: int) -> float:
    """Peak RSS of a `worldmodels collect` of its own process, in MB (Linux reports KiB)."""
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        args = ["collect", "--run-dir", tmp, "--episodes", str(episodes)]
        args += ["--max-steps", str(max_steps)]
        env = {**os.environ, "WORLDMODELS_PROGRESS": "0"}
        out = subprocess.run(
            [sys.executable, "-c", _RSS_CHILD, *args],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
    return int(out.stdout.split()[-1]) / 1024


def collect_peak_rss(cfg: BenchConfig) -> dict:
    """Memory stays flat in the number of episodes: episodes stream to disk wave by wave."""
    max_steps = 100
    small, large = _collect_peak_rss_mb(50, max_steps), _collect_peak_rss_mb(400, max_steps)
    return {
        "episodes_50_mb": small,
        "episodes_400_mb": large,
        "difference_mb": large - small,
        "max_steps": max_steps,
    }


def mdnrnn_train(cfg: BenchConfig) -> dict:
    """M training: full-size MDN-RNN (z 32, LSTM 256, 5 Gaussians), 64 episodes walked in
    32-step chunks (truncated BPTT), forward + backward + Adam, through the stage's own code."""
    import torch

    from worldmodels.data.latents import LatentEpisode, make_batch
    from worldmodels.models import MDNRNN
    from worldmodels.stages.train_mdnrnn import Averages, TrainMDNRNNConfig, train_batch

    rng = np.random.default_rng(0)
    steps, tcfg = 320, TrainMDNRNNConfig(batch_size=64, seq_len=32)
    episode = LatentEpisode(
        mu=rng.standard_normal((steps + 1, 32)).astype(np.float32),
        logvar=np.full((steps + 1, 32), -2.0, np.float32),
        actions=_random_actions(rng, steps),
        rewards=np.zeros(steps, np.float32),
        terminated=False,
        truncated=True,
        seed=0,
    )
    batch = make_batch([episode] * tcfg.batch_size, rng)
    model = MDNRNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    train_batch(model, optimizer, batch, tcfg, "cpu", Averages())  # warm up
    chunks, start = 0, time.perf_counter()
    while time.perf_counter() - start < 10:
        chunks += train_batch(model, optimizer, batch, tcfg, "cpu", Averages())
    wall = time.perf_counter() - start
    return {
        "sequences_per_s": chunks * tcfg.batch_size / wall,
        "batch": tcfg.batch_size,
        "seq_len": tcfg.seq_len,
    }


def _dream(batch: int, seconds: float = 3.0) -> dict:
    """Dream steps/s (batch × steps / s) of the batched DreamEnv, full-size random M."""
    import torch

    from worldmodels.dream import DreamEnv
    from worldmodels.models import MDNRNN

    torch.manual_seed(0)
    env = DreamEnv(MDNRNN(), temperature=1.0)
    env.reset(torch.randn(batch, 32))
    actions = torch.from_numpy(_random_actions(np.random.default_rng(0), batch))
    for _ in range(3):
        env.step(actions)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            env.step(actions)
        steps += 10
    wall = time.perf_counter() - start
    return {"steps_per_s": batch * steps / wall, "batch": batch, "dream_steps": steps}


def dream_batch1(cfg: BenchConfig) -> dict:
    return _dream(1)


def dream_batch1024(cfg: BenchConfig) -> dict:
    return _dream(1024)


def dream_train_pop1024(cfg: BenchConfig) -> dict:
    """CMA-ES in the dream: 64 candidates x 16 dreams each (the paper's population), 200-step
    dreams through train-controller's own dream evaluator, controller included."""
    import torch

    from worldmodels.dream import DreamEvaluator
    from worldmodels.models import MDNRNN, controller_param_count

    torch.manual_seed(0)
    starts = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
    evaluator = DreamEvaluator(MDNRNN(), starts, max_steps=200)
    rng = np.random.default_rng(1)
    params = rng.normal(0, 0.1, (64, controller_param_count(32 + 256))).astype(np.float32)
    batch, seeds = np.repeat(params, 16, axis=0), list(range(16)) * 64
    evaluator.play(batch[:64], seeds[:64], max_steps=5)  # warm up
    start = time.perf_counter()
    played = evaluator.play(batch, seeds)
    wall = time.perf_counter() - start
    return {"steps_per_s": played.env_steps / wall, "dreams": len(batch), "steps": 200}


def _vae_frames(episodes: int = 6, max_steps: int = 240) -> tuple[np.ndarray, np.ndarray]:
    """Real frames from a few short envpool episodes: all but the last episode to train on,
    the last one held out (what the loss check validates on)."""
    from worldmodels.data import load_episode, read_manifest
    from worldmodels.stages import collect

    with tempfile.TemporaryDirectory() as tmp:
        collect.run(
            collect.CollectConfig(
                run_dir=Path(tmp), episodes=episodes, max_steps=max_steps, envs=episodes
            )
        )
        folder = Path(tmp) / "data" / "episodes"
        obs = [load_episode(folder / e.file).obs for e in read_manifest(folder)]
    return np.concatenate(obs[:-1]), obs[-1]


def vae_train(cfg: BenchConfig) -> dict:
    """V training img/s for plain fp32 and each speed option train-vae considers, in one run.

    Every option trains its own copy of one full-size VAE, interleaved step by step on the same
    real batches with the same noise (20 steps, batch 100); whether it "keeps the loss" is
    train-vae's own rule (`vae_speed.keeps_loss`), and its held-out SSE afterwards is shown
    beside it. `default` is what `train-vae` picks at startup here, by its own short measurement.
    """
    import torch

    from worldmodels import vae_speed
    from worldmodels.models import ConvVAE
    from worldmodels.runtime import bf16_is_fast, pick_device
    from worldmodels.stages.train_vae import TrainVAEConfig, evaluate

    tcfg, steps = TrainVAEConfig(), 20
    train, held_out = _vae_frames()
    batch = tcfg.batch_size
    batches = [train[i : i + batch] for i in range(0, len(train) - batch + 1, batch)]
    device = pick_device("auto")
    candidates = vae_speed.speed_candidates(tcfg, device)
    torch.manual_seed(0)
    model = ConvVAE(tcfg.z_dim, tcfg.channels)
    results = vae_speed.measure_speeds(
        candidates, model, batches, device, tcfg.lr, tcfg.free_bits, steps
    )
    val_sse = {
        s: evaluate(r.model, [held_out], device, s, tcfg.free_bits)["val_sse"]
        for s, r in results.items()
    }
    baseline = candidates[0]
    kept = [s for s in candidates if vae_speed.keeps_loss(results[s], results[baseline])]
    fastest_kept = max(kept, key=lambda s: results[s].img_per_s)
    default, _ = vae_speed.choose_speed(tcfg, model, batches[0], device)
    rate = {s.name: round(r.img_per_s, 1) for s, r in results.items()}
    return {
        "device": device.type,
        "batch": batch,
        "steps": steps,
        "img_per_s": rate,
        "val_sse": {s.name: round(v, 2) for s, v in val_sse.items()},
        "keeps_loss": {s.name: s in kept for s in candidates},
        "not_tried": [] if bf16_is_fast(device) else ["bf16 (no native bf16 on this device)"],
        "fastest_kept": fastest_kept.name,
        "default": default.name,
        "default_over_fp32": round(results[default].img_per_s / results[baseline].img_per_s, 3),
    }


def vae_encode(cfg: BenchConfig) -> dict:
    """V inference img/s (uint8 frames -> mu, logvar), full-size VAE, batches of 1000, fp32 as
    `encode` runs it, and bf16 + channels_last where the hardware does bf16 natively."""
    import torch

    from worldmodels.models import ConvVAE, frames_to_tensor
    from worldmodels.runtime import bf16_is_fast
    from worldmodels.vae_speed import Speed, autocast

    torch.manual_seed(0)
    vae = ConvVAE().eval()
    frames = np.random.default_rng(0).integers(0, 256, (1000, 64, 64, 3), dtype=np.uint8)
    device = torch.device("cpu")
    options = [Speed()] + [Speed(bf16=True, channels_last=True)] * bf16_is_fast(device)
    out: dict = {"batch": len(frames)}
    reference = None
    for speed in options:
        layout = torch.channels_last if speed.channels_last else torch.contiguous_format
        model = vae.to(memory_format=layout)
        n, start = 0, time.perf_counter()
        with torch.inference_mode():
            while n == 0 or time.perf_counter() - start < 2.0:
                x = frames_to_tensor(frames)
                if speed.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(device, speed):
                    mu, _ = model.encode(x)
                n += len(frames)
        out[f"img_per_s_{speed.name}"] = n / (time.perf_counter() - start)
        if reference is None:
            reference = mu.float()
        else:
            error = (mu.float() - reference).abs().max() / reference.abs().max()
            out[f"mu_max_rel_error_{speed.name}"] = f"{error.item():.1e}"
    return out


MEASUREMENTS = {
    "bare_envpool": bare_envpool,
    "bare_envpool_pop64": bare_envpool_pop64,
    "agent_envpool_pop64": agent_envpool_pop64,
    "agent_gymnasium_eval": agent_gymnasium_eval,
    "bare_gymnasium": bare_gymnasium,
    "collect_envpool": collect_envpool,
    "collect_gymnasium": collect_gymnasium,
    "mdnrnn_train": mdnrnn_train,
    "dream_batch1": dream_batch1,
    "dream_batch1024": dream_batch1024,
    "dream_train_pop1024": dream_train_pop1024,
    "vae_train": vae_train,
    "vae_encode": vae_encode,
    "collect_peak_rss": collect_peak_rss,
}


def _ratios(results: dict) -> dict:
    def rate(name: str) -> float | None:
        return results.get(name, {}).get("steps_per_s")

    pairs = {
        "collect_envpool_over_collect_gymnasium": ("collect_envpool", "collect_gymnasium"),
        "collect_envpool_over_bare_envpool": ("collect_envpool", "bare_envpool"),
        "collect_gymnasium_over_bare_gymnasium": ("collect_gymnasium", "bare_gymnasium"),
        "dream_batch1024_over_bare_envpool": ("dream_batch1024", "bare_envpool"),
        "dream_train_pop1024_over_bare_envpool": ("dream_train_pop1024", "bare_envpool"),
        "agent_envpool_pop64_over_bare_envpool_pop64": (
            "agent_envpool_pop64",
            "bare_envpool_pop64",
        ),
        "agent_gymnasium_eval_over_bare_gymnasium": ("agent_gymnasium_eval", "bare_gymnasium"),
    }
    out = {}
    for key, (a, b) in pairs.items():
        if rate(a) and rate(b):
            out[key] = round(rate(a) / rate(b), 3)
    return out


def run(cfg: BenchConfig) -> dict:
    import torch

    os.environ.setdefault("WORLDMODELS_PROGRESS", "0")
    wanted = [n for n in cfg.only.split(",") if n] or list(MEASUREMENTS)
    results: dict = {}
    for name in wanted:
        if name not in MEASUREMENTS:
            from worldmodels.errors import UserError

            raise UserError(f"unknown measurement {name!r}: choose from {', '.join(MEASUREMENTS)}")
        if not cfg.json:
            log(f"bench: {name} ...")
        figures = MEASUREMENTS[name](cfg)
        results[name] = {k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()}
        if not cfg.json:
            log(f"bench: {name}: {results[name]}")
    doc = {
        "machine": {
            "cpu_cores": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "results": results,
        "ratios": _ratios(results),
    }
    print(json.dumps(doc, indent=2))
    return doc
