"""How fast V trains: precision, memory layout and compilation, chosen by measurement.

These options change how fast a training step runs, not what it computes, so "auto" decides
them by measurement on the machine it runs on:

* Candidates: fp32 and fp32 + channels_last always; bf16 autocast (± channels_last) only where
  the hardware does bf16 natively (`runtime.bf16_is_fast`). Elsewhere bf16 autocast is many
  times slower, so it is not worth even trying.
* A startup micro-benchmark trains a copy of the net per candidate for 5 steps on the same real
  batch, same initial weights and same noise, interleaved so a busy neighbour slows them all
  alike, and keeps each one's fastest step.
* A candidate "keeps the loss" if its loss after those steps is within 2% of fp32's; the
  fastest such candidate wins, but only if it beats plain fp32 by more than 5% (less is timing
  noise). So the default is never slower than fp32. `make bench` applies the same rule.
* torch.compile is not part of "auto" (its compile time was not paid back on a 2-core CPU); it
  is opt-in with `--compile true`. The README's throughput table holds the measured figures.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from worldmodels.models import ConvVAE, frames_to_tensor, vae_loss
from worldmodels.progress import log
from worldmodels.runtime import bf16_is_fast


class SpeedSettings(Protocol):
    """What the choice reads from train-vae's config."""

    precision: str  # auto, fp32 or bf16
    channels_last: str  # auto, on or off
    compile: bool
    lr: float
    free_bits: float


@dataclass(frozen=True)
class Speed:
    """How a training step runs. None of these change the maths, only how fast it is done."""

    bf16: bool = False
    channels_last: bool = False
    compile: bool = False

    @property
    def name(self) -> str:
        parts = ["bf16" if self.bf16 else "fp32"]
        parts += ["channels_last"] * self.channels_last + ["compile"] * self.compile
        return "+".join(parts)


@dataclass
class SpeedResult:
    img_per_s: float
    losses: list[float]  # loss at each step: same data, weights and noise for every option
    model: ConvVAE  # the copy this option trained (the benchmark validates it)


def speed_candidates(cfg: SpeedSettings, device: torch.device) -> list[Speed]:
    """The options "auto" chooses between; a fixed setting narrows them. Plain comes first."""
    if cfg.precision == "auto":
        precisions = [False, True] if bf16_is_fast(device) else [False]
    else:
        precisions = [cfg.precision == "bf16"]
    layouts = {"auto": [False, True], "on": [True], "off": [False]}[cfg.channels_last]
    return [Speed(bf16, cl, cfg.compile) for bf16 in precisions for cl in layouts]


def autocast(device: torch.device, speed: Speed):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=speed.bf16)


def to_input(frames: np.ndarray, device: torch.device, speed: Speed) -> torch.Tensor:
    x = frames_to_tensor(frames, device)
    return x.contiguous(memory_format=torch.channels_last) if speed.channels_last else x


def prepare_model(model: ConvVAE, device: torch.device, speed: Speed) -> tuple[ConvVAE, Callable]:
    """Move the model and return (model, forward); forward is the compiled model if asked."""
    model = model.to(device)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if speed.compile else model
    return model, forward


def train_step(
    forward: Callable,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    free_bits: float,
    device: torch.device,
    speed: Speed,
) -> dict[str, torch.Tensor]:
    """One Adam step on a batch; returns the (detached) loss figures of `vae_loss`."""
    with autocast(device, speed):
        x_hat, mu, logvar = forward(x)
    out = vae_loss(x, x_hat, mu, logvar, free_bits)  # computed in fp32 whatever the autocast
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    optimizer.step()
    return {k: v.detach() for k, v in out.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_speeds(
    candidates: list[Speed],
    model: ConvVAE,
    batches: list[np.ndarray],
    device: torch.device,
    lr: float,
    free_bits: float,
    steps: int = 5,
) -> dict[Speed, SpeedResult]:
    """Train a copy of `model` per option for `steps` steps, interleaved; fastest step time.

    Each copy first takes one untimed warm-up step (kernel selection, compilation). Step i uses
    the same batch (cycling through `batches`) and the same reparameterisation noise in every
    copy, so their losses are comparable. A timed step includes the uint8 -> float conversion.
    The fastest step is the figure least disturbed by other processes sharing the CPU (with a
    median of 3 steps, a collect running beside it once made auto pick fp32 + channels_last,
    1.5x slower than bf16 + channels_last).
    """
    runs = []
    for speed in candidates:
        copy_, forward = prepare_model(copy.deepcopy(model), device, speed)
        runs.append((speed, copy_, forward, torch.optim.Adam(copy_.parameters(), lr=lr)))
    times: dict[Speed, list[float]] = {speed: [] for speed in candidates}
    losses: dict[Speed, list[float]] = {speed: [] for speed in candidates}
    for step in range(steps + 1):
        frames = batches[step % len(batches)]
        for speed, _, forward, optimizer in runs:
            torch.manual_seed(step)
            _sync(device)
            start = time.perf_counter()
            x = to_input(frames, device, speed)
            out = train_step(forward, optimizer, x, free_bits, device, speed)
            _sync(device)
            if step > 0:
                times[speed].append(time.perf_counter() - start)
            losses[speed].append(out["loss"].item())
    return {
        speed: SpeedResult(len(batches[0]) / min(times[speed]), losses[speed], m)
        for speed, m, _, _ in runs
    }


def keeps_loss(result: SpeedResult, reference: SpeedResult, tolerance: float = 0.02) -> bool:
    """Same loss as the reference after the same steps, within a relative tolerance."""
    final, ref = result.losses[-1], reference.losses[-1]
    return bool(np.isfinite(final)) and abs(final - ref) <= tolerance * abs(ref)


def pick_fastest(results: dict[Speed, SpeedResult], margin: float = 0.05) -> Speed:
    """The fastest option that keeps the loss of the first (plain) one, if clearly faster."""
    baseline = next(iter(results))
    kept = [s for s, r in results.items() if keeps_loss(r, results[baseline])]
    best = max(kept, key=lambda s: results[s].img_per_s)
    if results[best].img_per_s > (1 + margin) * results[baseline].img_per_s:
        return best
    return baseline


def choose_speed(
    cfg: SpeedSettings, model: ConvVAE, frames: np.ndarray, device: torch.device
) -> tuple[Speed, dict[Speed, SpeedResult]]:
    """Resolve the "auto" speed options by measurement (see the module docstring)."""
    candidates = speed_candidates(cfg, device)
    if cfg.precision == "bf16" and not bf16_is_fast(device):
        log(f"train-vae: warning: no native bf16 on this {device.type}; bf16 may be much slower")
    if len(candidates) == 1:
        return candidates[0], {}
    results = measure_speeds(candidates, model, [frames], device, cfg.lr, cfg.free_bits)
    speed = pick_fastest(results)
    figures = ", ".join(f"{s.name} {r.img_per_s:.0f}" for s, r in results.items())
    log(f"train-vae: speed options measured (img/s): {figures}; using {speed.name}")
    return speed, results
