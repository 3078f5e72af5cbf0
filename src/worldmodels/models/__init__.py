"""The three World Models networks: V (ConvVAE), M (MDNRNN) and C (linear controller)."""

from worldmodels.models.controller import (
    LinearController,
    batched_controller_actions,
    controller_param_count,
    squash_actions,
)
from worldmodels.models.mdnrnn import (
    MDNRNN,
    Bf16Step,
    MDNOutput,
    mdn_nll,
    mdnrnn_loss,
    sample_next_z,
)
from worldmodels.models.vae import ConvVAE, frames_to_tensor, vae_loss

__all__ = [
    "Bf16Step",
    "ConvVAE",
    "LinearController",
    "MDNOutput",
    "MDNRNN",
    "batched_controller_actions",
    "controller_param_count",
    "frames_to_tensor",
    "mdn_nll",
    "mdnrnn_loss",
    "sample_next_z",
    "squash_actions",
    "vae_loss",
]
