"""Controller ("C" in World Models): a single linear layer from [z; h] to the three car actions.

It is deliberately tiny (867 parameters for z=32, h=256) so that CMA-ES can optimise it directly.
Parameters are kept as one flat vector, the representation CMA-ES works with.
"""

from __future__ import annotations

import torch
from torch import nn


def controller_param_count(input_dim: int, action_dim: int = 3) -> int:
    """Size of the flat vector: weight (action_dim x input_dim) plus bias (action_dim)."""
    return action_dim * input_dim + action_dim


def squash_actions(raw: torch.Tensor) -> torch.Tensor:
    """Map raw outputs (..., 3) to CarRacing actions, as in the World Models repo.

    steer = tanh(raw0) in [-1, 1]; gas = (tanh(raw1) + 1) / 2 in [0, 1] so gas is never negative;
    brake = clip(tanh(raw2), 0, 1) so the controller only brakes when its output is positive,
    which makes "no brake" easy to reach (half of the raw range) and avoids constant dragging.
    """
    t = torch.tanh(raw)
    steer = t[..., 0]
    gas = (t[..., 1] + 1.0) * 0.5
    brake = t[..., 2].clamp(0.0, 1.0)
    return torch.stack([steer, gas, brake], dim=-1)


def _split_flat(
    params: torch.Tensor, input_dim: int, action_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., n_params) -> weight (..., action_dim, input_dim), bias (..., action_dim)."""
    n_w = action_dim * input_dim
    weight = params[..., :n_w].unflatten(-1, (action_dim, input_dim))
    return weight, params[..., n_w : n_w + action_dim]


def join_flat(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """weight (action_dim, input_dim), bias (action_dim) -> the flat vector `_split_flat` reads."""
    return torch.cat([weight.flatten(), bias])


def batched_controller_actions(
    params: torch.Tensor, inputs: torch.Tensor, action_dim: int = 3
) -> torch.Tensor:
    """Evaluate P different controllers at once: params (P, n_params), inputs (P, input_dim).

    Each population member gets its own input (its own environment), so this is one batched
    matrix-vector product rather than P small matmuls; returns squashed actions (P, action_dim).
    """
    weight, bias = _split_flat(params, inputs.shape[-1], action_dim)
    raw = torch.bmm(weight, inputs.unsqueeze(-1)).squeeze(-1) + bias
    return squash_actions(raw)


class LinearController(nn.Module):
    """A single controller held as one flat parameter vector (easy to save and hand to CMA-ES)."""

    def __init__(self, input_dim: int, action_dim: int = 3) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.action_dim = action_dim
        self.params = nn.Parameter(torch.zeros(controller_param_count(input_dim, action_dim)))

    @classmethod
    def from_flat(cls, vec: torch.Tensor, action_dim: int = 3) -> LinearController:
        """Build a controller from a flat vector; input_dim is inferred from its length."""
        vec = torch.as_tensor(vec, dtype=torch.float32).flatten()
        n = vec.numel()
        if n % action_dim != 0:
            raise ValueError(f"{n} parameters do not fit action_dim={action_dim}")
        ctrl = cls(n // action_dim - 1, action_dim)
        with torch.no_grad():
            ctrl.params.copy_(vec)
        return ctrl

    def flat(self) -> torch.Tensor:
        """A detached copy of the flat parameter vector."""
        return self.params.detach().clone()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs (B, input_dim) -> squashed actions (B, action_dim)."""
        weight, bias = _split_flat(self.params, self.input_dim, self.action_dim)
        return squash_actions(inputs @ weight.T + bias)
