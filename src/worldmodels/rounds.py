"""`worldmodels round`: one round of the paper's iterative training (its section 5), as one command.

The trained run's own agent drives fresh tracks with noise on its weights, so M gets to see what
the controllers CMA-ES will try do: a car at speed in a corner, near misses, recoveries, which
exploration data rarely shows. The round writes a new run dir with the old episodes and the new
ones, V as it was (the frames show the same world; retraining it would change every latent), M
trained again from scratch on all the episodes, a controller trained again from scratch on that
M (its inputs h mean something else now), the evaluation and the report. Every stage runs with the
settings the old run used unless a `--<stage>.<field>` flag says otherwise; the old run is only
read. The new run dir resumes like `run`'s: a rerun after a kill goes on where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worldmodels.config import (
    Config,
    add_config_arguments,
    config_from_args,
    load_config,
    option,
    to_jsonable,
)
from worldmodels.data.manifest import (
    ManifestEntry,
    append_manifest,
    episode_file_name,
    read_manifest,
)
from worldmodels.errors import UserError
from worldmodels.io import atomic_link
from worldmodels.layout import RunDir, run_lock, writable_dir
from worldmodels.pipeline import CONTROLLER, add_stage_arguments, stages
from worldmodels.progress import log
from worldmodels.stage_plan import Stage, load_record, record_done, run_stages, save_record
from worldmodels.stages.collect import CollectConfig
from worldmodels.stages.collect import run as collect

RETRAINED = ("encode", "mdnrnn", "dream", "controller", "evaluate")  # in this order
ON_POLICY = "onpolicy"  # the new episodes' own run dir inside the round's, as collect wrote them


@dataclass
class RoundConfig(Config):
    run_dir: Path = option(
        Path("runs/quick"), "the trained run whose agent drives the new episodes (only read)"
    )
    out: Path | None = option(None, "the round's new run dir (default: <run-dir>-round)")
    episodes: int = option(120, "on-policy episodes to collect with the run's agent", low=1)
    agent_noise: float = option(
        0.05,
        "std of the Gaussian noise on the controller's weights, drawn per episode in CMA-ES's "
        "units (as `collect --agent-noise`)",
        low=0,
    )
    envs: int = option(16, "env slots stepped together while collecting", low=1)
    workers: int = option(0, "envpool threads while collecting (0 = one per CPU core)", low=0)

    def target(self) -> Path:
        default = self.run_dir.with_name(self.run_dir.name + "-round")
        return self.out if self.out is not None else default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, RoundConfig)
    add_stage_arguments(parser, _retrained())


def run_from_args(args: argparse.Namespace) -> Path:
    return run_round(config_from_args(RoundConfig, args), args)


def run_round(cfg: RoundConfig, args: argparse.Namespace | None = None) -> Path:
    cfg.validate()
    source, root = RunDir(cfg.run_dir), cfg.target()
    if not (source.root / CONTROLLER).exists():
        raise UserError(
            f"{source.root} has no trained controller to drive: finish it first "
            f"(`worldmodels run --run-dir {source.root}`)"
        )
    if root.resolve() == source.root.resolve():
        raise UserError("--out must be a new run dir: the round never writes into --run-dir")
    plan = [(stage, _stage_config(stage, source.root, root, args)) for stage in _retrained()]
    for _, stage_cfg in plan:  # a bad override stops here, before anything is written
        stage_cfg.validate()
    with run_lock(root, "round"):
        record = load_record(root / "run.json")
        previous = load_record(source.root / "run.json")
        first = _share_old_run(source, RunDir(root))
        record.update(preset=previous.get("preset"), round=_round_meta(cfg, source, first))
        # written before anything runs, so that `run` refuses this dir from the start
        save_record(root, record)
        log(f"round: {first} episodes shared from {source.root}; its agent drives {cfg.episodes}")
        _timed_collect(cfg, source, root, first, record)
        run_stages(root, plan, record, {})
    return root


def _retrained() -> list[Stage]:
    by_key = {stage.key: stage for stage in stages()}
    return [by_key[key] for key in RETRAINED]


def _stage_config(stage: Stage, source: Path, root: Path, args: argparse.Namespace | None) -> Any:
    """The settings the old run used for this stage (saved beside its output), in the new run
    dir, with this command's `--<stage>.<field>` flags over them."""
    saved = source / Path(stage.output).parent / "config.json"
    base = load_config(stage.config, saved) if saved.exists() else stage.config()
    return config_from_args(
        stage.config, args, f"{stage.key}.", dataclasses.replace(base, run_dir=root)
    )


