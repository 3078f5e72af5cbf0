"""`worldmodels run`: the whole pipeline in one resumable command, then the report.

collect → train-vae → visualize-vae → encode → train-mdnrnn → dream → train-controller →
evaluate → report. Each stage resumes from its own checkpoints; `run.json` records the stages
that finished (with the config they ran with), so a rerun after a kill skips them, once their
outputs are checked: a finished stage whose inputs changed since (its `inputs.json` says what it
ran on) starts over, and one whose output was damaged since (a truncated episode, a corrupt
model) runs again and heals it from its own files.
Any stage setting can be overridden: `--vae.epochs 3`, `--controller.population 32`, ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worldmodels.config import (
    add_config_arguments,
    config_from_args,
    option,
    save_config,
    to_jsonable,
)
from worldmodels.errors import UserError
from worldmodels.io import atomic_write_text
from worldmodels.layout import run_lock, writable_dir
from worldmodels.presets import presets
from worldmodels.seeds import COLLECT_TRACKS_PER_RUN_SEED, first
from worldmodels.stage_plan import Budget, Stage, load_record, run_stages

# Each run seed owns COLLECT_TRACKS_PER_RUN_SEED collection tracks, all below the training ones.
MAX_RUN_SEED = first("train") // COLLECT_TRACKS_PER_RUN_SEED - 1


@dataclass
class RunConfig:
    preset: str = option(
        "quick",
        "settings for every stage: smoke (~2 min), quick (≤60 min on 2 CPU cores), full (paper scale, GPU/cluster)",
        ("smoke", "quick", "full"),
    )
    run_dir: Path | None = option(None, "run directory (default: runs/<preset>)")
    seed: int = option(
        0,
        f"run seed, 0 to {MAX_RUN_SEED}: every stage's randomness (each run seed owns "
        f"{COLLECT_TRACKS_PER_RUN_SEED:,} collection tracks, seed*{COLLECT_TRACKS_PER_RUN_SEED} "
        f"on, below the training tracks at {first('train')}; V, M, dream and CMA-ES use it as "
        "their seed); evaluation tracks never change. A stage's own --<stage>.seed overrides it",
    )
    budget_min: float | None = option(
        None,
        "minutes the run may take (default: the preset's, 57 for quick, which leaves 3 of "
        "make run's 60 for the install); on a slower machine the controller's search gets "
        "what the other stages leave, never more than its own --controller.time-budget-min "
        "(0 = no run budget)",
        low=0,
    )
    force: bool = option(False, "redo every stage from scratch")

    def root(self) -> Path:
        return self.run_dir if self.run_dir is not None else Path("runs") / self.preset


# What vouches for each stage's inputs: the manifests (one checksum per file) and the model.json
# files (the checksum of the weights). When one changes, the stage is stale and starts over.
EPISODES = "data/episodes/manifest.jsonl"
VAE = "vae/model.json"
LATENTS = "latents/manifest.jsonl"
MDNRNN = "mdnrnn/model.json"
CONTROLLER = "controller/model.json"


def stages() -> list[Stage]:
    from worldmodels import report
    from worldmodels.stages import (
        collect,
        dream,
        encode,
        evaluate,
        train_controller,
        train_mdnrnn,
        train_vae,
        visualize_vae,
    )

    return [
        Stage(
            "collect",
            "collect",
            collect.CollectConfig,
            collect.run,
            (),
            EPISODES,
            "collect exploration rollouts, one file per episode (resumable)",
        ),
        Stage(
            "vae",
            "train-vae",
            train_vae.TrainVAEConfig,
            train_vae.run,
            (EPISODES,),
            VAE,
            "train V, the conv VAE, on the collected frames (resumable)",
        ),
        Stage(
            "visualize",
            "visualize-vae",
            visualize_vae.VisualizeVAEConfig,
            visualize_vae.run,
            (EPISODES, VAE),
            "vae/reconstructions.png",
            "write reconstruction and latent-traversal PNGs of the trained VAE",
        ),
        Stage(
            "encode",
            "encode",
            encode.EncodeConfig,
            encode.run,
            (EPISODES, VAE),
            LATENTS,
            "encode every episode into its VAE latents (mu, logvar) per frame (resumable)",
        ),
        Stage(
            "mdnrnn",
            "train-mdnrnn",
            train_mdnrnn.TrainMDNRNNConfig,
            train_mdnrnn.run,
            (LATENTS,),
            MDNRNN,
            "train M, the MDN-RNN, on the latents with truncated BPTT (resumable)",
        ),
        Stage(
            "dream",
            "dream",
            dream.DreamConfig,
            dream.run,
            (VAE, LATENTS, MDNRNN),
            "dream/dream.gif",
            "roll M forward from a real frame (or an agent's drive): real-vs-dream GIF and "
            "latent-error plot",
        ),
        Stage(
            "controller",
            "train-controller",
            train_controller.TrainControllerConfig,
            train_controller.run,
            (VAE, MDNRNN),
            CONTROLLER,
            "train the linear controller with CMA-ES, population batched in one env pool "
            "(resumable)",
        ),
        Stage(
            "evaluate",
            "evaluate",
            evaluate.EvaluateConfig,
            evaluate.run,
            (VAE, MDNRNN, CONTROLLER),
            "eval/eval.json",
            "score the saved controller on N official CarRacing-v3 tracks (mean ± std, GIFs)",
        ),
        Stage(
            "report",
            "report",
            report.ReportConfig,
            report.run,
            help="rebuild report.md and report.html of a run dir",
        ),
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, RunConfig)
    add_stage_arguments(parser, stages())


def add_stage_arguments(parser: argparse.ArgumentParser, chosen: list[Stage]) -> None:
    """One `--<stage>.<field>` flag per setting of each chosen stage (its run dir is the run's)."""
    for stage in chosen:
        add_config_arguments(parser, stage.config, prefix=f"{stage.key}.", skip=("run_dir",))


SEEDED_BY_RUN = ("collect", "vae", "visualize", "mdnrnn", "dream", "controller")  # not evaluate


def stage_seed(stage_key: str, run_seed: int) -> int:
    """The seed a stage gets from the run seed: collection tracks are spaced so runs never share
    a track; the evaluation tracks are the protocol and never move."""
    return run_seed * COLLECT_TRACKS_PER_RUN_SEED if stage_key == "collect" else run_seed


def stage_config(stage: Stage, cfg: RunConfig, args: argparse.Namespace | None) -> Any:
    """The stage's config in this run: its preset's, in this run dir, with the run's seed and
    --force, then the stage's own flags (`--vae.epochs 3`) over all of that."""
    preset = presets()[cfg.preset].configs.get(stage.key) or stage.config()
    fields = {f.name for f in dataclasses.fields(stage.config)}
    changes: dict[str, Any] = {"run_dir": cfg.root()}
    if "force" in fields and cfg.force:
        changes["force"] = True
    if stage.key in SEEDED_BY_RUN and "seed" in fields:
        changes["seed"] = stage_seed(stage.key, cfg.seed)
    return config_from_args(
        stage.config, args, f"{stage.key}.", dataclasses.replace(preset, **changes)
    )


def run_pipeline(cfg: RunConfig, args: argparse.Namespace | None = None) -> Path:
    if cfg.preset not in presets():
        raise UserError(f"unknown preset {cfg.preset!r}: choose one of {', '.join(presets())}")
    if cfg.budget_min is not None and cfg.budget_min < 0:
        raise UserError(f"--budget-min {cfg.budget_min:g}: give minutes, or 0 for no budget")
    cfg = dataclasses.replace(cfg, run_dir=cfg.root())
    root = writable_dir(cfg.run_dir)
    with run_lock(root, "run"):
        _run_plan(cfg, root, args)
    return root


def _run_plan(cfg: RunConfig, root: Path, args: argparse.Namespace | None) -> None:
    record_path = root / "run.json"
    if "round" in load_record(record_path):
        raise UserError(f"{root} is a round's run dir: rerun `worldmodels round` to resume it")
    record = {} if cfg.force else load_record(record_path)
    if record.get("preset") not in (None, cfg.preset):
        raise UserError(
            f"{root} holds a {record['preset']!r} run: use --preset {record['preset']} or another --run-dir"
        )
    record.update({"preset": cfg.preset, "stages": record.get("stages", {})})
    save_config(cfg, root / "run_config.json")

    plan = [(stage, stage_config(stage, cfg, args)) for stage in stages()]
    for _, stage_cfg in plan:  # a bad override stops here, not after an hour of earlier stages
        if hasattr(stage_cfg, "validate"):
            stage_cfg.validate()
    atomic_write_text(
        root / "resolved_config.json",
        json.dumps({s.key: to_jsonable(c) for s, c in plan}, indent=2) + "\n",
    )
    preset = presets()[cfg.preset]
    minutes = preset.budget_min if cfg.budget_min is None else cfg.budget_min
    budget = Budget(minutes, elastic="controller", pace_stage="collect")
    run_stages(root, plan, record, preset.expected_min, budget)


def run_from_args(args: argparse.Namespace) -> Path:
    return run_pipeline(config_from_args(RunConfig, args), args)
