"""`make bench`'s model measurements: M training, the dream, V training and encoding, each
through the code its stage runs (see `worldmodels.bench`)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from worldmodels.bench_envs import random_actions

if TYPE_CHECKING:
    from worldmodels.bench import BenchConfig


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
        actions=random_actions(rng, steps),
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
    actions = torch.from_numpy(random_actions(np.random.default_rng(0), batch))
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
    dreams through train-controller's own dream evaluator, controller included (fp32, the
    default)."""
    return _dream_train("fp32")


def dream_train_pop1024_bf16(cfg: BenchConfig) -> dict:
    """As dream_train_pop1024 with `--dream-precision auto`: bf16 where the hardware has native
    bf16 (the figure says which precision ran)."""
    return _dream_train("auto")


def _dream_train(precision: str) -> dict:
    import torch

    from worldmodels.dream import DreamEvaluator
    from worldmodels.models import MDNRNN, controller_param_count
    from worldmodels.runtime import dream_in_bf16

    torch.manual_seed(0)
    starts = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
    bf16 = dream_in_bf16(precision)
    evaluator = DreamEvaluator(MDNRNN(), starts, max_steps=200, bf16=bf16)
    rng = np.random.default_rng(1)
    params = rng.normal(0, 0.1, (64, controller_param_count(32 + 256))).astype(np.float32)
    batch, seeds = np.repeat(params, 16, axis=0), list(range(16)) * 64
    evaluator.play(batch[:64], seeds[:64], max_steps=5)  # warm up
    start = time.perf_counter()
    played = evaluator.play(batch, seeds)
    wall = time.perf_counter() - start
    return {
        "steps_per_s": played.env_steps / wall,
        "dreams": len(batch),
        "steps": 200,
        "precision": "bf16" if bf16 else "fp32",
    }


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
