"""The dream as a Gymnasium environment, so any RL library can train inside the world model.

`make_dream_env(run_dir)` gives a `gymnasium.Env`; `make_dream_env(run_dir, num_envs=N)` a
`gymnasium.vector.VectorEnv` whose N dreams step as one batch through M (the point of a world
model: a step costs one LSTM step, no physics and no rendering). Both are the same dream:

- an episode starts from the latent of a real first frame (the encoded episodes of the run) with
  an empty memory, as every real episode does;
- an action (steer, gas, brake), clipped to CarRacing's ranges, advances M one step; the next z
  is sampled at temperature tau;
- the reward is M's reward head, the episode ends when its episode-end head says so (terminated)
  or at the step limit (truncated);
- the observation is what the controller sees, [z; h] (float32), or with `obs="pixels"` V's
  decoding of z as a 64x64 RGB frame; `render()` gives that frame too.

The vector form autoresets on the step after an episode ends (Gymnasium's default, next-step).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from worldmodels.dream import DreamEnv
from worldmodels.models import MDNRNN, ConvVAE

ACTION_LOW = np.array([-1.0, 0.0, 0.0], np.float32)
ACTION_HIGH = np.array([1.0, 1.0, 1.0], np.float32)
OBS_KINDS = ("features", "pixels")


class _Dreams:
    """N dreams with per-dream resets: the body shared by the single and the vector env."""

    def __init__(
        self,
        mdnrnn: MDNRNN,
        starts: np.ndarray,
        num: int,
        vae: ConvVAE | None = None,
        temperature: float = 1.0,
        max_steps: int = 1000,
        obs: str = "features",
        render_mode: str | None = None,
    ):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        if render_mode and vae is None:
            raise ValueError("render_mode='rgb_array' needs the VAE to decode frames")
        if obs not in OBS_KINDS:
            raise ValueError(f"obs must be one of {OBS_KINDS}, got {obs!r}")
        if obs == "pixels" and vae is None:
            raise ValueError('obs="pixels" needs the VAE to decode frames')
        self.dream = DreamEnv(mdnrnn, temperature, vae=vae)
        self.starts = torch.as_tensor(starts, dtype=torch.float32, device=self.dream.device)
        self.num, self.max_steps, self.obs, self.render_mode = num, max_steps, obs, render_mode
        self.steps = np.zeros(num, np.int64)
        self.dream.reset(self.starts[:1].expand(num, -1))
        z_dim, hidden = mdnrnn.z_dim, mdnrnn.hidden
        if obs == "features":
            self.space = spaces.Box(-np.inf, np.inf, (z_dim + hidden,), np.float32)
        else:
            self.space = spaces.Box(0, 255, (64, 64, 3), np.uint8)

    def seed(self, rng: np.random.Generator) -> None:
        self.dream.generator.manual_seed(int(rng.integers(2**62)))

    @torch.inference_mode()  # the dream's tensors come from inference-mode steps
    def reset_rows(self, rows: np.ndarray, rng: np.random.Generator) -> None:
        picks = torch.as_tensor(rng.integers(len(self.starts), size=len(rows)))
        index = torch.as_tensor(rows)
        self.dream.z[index] = self.starts[picks]
        self.dream.h[index] = 0.0
        self.dream.c[index] = 0.0
        self.steps[rows] = 0

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        clipped = np.clip(
            np.asarray(actions, np.float32).reshape(self.num, 3), ACTION_LOW, ACTION_HIGH
        )
        out = self.dream.step(clipped)
        self.steps += 1
        terminated = out.done.cpu().numpy()
        truncated = ~terminated & (self.steps >= self.max_steps)
        return out.reward.double().cpu().numpy(), terminated, truncated

    def observations(self) -> np.ndarray:
        if self.obs == "pixels":
            return self.frames()
        return self.dream.features().cpu().numpy().astype(np.float32)

    def frames(self) -> np.ndarray:
        return self.dream.decode(self.dream.z)


class DreamCarRacing(gym.Env):
    """One dream of M as a Gymnasium env (see the module docstring)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(self, mdnrnn: MDNRNN, starts: np.ndarray, **settings: Any):
        """`settings`: vae, temperature, max_steps, obs and render_mode, as `_Dreams` takes them."""
        self._dreams = _Dreams(mdnrnn, starts, 1, **settings)
        self.render_mode = self._dreams.render_mode
        self.observation_space = self._dreams.space
        self.action_space = spaces.Box(ACTION_LOW, ACTION_HIGH, dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._dreams.seed(self.np_random)
        self._dreams.reset_rows(np.arange(1), self.np_random)
        return self._dreams.observations()[0], {}

    def step(self, action):
        reward, terminated, truncated = self._dreams.step(action)
        obs = self._dreams.observations()[0]
        return obs, float(reward[0]), bool(terminated[0]), bool(truncated[0]), {}

    def render(self) -> np.ndarray | None:
        return self._dreams.frames()[0] if self.render_mode == "rgb_array" else None


class DreamVectorEnv(VectorEnv):
    """N dreams of M stepped as one batch (see the module docstring); next-step autoreset."""

    metadata = {
        "render_modes": ["rgb_array"],
        "render_fps": 50,
        "autoreset_mode": AutoresetMode.NEXT_STEP,
    }

    def __init__(self, mdnrnn: MDNRNN, starts: np.ndarray, num_envs: int, **settings: Any):
        """`settings` as for `DreamCarRacing`."""
        self.num_envs = num_envs
        self._dreams = _Dreams(mdnrnn, starts, num_envs, **settings)
        self.render_mode = self._dreams.render_mode
        self.single_observation_space = self._dreams.space
        self.single_action_space = spaces.Box(ACTION_LOW, ACTION_HIGH, dtype=np.float32)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._ended = np.zeros(num_envs, bool)
        self._rng = np.random.default_rng()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._dreams.seed(self._rng)
        self._dreams.reset_rows(np.arange(self.num_envs), self._rng)
        self._ended[:] = False
        return self._dreams.observations(), {}

    def step(self, actions):
        ended = np.flatnonzero(self._ended)
        reward, terminated, truncated = self._dreams.step(actions)
        if len(ended):  # these rows start over instead: their step is the reset
            self._dreams.reset_rows(ended, self._rng)
            reward[ended], terminated[ended], truncated[ended] = 0.0, False, False
        self._ended = terminated | truncated
        return self._dreams.observations(), reward, terminated, truncated, {}

    def render(self) -> np.ndarray | None:
        return self._dreams.frames() if self.render_mode == "rgb_array" else None


def make_dream_env(
    run_dir: str | Path,
    num_envs: int | None = None,
    obs: str = "features",
    temperature: float = 1.0,
    max_steps: int = 1000,
    render_mode: str | None = None,
    device: str = "cpu",
) -> DreamCarRacing | DreamVectorEnv:
    """The dream of a trained run dir (its M, its encoded first frames and, for pixels or
    rendering, its V): one env, or `num_envs` batched in one vector env."""
    from worldmodels.artifacts import load_mdnrnn, load_vae
    from worldmodels.data.latents import first_latents
    from worldmodels.layout import RunDir

    root = Path(run_dir)
    mdnrnn = load_mdnrnn(root).to(device)
    vae = load_vae(root).to(device) if obs == "pixels" or render_mode else None
    starts = first_latents(RunDir(root).latents)
    common = dict(
        vae=vae, temperature=temperature, max_steps=max_steps, obs=obs, render_mode=render_mode
    )
    if num_envs is None:
        return DreamCarRacing(mdnrnn, starts, **common)
    return DreamVectorEnv(mdnrnn, starts, num_envs, **common)
