"""The presets of `worldmodels run`, each stage's settings as an instance of its own config.

A misspelt setting (`TrainVAEConfig(epoch=2)`) fails when the preset is built, and the preset
test builds every one, so it fails in the test suite, not an hour into a run. A stage a preset
does not name runs with its defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    configs: dict[str, Any]  # stage key -> that stage's config (run dir, force and seed set later)
    # minutes each stage is expected to take on a 2-core CPU, for the "time left" estimate
    expected_min: dict[str, float] = field(default_factory=dict)
    budget_min: float = 0.0  # the whole run's minutes (0 = none): see `stage_plan.Budget`


def presets() -> dict[str, Preset]:
    from worldmodels.stages.collect import CollectConfig
    from worldmodels.stages.dream import DreamConfig
    from worldmodels.stages.evaluate import EvaluateConfig
    from worldmodels.stages.train_controller import TrainControllerConfig
    from worldmodels.stages.train_mdnrnn import TrainMDNRNNConfig
    from worldmodels.stages.train_vae import TrainVAEConfig

    smoke = Preset(
        {
            "collect": CollectConfig(episodes=6, max_steps=60, envs=6),
            "vae": TrainVAEConfig(
                epochs=1,
                channels=(8, 16, 16, 32),
                batch_size=32,
                precision="fp32",
                channels_last="off",
            ),
            "mdnrnn": TrainMDNRNNConfig(epochs=2, hidden=32, batch_size=4),
            "dream": DreamConfig(steps=20, error_episodes=1, error_samples=2),
            "controller": TrainControllerConfig(
                generations=2,
                population=4,
                rollouts=1,
                max_steps=60,
                check_steps=60,
                check_every=1,
                check_episodes=2,
                select_top=2,
                select_episodes=2,
            ),
            "evaluate": EvaluateConfig(episodes=2, max_steps=60, gif=1),
        }
    )
    quick = Preset(
        {
            "collect": CollectConfig(episodes=200, max_steps=1000, policy="brownian"),
            # a slow CPU trains V on fewer frames rather than take minutes from C
            "vae": TrainVAEConfig(epochs=2, time_budget_min=9.0),
            "mdnrnn": TrainMDNRNNConfig(epochs=20),
            # 32 candidates ranked by 2 tracks each, sigma capped by a schedule that halves it
            # 1.6 times by the last generation (where 48 fit the budget, one halving every 30
            # of them): docs/experiments.md (p32hl30) says why. The search starts from zero,
            # not from the road follower: with the 37-49 generations of a faster machine it
            # scored higher on all three V and M paired so far (docs/experiments.md, "The zero
            # start on a faster machine" and "Fresh-clone runs of the zero-start preset")
            "controller": TrainControllerConfig(
                generations=1000,
                population=32,
                rollouts=2,
                sigma_halvings=1.6,
                start="zero",
                time_budget_min=29.5,
            ),
            "evaluate": EvaluateConfig(episodes=100),
        },
        expected_min={
            "collect": 2,
            "vae": 9.5,
            "visualize": 0.2,
            "encode": 1.2,
            "mdnrnn": 1,
            "dream": 0.2,
            "controller": 30,
            "evaluate": 7.5,
            "report": 0.2,
        },
        budget_min=57.0,
    )
    full = Preset(
        {
            "collect": CollectConfig(episodes=10_000, max_steps=1000, policy="random"),
            "vae": TrainVAEConfig(epochs=10),
            "mdnrnn": TrainMDNRNNConfig(epochs=20),
            "controller": TrainControllerConfig(generations=300, population=64, rollouts=16),
            "evaluate": EvaluateConfig(episodes=100),
        }
    )
    return {"smoke": smoke, "quick": quick, "full": full}
