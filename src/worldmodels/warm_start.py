"""A starting mean for the controller's search that already drives.

From the zero vector (half gas, straight ahead) CMA-ES spends its first generations learning
to follow the road at all, and on a slow machine those are a good share of its minutes. The road
is plain to see in the recorded frames, so a road follower's steering (toward the centre of
the road ahead, `policies.road_heading`) is fitted to V's latents of those frames by least
squares before any episode is played. With gentle gas that car already follows most tracks,
and the search starts from there: it has to learn speed and corners, not driving.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worldmodels.data.episodes import InvalidEpisode, load_episode
from worldmodels.data.latents import load_latents, open_latents
from worldmodels.envs.preprocess import CROP_ROWS
from worldmodels.errors import UserError
from worldmodels.models.controller import join_flat
from worldmodels.policies import AHEAD_ROWS, road_heading

FIT_EPISODES = 30  # recorded episodes the steering is fitted on (spread over all of them)
STEER_GAIN = 2.0  # the follower steers gain × the road centre's offset (clipped to [-1, 1])
MIN_ROAD_PIXELS = 20  # frames showing less road ahead have no steering target
MAX_STEER = 0.9  # targets are fitted through atanh, which a full lock would send to infinity
RIDGE = 1e-2  # per fitted frame: keeps the weights of latents that barely vary small
RAW_ROWS = 96  # the env's frame height, which AHEAD_ROWS counts in
MIN_FIT_FRAMES = 100  # fewer frames with road ahead than this fit nothing worth starting from


@dataclass(frozen=True)
class SteeringFit:
    weight: np.ndarray  # (z_dim,) raw steering per unit of each latent
    bias: float
    frames: int  # frames that had a target
    r2: float  # share of the targets' variance the fit explains (after tanh)


def ahead_rows(size: int, crop: bool) -> slice:
    """AHEAD_ROWS in a preprocessed frame of `size` rows (cropped to CROP_ROWS or not)."""
    source_rows = CROP_ROWS if crop else RAW_ROWS
    return slice(
        round(AHEAD_ROWS.start * size / source_rows), round(AHEAD_ROWS.stop * size / source_rows)
    )


def steering_targets(frames: np.ndarray, crop: bool) -> tuple[np.ndarray, np.ndarray]:
    """The road follower's steering on V's (N, size, size, 3) frames, and which frames have one."""
    rows = ahead_rows(frames.shape[1], crop)
    offset, seen = road_heading(frames, rows, MIN_ROAD_PIXELS)
    return np.clip(STEER_GAIN * offset, -1.0, 1.0), seen


def fit_steering(z: np.ndarray, targets: np.ndarray) -> SteeringFit:
    """Ridge least squares of atanh(target) on z: the controller's steer is tanh of a linear
    function of its inputs, so the fit is linear in the space the controller computes in."""
    x = np.concatenate([z, np.ones((len(z), 1))], axis=1).astype(np.float64)
    raw = np.arctanh(np.clip(targets, -MAX_STEER, MAX_STEER))
    penalty = RIDGE * len(z) * np.eye(x.shape[1])
    penalty[-1, -1] = 0.0  # the bias is not shrunk
    solution = np.linalg.solve(x.T @ x + penalty, x.T @ raw)
    residual = np.tanh(x @ solution) - targets
    r2 = 1.0 - float(np.mean(residual**2) / max(float(np.var(targets)), 1e-12))
    return SteeringFit(solution[:-1], float(solution[-1]), len(z), r2)


def recorded_steering(
    episodes: Path, latents: Path, count: int = FIT_EPISODES
) -> tuple[np.ndarray, np.ndarray]:
    """V's latent means of the recorded frames that show road ahead, and the follower's steering
    on each (`count` episodes spread over the run's)."""
    zs, targets = [], []
    for entry in open_latents(latents, count):
        try:
            episode = load_episode(episodes / entry.file)
        except InvalidEpisode as err:
            raise UserError(
                f"{episodes / entry.file}: {err}; the road start fits its steering on the "
                "recorded frames: rerun `worldmodels collect`, or use --start zero"
            ) from None
        steer, seen = steering_targets(episode.obs, episode.crop)
        zs.append(load_latents(latents / entry.file).mu[seen])
        targets.append(steer[seen])
    fitted = sum(len(t) for t in targets)
    if fitted < MIN_FIT_FRAMES:
        raise UserError(
            f"only {fitted} recorded frames in {episodes} show road ahead, "
            f"too few to fit the road start's steering on: use --start zero"
        )
    return np.concatenate(zs), np.concatenate(targets)


def road_following_start(fit: SteeringFit, input_dim: int, gas: float) -> np.ndarray:
    """The flat controller that steers by `fit` (on z; the weights on h stay 0), holds `gas`
    and never brakes."""
    weight = torch.zeros(3, input_dim, dtype=torch.float64)
    weight[0, : len(fit.weight)] = torch.from_numpy(fit.weight)
    raw_gas = float(np.arctanh(2.0 * gas - 1.0))  # squash_actions: gas = (tanh(raw) + 1) / 2
    bias = torch.tensor([fit.bias, raw_gas, -1.0], dtype=torch.float64)  # brake: tanh(-1) < 0
    return join_flat(weight, bias).numpy()
