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
