"""MDN-RNN ("M" in World Models): an LSTM that predicts a Gaussian-mixture density over z_{t+1}.

One mixture of K Gaussians is predicted independently for every latent dimension, as in the
paper. Reward and episode-end ("done") heads share the same LSTM features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

LSTMState = tuple[torch.Tensor, torch.Tensor]


@dataclass
class MDNOutput:
    """Per-step predictions; mixture tensors are (B, T, K, Z), scalars (B, T)."""

    logpi: torch.Tensor  # log mixture weights, log_softmax over K
    mu: torch.Tensor
    logsigma: torch.Tensor
    reward: torch.Tensor
    done_logit: torch.Tensor


class MDNRNN(nn.Module):
    """LSTM over [z_t; a_t] with a single linear head producing the mixture, reward and done."""

    def __init__(
        self, z_dim: int = 32, action_dim: int = 3, hidden: int = 256, n_gaussians: int = 5
    ) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.action_dim = action_dim
        self.hidden = hidden
        self.n_gaussians = n_gaussians
        self.lstm = nn.LSTM(z_dim + action_dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 3 * n_gaussians * z_dim + 2)

    def forward(
        self, z: torch.Tensor, action: torch.Tensor, state: LSTMState | None = None
    ) -> tuple[MDNOutput, LSTMState]:
        """z (B, T, Z), action (B, T, A) -> (predictions for step t+1 at every t, final state).

        The same code path serves training on whole sequences and stepping with T=1 (passing the
        state back in), so the dream and the controller rollouts see exactly the trained model.
        """
        feats, state = self.lstm(torch.cat([z, action], dim=-1), state)
        return self._split_head(self.head(feats)), state

    def states_before(self, z: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """The hidden state h_t the controller reads at each step t of a recorded sequence
        z (B, T, Z), action (B, T, A) -> (B, T, H): zeros at t = 0, then h after step t-1."""
        feats, _ = self.lstm(torch.cat([z, action], dim=-1))
        return torch.cat([torch.zeros_like(feats[:, :1]), feats[:, :-1]], dim=1)

    def advance(
        self, z: torch.Tensor, action: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The one way to step M: z (B, Z), action (B, A), h and c (B, H) -> next (h, c).

        Acting needs only this (the controller reads h); dreaming adds `predict(h)`. The same
        weights as `forward`; one fused cell is several times cheaper than `nn.LSTM` called
        with one time step."""
        lstm = self.lstm
        x = torch.cat([z, action], dim=1)
        return torch.lstm_cell(
            x, (h, c), lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0
        )

    def predict(self, h: torch.Tensor) -> MDNOutput:
        """The mixture, reward and done predicted from hidden states h (B, H), with T = 1."""
        return self._split_head(self.head(h).unsqueeze(1))

    def _split_head(self, out: torch.Tensor) -> MDNOutput:
        b, t, _ = out.shape
        kz = self.n_gaussians * self.z_dim
        shape = (b, t, self.n_gaussians, self.z_dim)
        logits = out[..., :kz].reshape(shape)
        return MDNOutput(
            logpi=F.log_softmax(logits, dim=-2),
            mu=out[..., kz : 2 * kz].reshape(shape),
            logsigma=out[..., 2 * kz : 3 * kz].reshape(shape),
            reward=out[..., 3 * kz],
            done_logit=out[..., 3 * kz + 1],
        )


