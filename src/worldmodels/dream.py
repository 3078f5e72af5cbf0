"""Dreaming: M run forward on its own samples, many dreams at once (no I/O here).

`DreamEnv` is the batched "environment inside the world model": it holds B dreams, takes B
actions per step and returns each dream's next z, predicted reward, predicted episode end and the
LSTM hidden state h (the controller acts on [z; h]). Batch sizes in the thousands are the point:
the controller issue evaluates a whole CMA-ES population in one dream batch.

A dream step is M's one step (`MDNRNN.advance`, the fused LSTM cell acting uses too), its
prediction from h (`MDNRNN.predict`) and the one mixture sampler (`sample_next_z`): acting,
dreaming and training share the model's own code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from worldmodels.models import MDNRNN, ConvVAE, sample_next_z

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
    implicitly: `ended` accumulates predicted episode ends so the caller can mask finished ones.
    Sampling uses `generator` (default: a fresh one seeded 0), so the same seed and actions give
    the same dreams.
    """

    def __init__(
        self,
        model: MDNRNN,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        vae: ConvVAE | None = None,
        done_threshold: float = 0.5,
    ):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.temperature = temperature
        self.generator = generator or torch.Generator(self.device).manual_seed(0)
        self.vae = vae.to(self.device).eval() if vae is not None else None
        self.done_threshold = done_threshold
        self.z = torch.zeros(0, model.z_dim, device=self.device)
        self.h = torch.zeros(0, model.hidden, device=self.device)
        self.c = torch.zeros_like(self.h)
        self.ended = torch.zeros(0, dtype=torch.bool, device=self.device)

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
        self.ended = torch.zeros(len(self.z), dtype=torch.bool, device=self.device)
        return self.features()

    @torch.inference_mode()
    def step(self, actions: torch.Tensor | np.ndarray) -> DreamStep:
        """Advance every dream by one action (B, A); returns the new z, h, reward and done."""
        self.h, self.c = self.model.advance(self.z, self._tensor(actions), self.h, self.c)
        out = self.model.predict(self.h)
        self.z = sample_next_z(out, self.temperature, self.generator)
        done_prob = torch.sigmoid(out.done_logit[:, 0])
        done = done_prob > self.done_threshold
        self.ended |= done
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
