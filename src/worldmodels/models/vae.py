"""Convolutional VAE ("V" in World Models): compresses a 64x64 RGB frame into a small latent z.

Architecture follows Ha & Schmidhuber (2018), appendix A.1: four stride-2 convolutions down to a
2x2 map, Gaussian heads for mu/logvar, and four transposed convolutions back up to 64x64.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def frames_to_tensor(frames: np.ndarray | torch.Tensor, device=None) -> torch.Tensor:
    """uint8 frames (N, 64, 64, 3) NHWC -> float32 (N, 3, 64, 64) in [0, 1].

    Rollouts are stored as uint8 NHWC (4x smaller than float, and the layout envs produce), so the
    conversion to the NCHW float layout convolutions want happens here, once, on the target device.
    """
    if isinstance(frames, np.ndarray) and not frames.flags.writeable:
        # Read-only arrays (e.g. np.load mmap) make torch warn; a copy is cheap next to .float().
        frames = frames.copy()
    t = torch.as_tensor(frames)
    if device is not None:
        # Move the compact uint8 bytes first; converting to float afterwards saves bandwidth.
        t = t.to(device)
    return t.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


class ConvVAE(nn.Module):
    """The World Models conv VAE; ``channels`` is configurable so tests can use a tiny net."""

    def __init__(self, z_dim: int = 32, channels: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError("ConvVAE expects exactly 4 encoder channel sizes")
        self.z_dim = z_dim
        self.channels = tuple(channels)
        c1, c2, c3, c4 = channels
        # 64 -> 31 -> 14 -> 6 -> 2 spatially (kernel 4, stride 2, no padding).
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c1, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(c2, c3, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(c3, c4, 4, stride=2),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.flat_dim = c4 * 2 * 2
        self.mu = nn.Linear(self.flat_dim, z_dim)
        self.logvar = nn.Linear(self.flat_dim, z_dim)

        # The decoder treats the flat vector as a 1x1 image with flat_dim channels and grows it
        # 1 -> 5 -> 13 -> 30 -> 64, mirroring the original code rather than the encoder exactly.
        self.fc_dec = nn.Linear(z_dim, self.flat_dim)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(self.flat_dim, c3, 5, stride=2),
            nn.ReLU(),
            nn.ConvTranspose2d(c3, c2, 5, stride=2),
            nn.ReLU(),
            nn.ConvTranspose2d(c2, c1, 6, stride=2),
            nn.ReLU(),
            nn.ConvTranspose2d(c1, 3, 6, stride=2),
            nn.Sigmoid(),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: float (N, 3, 64, 64) in [0, 1] -> (mu, logvar), each (N, z_dim)."""
        h = self.encoder(x)
        return self.mu(h), self.logvar(h)

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        """μ only, as acting uses it (it never samples): skips the logvar layer."""
        return self.mu(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (N, z_dim) -> reconstruction (N, 3, 64, 64) in [0, 1]."""
        h = self.fc_dec(z).view(-1, self.flat_dim, 1, 1)
        return self.decoder(h)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (x_hat, mu, logvar).

        Training samples z with the reparameterisation trick so gradients flow through the noise;
        evaluation decodes the posterior mean, which is deterministic and the best single guess.
        """
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.decode(z), mu, logvar


def vae_loss(
    x: torch.Tensor,
    x_hat: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    free_bits: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Reconstruction + free-bits KL loss, with extra figures for logging.

    Keys:
      loss     mean over batch of (sse + kl_term): the scalar to minimise.
      sse      per-image squared error summed over all 3*64*64 values, averaged over the batch
               (the figure papers quote).
      mse      per-value mean squared error (scale independent of image size).
      kl       true KL(q(z|x) || N(0, I)) summed over z dims, averaged over the batch (for logging).
      kl_term  the KL actually optimised: per-dimension KL averaged over the batch, clamped from
               below at ``free_bits`` nats, then summed over dims. Dimensions already under the
               floor get no gradient from the KL, so the optimiser is not rewarded for squeezing
               them all the way onto the prior; this stops the posterior collapsing and keeps the
               latent informative (the original World Models used a 0.5 nat/dim floor).

    Everything is computed in float32 so bf16 autocast outputs do not lose precision in the sums.
    """
    x, x_hat = x.float(), x_hat.float()
    mu, logvar = mu.float(), logvar.float()

    sq = (x_hat - x).pow(2)
    sse = sq.flatten(1).sum(dim=1).mean()
    mse = sq.mean()

    kl_per_dim = -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp())  # (N, z_dim)
    kl = kl_per_dim.sum(dim=1).mean()
    kl_term = kl_per_dim.mean(dim=0).clamp(min=free_bits).sum()

    return {"loss": sse + kl_term, "sse": sse, "mse": mse, "kl": kl, "kl_term": kl_term}
