"""The agent step, batched: V encodes N frames, C picks N actions, M advances N memories.

Every consumer (controller training, evaluation, play) uses this one step, so V and M run once
per env step for the whole batch, and N *different* controllers are applied at once with one
batched matmul over per-env parameters.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from worldmodels.envs import preprocess_frames
from worldmodels.models import MDNRNN, ConvVAE, batched_controller_actions
from worldmodels.runtime import bf16_is_fast


def encoder_copy(vae: ConvVAE, dtype: torch.dtype) -> ConvVAE:
    """A channels_last copy of V in `dtype`, used only to encode: latents differ from fp32 by
    about 1 % of their size, and every stage that acts (train, evaluate, play) uses the same."""
    model = copy.deepcopy(vae).to(dtype=dtype)
    return model.to(memory_format=torch.channels_last).eval()


class Agent:
    """V + M + N controllers, with one LSTM state per env slot."""

    def __init__(
        self,
        vae: ConvVAE,
        mdnrnn: MDNRNN,
        crop: bool = True,
        z_only: bool = False,
        device: torch.device | str = "cpu",
        bf16: bool | None = None,
    ):
        self.device = torch.device(device)
        self.vae = vae.to(self.device).eval()
        self.bf16 = bf16_is_fast(self.device) if bf16 is None else bf16
        self.dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.encoder = encoder_copy(self.vae, self.dtype)
        self.mdnrnn = mdnrnn.to(self.device).eval()
        self.crop = crop
        self.z_only = z_only
        self.h = torch.zeros(0, mdnrnn.hidden, device=self.device)
        self.c = torch.zeros_like(self.h)
        # Float results of a batched conv or matmul depend on the batch they ran in; with worker
        # processes that batch is whichever cars came back together, so a track's return could
        # differ run to run. One car at a time makes every step's numbers the same each run.
        self.one_at_a_time = False

    @property
    def input_dim(self) -> int:
        return self.vae.z_dim + (0 if self.z_only else self.mdnrnn.hidden)

    def reset(self, num_envs: int) -> None:
        """Fresh memory for every slot: called at the start of every batch of episodes."""
        self.h = torch.zeros(num_envs, self.mdnrnn.hidden, device=self.device)
        self.c = torch.zeros_like(self.h)

    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """Raw (N,96,96,3) frames → latent means (N, z_dim): μ, not a sample, so acting is
        deterministic given the frame."""
        return self.encode_small(preprocess_frames(frames, crop=self.crop))

    @torch.inference_mode()
    def encode_small(self, small_frames: np.ndarray) -> torch.Tensor:
        """V's (N,64,64,3) uint8 input frames → latent means (N, z_dim)."""
        small = torch.from_numpy(np.ascontiguousarray(small_frames)).to(self.device)
        # NHWC uint8 permuted is already channels_last in memory: no copy before the cast.
        x = small.permute(0, 3, 1, 2).to(self.dtype).mul_(1.0 / 255.0)
        return self.encoder.encode_mean(x).float()

    @torch.inference_mode()
    def expected_rewards(self, ids: np.ndarray) -> np.ndarray:
        """What M's reward head says the last step of slots `ids` earned (read from their memory
        after that step's action). The dream's only reward is this head, so summed over a real
        drive it shows whether M knows what the agent's own driving is worth."""
        ids = np.asarray(ids)
        if self.one_at_a_time and len(ids) > 1:  # the same numbers whatever came back together
            return np.concatenate([self.expected_rewards(ids[i : i + 1]) for i in range(len(ids))])
        index = torch.as_tensor(ids, device=self.device)
        return self.mdnrnn.predict(self.h[index]).reward[:, 0].float().cpu().numpy()

    @torch.inference_mode()
    def act(
        self, frames: np.ndarray, params: torch.Tensor, ids: np.ndarray | None = None
    ) -> np.ndarray:
        """Actions (len(ids), 3) for the slots `ids` (all if None), each with its own controller.

        `params` holds one flat controller per slot in `ids` (P, n_params). The memory of those
        slots advances by one step with the chosen actions.
        """
        ids = np.arange(len(self.h)) if ids is None else np.asarray(ids)
        if self.one_at_a_time and len(ids) > 1:
            rows = [
                self.act(frames[i : i + 1], params[i : i + 1], ids[i : i + 1])
                for i in range(len(ids))
            ]
            return np.concatenate(rows)
        index = torch.as_tensor(ids, device=self.device)
        z = self.encode(frames)
        h, c = self.h[index], self.c[index]
        inputs = z if self.z_only else torch.cat([z, h], dim=1)
        actions = batched_controller_actions(params.to(self.device), inputs)
        self.h[index], self.c[index] = self.mdnrnn.advance(z, actions, h, c)
        return actions.cpu().numpy()
