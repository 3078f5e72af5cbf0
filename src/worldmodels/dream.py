"""Dreaming: M run forward on its own samples, many dreams at once (no I/O here).

`DreamEnv` is the batched "environment inside the world model": it holds B dreams, takes B
actions per step and returns each dream's next z, predicted reward, predicted episode end and the
LSTM hidden state h (the controller acts on [z; h]). `DreamEvaluator` plays controllers in it
the way the real evaluators play them on tracks, so CMA-ES trains a whole population in one
dream batch (`train-controller --env dream`); `dream_gym` wraps it for Gymnasium.

A dream step is M's one step (`MDNRNN.advance`, the fused LSTM cell acting uses too), its
prediction from h (`MDNRNN.predict`) and the one mixture sampler (`sample_next_z`): acting,
dreaming and training share the model's own code. Training controllers in the dream may step
M in bf16 instead (`Bf16Step`, the same step with its products rounded), where the hardware has
native bf16.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from worldmodels.evaluators import Evaluator, Played
from worldmodels.models import (
    MDNRNN,
    Bf16Step,
    ConvVAE,
    batched_controller_actions,
    sample_next_z,
)
from worldmodels.rollout import TIME_PENALTY

Policy = Callable[[torch.Tensor], torch.Tensor]  # features [z; h] (B, Z+H) -> actions (B, A)


@dataclass
class DreamStep:
    """What one dream step returns for every dream in the batch."""

    z: torch.Tensor  # (B, Z) sampled next latent z_{t+1}
    h: torch.Tensor  # (B, H) LSTM hidden state after (z_t, a_t): the controller sees [z; h]
    reward: torch.Tensor  # (B,) predicted reward of the transition
    done_prob: torch.Tensor  # (B,) predicted probability that the episode ended
    done: torch.Tensor  # (B,) bool: done_prob > done_threshold


class DreamEnv:
    """B dreams stepped together inside a trained MDNRNN (inference only).

    `reset(z0)` starts one dream per row of z0 with a zero LSTM state (as every episode starts
    in training); `step(actions)` advances all of them. Dreams are never reset or frozen
    implicitly: each step's `done` says which predicted an episode end, for the caller to mask.
    Sampling uses `generator` (default: a fresh one seeded 0), so the same seed and actions give
    the same dreams. `bf16` steps M with its matrix products in bf16 (`Bf16Step`): faster on
    hardware with native bf16, the same dreams up to rounding.
    """

    def __init__(
        self,
        model: MDNRNN,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        vae: ConvVAE | None = None,
        done_threshold: float = 0.5,
        bf16: bool = False,
    ):
        self.model = model.eval()
        self.stepper = Bf16Step(self.model) if bf16 else self.model
        self.device = next(model.parameters()).device
        self.temperature = temperature
        self.generator = generator or torch.Generator(self.device).manual_seed(0)
        self.vae = vae.to(self.device).eval() if vae is not None else None
        self.done_threshold = done_threshold
        self.z = torch.zeros(0, model.z_dim, device=self.device)
        self.h = torch.zeros(0, model.hidden, device=self.device)
        self.c = torch.zeros_like(self.h)

    @property
    def num_dreams(self) -> int:
        return len(self.z)

    def features(self) -> torch.Tensor:
        """[z; h] (B, Z+H): the controller's input in the current state."""
        return torch.cat([self.z, self.h], dim=1)

    def reset(self, z0: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Start len(z0) dreams from the given latents (B, Z); returns the features [z; h]."""
        self.z = self._tensor(z0).reshape(-1, self.model.z_dim).clone()
        self.h = torch.zeros(len(self.z), self.model.hidden, device=self.device)
        self.c = torch.zeros_like(self.h)
        return self.features()

    @torch.inference_mode()
    def step(
        self,
        actions: torch.Tensor | np.ndarray,
        noise: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> DreamStep:
        """Advance every dream by one action (B, A); returns the new z, h, reward and done.
        `noise` replaces the generator's draws (see `sample_next_z`)."""
        self.h, self.c = self.stepper.advance(self.z, self._tensor(actions), self.h, self.c)
        out = self.stepper.predict(self.h)
        self.z = sample_next_z(out, self.temperature, self.generator, noise)
        done_prob = torch.sigmoid(out.done_logit[:, 0])
        done = done_prob > self.done_threshold
        return DreamStep(self.z, self.h, out.reward[:, 0], done_prob, done)

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> np.ndarray:
        """Latents (N, Z) → uint8 frames (N, 64, 64, 3) with the VAE given at construction."""
        if self.vae is None:
            raise ValueError("DreamEnv was built without a VAE: pass vae= to decode")
        frames = self.vae.decode(self._tensor(z).reshape(-1, self.model.z_dim))
        return (frames.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().byte().cpu().numpy()

    def _tensor(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        return torch.as_tensor(x, dtype=torch.float32, device=self.device)


def controller_policy(params: torch.Tensor, z_only: bool, z_dim: int) -> Policy:
    """One linear controller (flat `params`) as a dream policy; it sees z alone if `z_only`."""
    flat = torch.as_tensor(params, dtype=torch.float32).reshape(1, -1)

    def act(features: torch.Tensor) -> torch.Tensor:
        inputs = features[:, :z_dim] if z_only else features
        weights = flat.to(features.device).expand(len(features), -1)
        return batched_controller_actions(weights, inputs)

    return act


@dataclass
class DreamTrajectory:
    z: torch.Tensor  # (B, T+1, Z): the start latents, then one sampled latent per step
    reward: torch.Tensor  # (B, T)
    done_prob: torch.Tensor  # (B, T)
    actions: torch.Tensor  # (B, T, A): the actions taken (given, or chosen by the policy)


def dream_rollout(
    env: DreamEnv,
    z0: torch.Tensor | np.ndarray,
    actions: torch.Tensor | np.ndarray | None = None,
    policy: Policy | None = None,
    steps: int | None = None,
) -> DreamTrajectory:
    """Roll B dreams forward from start latents z0 (B, Z).

    Either replay a fixed action sequence, (B, T, A) or (T, A) shared by all dreams, or let
    `policy` choose each step's actions from the features [z; h] for `steps` steps.
    """
    if (actions is None) == (policy is None):
        raise ValueError("give exactly one of actions= or policy=")
    env.reset(z0)
    b = env.num_dreams
    if actions is not None:
        acts = env._tensor(actions)
        acts = acts.expand(b, *acts.shape) if acts.dim() == 2 else acts
        steps = acts.shape[1] if steps is None else steps
    elif steps is None:
        raise ValueError("steps= is required with a policy")
    zs, rewards, dones, taken = [env.z], [], [], []
    for t in range(steps):
        a = acts[:, t] if actions is not None else env._tensor(policy(env.features()))
        out = env.step(a)
        zs.append(out.z)
        rewards.append(out.reward)
        dones.append(out.done_prob)
        taken.append(a)
    empty = torch.zeros(b, 0, device=env.device)
    return DreamTrajectory(
        z=torch.stack(zs, dim=1),
        reward=torch.stack(rewards, dim=1) if rewards else empty,
        done_prob=torch.stack(dones, dim=1) if dones else empty,
        actions=torch.stack(taken, dim=1) if taken else empty.unsqueeze(-1),
    )


class DreamEvaluator(Evaluator):
    """Episodes dreamed by M instead of played: M's reward head is the reward, its episode-end
    head (above `done_threshold`) ends the episode, and thousands of dreams step as one batch.

    Seed s picks the dream's start (one of `starts`, real encoded first frames) and all of its
    sampling noise, so every candidate given seed s dreams from the same start with the same
    noise, as every candidate given a real track drives the same track.
    """

    def __init__(
        self,
        mdnrnn: MDNRNN,
        starts: np.ndarray | torch.Tensor,
        max_steps: int,
        temperature: float = 1.0,
        z_only: bool = False,
        done_threshold: float = 0.5,
        bf16: bool = False,
    ):
        self.dream = DreamEnv(mdnrnn, temperature, done_threshold=done_threshold, bf16=bf16)
        self.starts = torch.as_tensor(starts, dtype=torch.float32, device=self.dream.device)
        self.max_steps = max_steps
        self.z_only = z_only

    def _noise(self, seeds: list[int], steps: int) -> tuple[torch.Tensor, ...]:
        """Per distinct seed: its start, and every step's uniform and Gaussian draws."""
        z_dim, starts, ends, normals = self.starts.shape[1], [], [], []
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            starts.append(self.starts[torch.randint(len(self.starts), (1,), generator=g)][0])
            ends.append(torch.rand(steps, 1, z_dim, generator=g))
            normals.append(torch.randn(steps, z_dim, generator=g))
        device = self.dream.device
        return tuple(torch.stack(x).to(device) for x in (starts, ends, normals))

    @torch.inference_mode()
    def _play(self, params: np.ndarray, seeds: list[int], early_stop: int, steps: int) -> Played:
        """`early_stop` stops a dream after that many steps without a positive predicted reward
        and charges it as `run_episodes` does."""
        distinct = sorted(set(seeds))
        dream = self.dream
        device = dream.device
        row = torch.as_tensor([distinct.index(s) for s in seeds], device=device)
        starts, uniforms, normals = self._noise(distinct, steps)
        batch = torch.as_tensor(params, dtype=torch.float32, device=device)
        dream.reset(starts[row])
        n = len(seeds)
        returns = torch.zeros(n, dtype=torch.float64, device=device)
        ids = torch.arange(n, device=device)  # the dreams still going: the dream's rows
        since_reward = torch.zeros(n, dtype=torch.long, device=device)
        played = 0
        for t in range(steps):
            inputs = dream.z if self.z_only else dream.features()
            actions = batched_controller_actions(batch, inputs)
            out = dream.step(actions, (uniforms[row, t], normals[row, t]))
            returns[ids] += out.reward.double()
            played += len(ids)
            since_reward = torch.where(out.reward > 0, 0, since_reward + 1)
            ended = out.done.clone()
            if early_stop > 0:
                hopeless = (since_reward >= early_stop) & ~out.done  # as run_episodes charges
                returns[ids[hopeless]] -= TIME_PENALTY * (steps - t - 1)
                ended |= hopeless
            if ended.any():  # finished dreams leave the batch: no compute spent on them
                keep = ~ended
                ids, batch, row, since_reward = (
                    ids[keep],
                    batch[keep],
                    row[keep],
                    since_reward[keep],
                )
                dream.z, dream.h, dream.c = dream.z[keep], dream.h[keep], dream.c[keep]
                if not len(ids):
                    break
        return Played(returns.cpu().numpy(), played, np.zeros(n, dtype=bool))
