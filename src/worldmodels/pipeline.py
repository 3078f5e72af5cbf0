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
import time
from collections.abc import Callable
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
from worldmodels.progress import log
from worldmodels.provenance import changed_inputs, input_sums, output_problem, record_inputs
from worldmodels.seeds import COLLECT_TRACKS_PER_RUN_SEED


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
        "run seed: every stage's randomness (collection tracks start at seed*10000; V, M, dream "
        "and CMA-ES use it as their seed); evaluation tracks never change. A stage's own "
        "--<stage>.seed overrides it",
    )
    force: bool = option(False, "redo every stage from scratch")

    def root(self) -> Path:
        return self.run_dir if self.run_dir is not None else Path("runs") / self.preset


@dataclass(frozen=True)
class Stage:
    key: str  # flag prefix and run.json key
    command: str
    config: type
    run: Callable[[Any], Any]
    inputs: tuple[str, ...] = ()  # files (relative to the run dir) that vouch for its inputs
    output: str = ""  # the file it finishes with: a finished stage missing it runs again
    help: str = ""  # its command's one-line help (the CLI's stage commands are these stages)

    def execute(self, cfg: Any) -> Any:
        """Run the stage, then record beside its output the inputs it ran on, so that `run`
        and the report can tell, whoever started it, whether it is still up to date."""
        sums = input_sums(cfg.run_dir, self.inputs)  # as they were when it started
        result = self.run(cfg)
        if self.inputs and self.output and _reads_and_writes_its_run_dir(cfg):
            record_inputs(cfg.run_dir, self.output, self.command, sums)
        return result


def _reads_and_writes_its_run_dir(cfg: Any) -> bool:
    """False for a stage pointed at an exported agent or writing elsewhere (`--agent`,
    `--pretrained`, `--out`): the run dir's files are then not what it ran on or wrote."""
    elsewhere = getattr(cfg, "agent", None), getattr(cfg, "out", None)
    return elsewhere == (None, None) and not getattr(cfg, "pretrained", False)


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
    for stage in stages():
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
    base = dataclasses.replace(preset, **changes)
    return config_from_args(stage.config, args, prefix=f"{stage.key}.", base=base) if args else base


def _load_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def run_pipeline(cfg: RunConfig, args: argparse.Namespace | None = None) -> Path:
    if cfg.preset not in presets():
        raise UserError(f"unknown preset {cfg.preset!r}: choose one of {', '.join(presets())}")
    cfg = dataclasses.replace(cfg, run_dir=cfg.root())
    root = writable_dir(cfg.run_dir)
    with run_lock(root, "run"):
        _run_plan(cfg, root, args)
    return root


def _run_plan(cfg: RunConfig, root: Path, args: argparse.Namespace | None) -> None:
    record_path = root / "run.json"
    record = {} if cfg.force else _load_record(record_path)
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
    expected = presets()[cfg.preset].expected_min
    started = time.perf_counter()
    for k, (stage, stage_cfg) in enumerate(plan, 1):
        settings = to_jsonable(stage_cfg)
        settings.pop("force", None)
        settings.pop("run_dir", None)  # a moved or copied run dir is the same run
        done = record["stages"].get(stage.key, {})
        elapsed = time.perf_counter() - started
        left = sum(expected.get(s.key, 0) for s, _ in plan[k - 1 :])
        eta = f", about {left:.0f} min left" if left else ""
        stale = done.get("done") and bool(changed_inputs(root, stage.output, stage.command))
        same = done.get("done") and done.get("config") == settings and not stale
        damage = output_problem(root / stage.output) if same and stage.output else None
        if same and stage.output and not damage:
            log(f"[{k}/{len(plan)}] {stage.command}: already done, skipped")
            continue
        if damage:
            log(
                f"[{k}/{len(plan)}] {stage.command}: its output is damaged ({damage}): running again"
            )
        if stale:
            log(
                f"[{k}/{len(plan)}] {stage.command}: its inputs changed since it ran: starting over"
            )
            if hasattr(stage_cfg, "force"):
                stage_cfg = dataclasses.replace(stage_cfg, force=True)
        log(f"[{k}/{len(plan)}] {stage.command} (elapsed {_clock(elapsed)}{eta})")
        stage_started = time.perf_counter()
        stage.execute(stage_cfg)
        wall = time.perf_counter() - stage_started
        record["stages"][stage.key] = {"done": True, "config": settings, "wall_s": round(wall, 1)}
        atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
    from worldmodels import report

    report.run(report.ReportConfig(run_dir=root))  # again, now that every timing is recorded
    log(f"run: finished in {_clock(time.perf_counter() - started)}; report at {root / 'report.md'}")


def run_from_args(args: argparse.Namespace) -> Path:
    return run_pipeline(config_from_args(RunConfig, args), args)
