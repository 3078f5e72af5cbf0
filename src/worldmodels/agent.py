"""The agent step, batched: V encodes N frames, C picks N actions, M advances N memories.

Every consumer (controller training, evaluation, play) uses this one step, so V and M run once
per env step for the whole batch, and N *different* controllers are applied at once with one
batched matmul over per-env parameters.
"""

from __future__ import annotations

import numpy as np
import torch

from worldmodels.envs import preprocess_frames
from worldmodels.models import MDNRNN, ConvVAE, batched_controller_actions, frames_to_tensor


class Agent:
    """V + M + N controllers, with one LSTM state per env slot."""

    def __init__(
        self,
        vae: ConvVAE,
        mdnrnn: MDNRNN,
        crop: bool = True,
        z_only: bool = False,
        device: torch.device | str = "cpu",
    ):
        self.device = torch.device(device)
        self.vae = vae.to(self.device).eval()
        self.mdnrnn = mdnrnn.to(self.device).eval()
        self.crop = crop
        self.z_only = z_only
        self.h = torch.zeros(0, mdnrnn.hidden, device=self.device)
        self.c = torch.zeros_like(self.h)
        self.last_z = torch.zeros(0, vae.z_dim, device=self.device)

    @property
    def input_dim(self) -> int:
        return self.vae.z_dim + (0 if self.z_only else self.mdnrnn.hidden)

    def reset(self, num_envs: int) -> None:
        """Fresh memory for every slot: called at the start of every batch of episodes."""
        self.h = torch.zeros(num_envs, self.mdnrnn.hidden, device=self.device)
        self.c = torch.zeros_like(self.h)
        self.last_z = torch.zeros(num_envs, self.vae.z_dim, device=self.device)

    @torch.inference_mode()
    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """Raw (N,96,96,3) frames → latent means (N, z_dim): μ, not a sample, so acting is
        deterministic given the frame."""
        small = preprocess_frames(frames, crop=self.crop)
        mu, _ = self.vae.encode(frames_to_tensor(small, self.device))
        return mu

    @torch.inference_mode()
    def act(
        self, frames: np.ndarray, params: torch.Tensor, ids: np.ndarray | None = None
    ) -> np.ndarray:
        """Actions (len(ids), 3) for the slots `ids` (all if None), each with its own controller.

        `params` holds one flat controller per slot in `ids` (P, n_params). The memory of those
        slots advances by one step with the chosen actions.
        """
        index = torch.as_tensor(np.arange(len(self.h)) if ids is None else ids, device=self.device)
        z = self.encode(frames)
        h, c = self.h[index], self.c[index]
        inputs = z if self.z_only else torch.cat([z, h], dim=1)
        actions = batched_controller_actions(params.to(self.device), inputs)
        _, (h_next, c_next) = self.mdnrnn.lstm(
            torch.cat([z, actions], dim=1).unsqueeze(1), (h.unsqueeze(0), c.unsqueeze(0))
        )
        self.h[index] = h_next[0]
        self.c[index] = c_next[0]
        self.last_z[index] = z
        return actions.cpu().numpy()
