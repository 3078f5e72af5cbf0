"""Settings several test files share (imported as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from worldmodels.presets import presets
from worldmodels.stages.train_controller import TrainControllerConfig


def tiny_search(root: Path, **changes) -> TrainControllerConfig:
    """The smoke preset's controller search (4 candidates, the mean checked every generation on
    2 tracks, 2 finalists) on 2 tracks × 30 steps per candidate."""
    smoke = presets()["smoke"].configs["controller"]
    tiny = dict(rollouts=2, max_steps=30, check_steps=30)
    return dataclasses.replace(smoke, run_dir=root, **{**tiny, **changes})