def _share_old_run(source: RunDir, layout: RunDir) -> int:
    """Give the round the old run's episodes, latents and V (hard links where the disk allows:
    nothing is copied twice, and the old run stays as it was); return how many episodes."""
    entries = read_manifest(source.episodes)
    if not entries or not (source.vae / "model.json").exists():
        raise UserError(f"{source.root} has no episodes or no V: finish that run first")
    _list_into(source.episodes, writable_dir(layout.episodes), entries)
    _list_into(source.latents, writable_dir(layout.latents), read_manifest(source.latents))
    writable_dir(layout.vae)
    copied = [source.data / "config.json", source.latents / "vae.json"]  # what they are
    copied += [source.vae / name for name in ("model.safetensors", "model.json", "config.json")]
    for path in copied:  # not V's inputs.json: V did not see the new episodes
        if path.exists():
            atomic_link(path, layout.root / path.relative_to(source.root))
    return max(e.index for e in entries) + 1


def _list_into(source: Path, folder: Path, entries: list[ManifestEntry], first: int = 0) -> None:
    """Give `folder` the listed files of `source` as its episodes first, first + 1, ... (each
    listed in its manifest once its file is in place), skipping those it already has."""
    present = {e.index for e in read_manifest(folder)}
    for entry in entries:
        index = first + entry.index
        if index not in present:
            name = episode_file_name(index)
            atomic_link(source / entry.file, folder / name)
            append_manifest(folder, dataclasses.replace(entry, index=index, file=name))


def _timed_collect(cfg: RoundConfig, source: RunDir, root: Path, first: int, record: dict) -> None:
    """Collect (or finish collecting) the new episodes and list them with the old ones; the
    first time it completes, its wall time goes into run.json beside the other stages', so the
    report's stage table counts it."""
    started = time.perf_counter()
    collected = _collect_on_policy(cfg, source, root, first)
    _list_into(collected, RunDir(root).episodes, read_manifest(collected), first)
    if not record.get("stages", {}).get("collect", {}).get("done"):
        settings = {k: v for k, v in to_jsonable(cfg).items() if k not in ("run_dir", "out")}
        record_done(root, record, "collect", settings, time.perf_counter() - started)


def _collect_on_policy(cfg: RoundConfig, source: RunDir, root: Path, first: int) -> Path:
    """The new episodes, on the tracks right after the old ones (episode i of the round's run
    dir plays track seed + i, as in any run), driven by the old run's agent."""
    explored = load_config(CollectConfig, source.data / "config.json")
    collect_cfg = dataclasses.replace(
        explored,
        run_dir=root / ON_POLICY,
        episodes=cfg.episodes,
        policy="agent",
        agent=source.root.resolve(),
        agent_noise=cfg.agent_noise,
        seed=explored.seed + first,
        envs=cfg.envs,
        workers=cfg.workers,
    )
    return collect(collect_cfg)


def _round_meta(cfg: RoundConfig, source: RunDir, first: int) -> dict[str, Any]:
    return {
        "from": str(source.root.resolve()),
        "episodes_before": first,
        **{k: v for k, v in to_jsonable(cfg).items() if k in ("episodes", "agent_noise")},
    }
