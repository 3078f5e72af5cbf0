"""Shared fixtures: headless pygame, quiet progress bars, tiny real episodes made on the spot."""

from __future__ import annotations

import os

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ["WORLDMODELS_PROGRESS"] = "0"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from worldmodels.stages import collect  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run dir with 6 real envpool episodes of 40 steps (collected in about a second)."""
    root = tmp_path_factory.mktemp("tiny_run")
    collect.run(collect.CollectConfig(run_dir=root, episodes=6, max_steps=40, envs=6))
    return root


TINY_VAE = {"z_dim": 8, "channels": [4, 8, 8, 16]}
TINY_MDN = {"z_dim": 8, "action_dim": 3, "hidden": 16, "n_gaussians": 2}


@pytest.fixture
def trained_run(tiny_run, tmp_path) -> Path:
    """A run dir with the tiny real data, small random V and M, and a random controller, saved
    exactly as the stages save them."""
    import shutil

    import torch

    from worldmodels.checkpoint import save_model
    from worldmodels.layout import RunDir
    from worldmodels.models import MDNRNN, ConvVAE, LinearController, controller_param_count

    root = tmp_path / "trained"
    shutil.copytree(RunDir(tiny_run).data, RunDir(root).data)
    torch.manual_seed(0)
    vae = ConvVAE(TINY_VAE["z_dim"], tuple(TINY_VAE["channels"]))
    save_model(RunDir(root).vae, vae, TINY_VAE)
    save_model(RunDir(root).mdnrnn, MDNRNN(**TINY_MDN), TINY_MDN)
    input_dim = TINY_VAE["z_dim"] + TINY_MDN["hidden"]
    params = torch.randn(controller_param_count(input_dim)) * 0.5
    params[3 * input_dim + 1] = 2.0  # the gas bias: the car drives off
    controller = LinearController.from_flat(params)
    arch = {"input_dim": input_dim, "action_dim": 3}
    from worldmodels.artifacts import world_model_sources

    meta = {"z_only": False, "generation": 1, **world_model_sources(root)}
    save_model(RunDir(root).controller, controller, arch, meta)
    return root