class Bf16Step:
    """M's step and prediction with their matrix products in bf16, for dreams by the thousand.

    On CPUs with native bf16 the LSTM's and the head's products, a large part of a dream step's
    time, run faster in bf16. Only the products' inputs are rounded: the biases, the
    gates' nonlinearities and the cell state c stay float32, so rounding errors do not pile up
    in the memory that a dream carries from step to step. Holds bf16 copies of the weights:
    build it again if M's weights change.
    """

    def __init__(self, model: MDNRNN) -> None:
        lstm = model.lstm
        self.model = model
        with torch.no_grad():
            weights = torch.cat([lstm.weight_ih_l0, lstm.weight_hh_l0], dim=1)
            self.cell_weight = weights.bfloat16()
            self.cell_bias = (lstm.bias_ih_l0 + lstm.bias_hh_l0).float()
            self.head_weight = model.head.weight.bfloat16()
            self.head_bias = model.head.bias.float()

    def advance(
        self, z: torch.Tensor, action: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `MDNRNN.advance` (PyTorch's gate order i, f, g, o)."""
        x = torch.cat([z, action, h], dim=1).bfloat16()
        gates = F.linear(x, self.cell_weight).float().add_(self.cell_bias)
        i, f, g, o = gates.chunk(4, dim=1)
        c = f.sigmoid_().mul_(c).add_(i.sigmoid_().mul_(g.tanh_()))
        return o.sigmoid_().mul_(c.tanh()), c

    def predict(self, h: torch.Tensor) -> MDNOutput:
        """As `MDNRNN.predict`."""
        out = F.linear(h.bfloat16(), self.head_weight).float().add_(self.head_bias)
        return self.model._split_head(out.unsqueeze(1))


def mdn_nll(
    logpi: torch.Tensor, mu: torch.Tensor, logsigma: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Negative log-likelihood of ``target`` (..., Z) under mixtures (..., K, Z); returns (..., Z).

    Works entirely in log space: log p = logsumexp_k(log pi_k + log N(t | mu_k, sigma_k)).
    Exponentiating the densities first underflows to 0 for targets far from every component and
    gives log(0) = -inf; logsumexp keeps the answer finite and the gradients usable.
    """
    t = target.unsqueeze(-2)  # broadcast over the K axis
    zscore = (t - mu) * torch.exp(-logsigma)
    log_normal = -0.5 * zscore.pow(2) - logsigma - LOG_SQRT_2PI
    return -torch.logsumexp(logpi + log_normal, dim=-2)


def _masked_mean(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of x (B, T) over positions with weight > 0; masked values never reach the sum."""
    if weight is None:
        return x.mean()
    # torch.where (not x * w) so NaN/inf garbage in padded positions cannot leak in as 0 * inf.
    kept = torch.where(weight > 0, x * weight, torch.zeros_like(x))
    return kept.sum() / weight.sum().clamp(min=1e-8)


def mdnrnn_loss(
    out: MDNOutput,
    z_next: torch.Tensor,
    reward: torch.Tensor,
    done: torch.Tensor,
    mask: torch.Tensor | None = None,
    reward_weight: float = 1.0,
    done_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Training loss for the MDN-RNN; targets z_next (B, T, Z), reward and done (B, T).

    Keys:
      loss        nll + reward_weight * reward_mse + done_weight * done_bce.
      nll         mean NLL per latent dimension (averaged over B, T and Z): the quantity the
                  original implementation optimised; independent of z_dim.
      nll_sum     NLL summed over Z, averaged over B and T: the "sum over z" figure, i.e. the
                  NLL of the whole latent vector.
      reward_mse  squared error of the reward head.
      done_bce    binary cross-entropy (with logits) of the done head.

    ``mask`` (B, T), bool or float: positions with mask 0 (padding after an episode ended) are
    excluded from every mean. Everything is computed in float32.
    """
    logpi, mu, logsigma = out.logpi.float(), out.mu.float(), out.logsigma.float()
    weight = None if mask is None else mask.float()

    nll_z = mdn_nll(logpi, mu, logsigma, z_next.float())  # (B, T, Z)
    nll = _masked_mean(nll_z.mean(dim=-1), weight)
    nll_sum = _masked_mean(nll_z.sum(dim=-1), weight)

    reward_mse = _masked_mean((out.reward.float() - reward.float()).pow(2), weight)
    bce = F.binary_cross_entropy_with_logits(out.done_logit.float(), done.float(), reduction="none")
    done_bce = _masked_mean(bce, weight)

    loss = nll + reward_weight * reward_mse + done_weight * done_bce
    return {
        "loss": loss,
        "nll": nll,
        "nll_sum": nll_sum,
        "reward_mse": reward_mse,
        "done_bce": done_bce,
    }


def sample_next_z(
    out_step: MDNOutput,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    noise: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sample z_{t+1} (B, Z) from one step's mixture, (B, 1, K, Z) or (B, K, Z).

    Temperature tau follows the World Models dream: mixture logits are divided by tau and
    renormalised (tau < 1 picks the dominant component more often), and every sigma is scaled by
    sqrt(tau). tau is clamped to >= 1e-3 so tau -> 0 gives a near-deterministic sample, not NaN.
    The component is drawn by inverting the cumulative weights with one uniform per (B, Z):
    several times faster than `torch.multinomial` over B·Z rows of K choices. `noise` gives that
    uniform (B, 1, Z) and the Gaussian (B, Z) instead of drawing them, so rows given the same
    noise dream alike (common random numbers for candidates compared on one dream).
    """
    logpi, mu, logsigma = out_step.logpi, out_step.mu, out_step.logsigma
    if logpi.dim() == 4:
        logpi, mu, logsigma = logpi.squeeze(1), mu.squeeze(1), logsigma.squeeze(1)
    tau = max(float(temperature), 1e-3)
    b, k, z = logpi.shape
    probs = F.softmax(logpi.float() / tau, dim=1)  # (B, K, Z)
    if noise is None:
        u = torch.rand(b, 1, z, generator=generator, device=probs.device, dtype=probs.dtype)
        eps = torch.randn(b, z, generator=generator, device=probs.device, dtype=mu.dtype)
    else:
        u, eps = noise
    comp = (u > probs.cumsum(dim=1)).sum(dim=1, keepdim=True).clamp_(max=k - 1)  # (B, 1, Z)
    mu_k = mu.gather(1, comp).squeeze(1)
    sigma_k = logsigma.gather(1, comp).squeeze(1).exp() * math.sqrt(tau)
    return mu_k + sigma_k * eps
