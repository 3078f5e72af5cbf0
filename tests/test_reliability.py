"""One writer per run dir: a second command stops at once and says who holds it; a lock whose
holder died is taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from worldmodels.cli import main
from worldmodels.errors import UserError
from worldmodels.layout import LOCK, run_lock

HOLDER = textwrap.dedent(
    """
    import sys, time
    from worldmodels.layout import run_lock
    with run_lock(sys.argv[1], "train-vae"):
        print("locked", flush=True)
        time.sleep(60)
    """
)


def test_a_second_writer_exits_at_once_naming_the_holder(trained_run, tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(trained_run)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(p.name for p in trained_run.rglob("*"))
        assert main(["report", "--run-dir", str(trained_run)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"in use by pid {holder.pid}" in err[0] and "train-vae" in err[0]
        out = tmp_path / "agent"
        assert main(["export", "--run-dir", str(trained_run), "--out", str(out)]) == 0  # reads only
        assert main(["dream", "--run-dir", str(trained_run), "--steps", "3"]) == 2
        assert sorted(p.name for p in trained_run.rglob("*")) == before
    finally:
        holder.kill()
        holder.wait()
    assert main(["report", "--run-dir", str(trained_run)]) == 0  # the kernel dropped its lock


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    root = tmp_path / "run"
    root.mkdir()
    stale = {"pid": int(dead.stdout), "command": "collect", "since": "yesterday"}
    (root / LOCK).write_text(json.dumps(stale))
    with run_lock(root, "train-vae"):
        assert json.loads((root / LOCK).read_text())["pid"] == os.getpid()


def test_taking_the_lock_sweeps_the_half_writes_of_a_killed_holder(tmp_path):
    """Temp files in the run dir and its stage folders go (a stage found done never sweeps its
    folder); finished files stay, a folder linked from another run dir is left to its own
    writer, and folders that are none of a run's (a --run-dir aimed at a home folder) are not
    looked into."""
    root, other = tmp_path / "run", tmp_path / "other"
    for folder in (root / "mdnrnn", root / "controller" / "best", root / "data", root / "notes"):
        folder.mkdir(parents=True)
    (other / "episodes").mkdir(parents=True)
    leftovers = [
        root / ".run.json.ab12.tmp",
        root / "mdnrnn" / ".config.json.x9.tmp",
        root / "controller" / "best" / ".model.json.k2.tmp",
    ]
    kept = [
        root / "mdnrnn" / "config.json",
        other / "episodes" / ".episode_0.npz.q1.tmp",
        root / "notes" / ".draft.txt.tmp",
    ]
    for path in leftovers + kept:
        path.write_text("half")
    (root / "data" / "episodes").symlink_to(other / "episodes")
    with run_lock(root, "train-mdnrnn"):
        assert not any(path.exists() for path in leftovers)
        assert all(path.read_text() == "half" for path in kept)


def test_a_command_that_writes_nothing_leaves_no_run_dir_behind(tmp_path, capsys):
    missing = tmp_path / "typo"
    assert main(["evaluate", "--run-dir", str(missing)]) == 2
    assert "train-controller" in capsys.readouterr().err and not missing.exists()


BAD_INPUTS = [
    (["collect", "--episodes", "-1"], "--episodes"),
    (["collect", "--max-steps", "0"], "--max-steps"),
    (["collect", "--max-steps", "1001"], "--max-steps"),
    (["collect", "--envs", "0"], "--envs"),
    (["collect", "--workers", "-1"], "--workers"),
    (["collect", "--compress-level", "10"], "--compress-level"),
    (["collect", "--seed", "99990", "--episodes", "20"], "leave the range kept for"),
    (["collect", "--episodes", "many"], "invalid int value"),
    (["collect", "--policy", "agent"], "--policy agent needs --agent"),
    (["collect", "--agent-noise", "-0.1"], "--agent-noise must be >= 0"),
    (["train-vae", "--epochs", "0"], "--epochs"),
    (["train-vae", "--channels", "8,16"], "--channels"),
    (["train-vae", "--val-fraction", "1"], "--val-fraction"),
    (["train-vae", "--lr", "0"], "--lr"),
    (["train-vae", "--precision", "fp8"], "invalid choice"),
    (["visualize-vae", "--columns", "0"], "--columns"),
    (["encode", "--batch-size", "0"], "--batch-size"),
    (["train-mdnrnn", "--epochs", "-1"], "--epochs"),
    (["train-mdnrnn", "--hidden", "0"], "--hidden"),
    (["train-mdnrnn", "--val-fraction", "1.5"], "--val-fraction"),
    (["train-mdnrnn", "--lr", "-0.1"], "--lr"),
    (["dream", "--steps", "0"], "--steps"),
    (["dream", "--error-samples", "0"], "--error-samples"),
    (["dream", "--policy", "walk"], "invalid choice"),
    (["train-controller", "--population", "1"], "--population"),
    (["train-controller", "--max-steps", "0"], "--max-steps"),
    (["train-controller", "--sigma0", "0"], "--sigma0"),
    (["train-controller", "--mirrors", "--population", "15"], "--mirrors"),
    (["train-controller", "--ray-chunks", "-1"], "--ray-chunks"),
    (["train-controller", "--ray-timeout-min", "0"], "--ray-timeout-min"),
    (["train-controller", "--select-top", "-1"], "--select-top"),
    (["train-controller", "--check-episodes", "0"], "--check-episodes"),
    (["train-controller", "--check-steps", "0"], "--check-steps"),
    (["train-controller", "--time-budget-min", "-1"], "--time-budget-min"),
    (["train-controller", "--searches", "0"], "--searches"),
    (["train-controller", "--searches", "2", "--check-every", "0"], "--check-every"),
    (["train-controller", "--deterministic", "--time-budget-min", "5"], "--deterministic"),
    (["train-controller", "--generations", "999999"], "--generations"),
    (["train-controller", "--max-rollouts", "1"], "--max-rollouts"),
    (["train-controller", "--dream-temperature", "0"], "--dream-temperature"),
    (["train-controller", "--dream-generations", "40"], "--dream-generations"),
    (["train-controller", "--env", "dream", "--backend", "ray"], "--backend local"),
    (["evaluate", "--dream-episodes", "-1"], "--dream-episodes"),
    (["evaluate", "--episodes", "0"], "--episodes"),
    (["evaluate", "--max-steps", "2000"], "--max-steps"),
    (["evaluate", "--env", "atari"], "invalid choice"),
    (["play", "--episodes", "0"], "--episodes"),
    (["play", "--fps", "-1"], "--fps"),
    (["export"], "--out"),
    (["run", "--preset", "huge"], "invalid choice"),
]


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse's own errors
        return int(stop.code)


@pytest.mark.parametrize("argv, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, message):
    run_dir = tmp_path / "run"
    assert _exit_code([*argv, "--run-dir", str(run_dir)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert "Traceback" not in captured.out + captured.err
    assert not run_dir.exists()


def test_bounds_and_choices_declared_once_hold_for_configs_built_in_python_and_flags(capsys):
    """A field's bounds and choices live in its `option(...)`: the same declaration refuses a
    config built in Python (no argparse involved) and the flags of commands without a run dir."""
    from worldmodels.bench import BenchConfig
    from worldmodels.check import CheckConfig
    from worldmodels.stages.dream import DreamConfig
    from worldmodels.stages.train_controller import TrainControllerConfig
    from worldmodels.stages.train_vae import TrainVAEConfig

    refused = [
        (TrainControllerConfig(population=1), r"--population must be >= 2, got 1"),
        (TrainControllerConfig(max_steps=1001), r"--max-steps must be in 1\.\.1000, got 1001"),
        (TrainControllerConfig(sigma0=0.0), r"--sigma0 must be > 0, got 0.0"),
        (TrainVAEConfig(val_fraction=1.0), r"--val-fraction must be in \[0, 1\), got 1.0"),
        (DreamConfig(policy="walk"), r"unknown --policy 'walk': choose one of real, random"),
        (BenchConfig(envs=0), r"--envs must be >= 1, got 0"),
        (CheckConfig(steps=0), r"--steps must be >= 1, got 0"),
    ]
    for cfg, message in refused:
        with pytest.raises(UserError, match=message):
            cfg.validate()
    for argv in (["bench", "--envs", "0"], ["check", "--steps", "0"]):
        assert _exit_code(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "must be >= 1, got 0" in err[0], err


def _files(root) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_sigkill_in_every_stage_then_rerun_ends_complete_valid_and_as_if_never_killed(tmp_path):
    """The smoke pipeline is SIGKILLed at a random moment of the stage it is running, again and
    again (at most twice per stage), rerun each time, and ends like an uninterrupted run."""
    import random
    import signal
    import time

    from worldmodels.artifacts import load_acting_agent
    from worldmodels.data import open_episodes
    from worldmodels.data.latents import open_latents
    from worldmodels.layout import RunDir
    from worldmodels.metrics import read_metrics

    rng = random.Random(0)
    root = tmp_path / "killed"
    cmd = [sys.executable, "-m", "worldmodels.cli", "run", "--preset", "smoke"]
    env = dict(os.environ, WORLDMODELS_PROGRESS="0")
    kills: list[str] = []  # the stage each kill landed in, once per stage
    for _ in range(20):
        proc = subprocess.Popen(
            [*cmd, "--run-dir", str(root)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        killed = False
        for line in proc.stderr:  # "[k/9] command (elapsed ...)": stage k has started
            if not line.startswith("[") or "already done" in line:
                continue
            stage = line.split("]")[1].split()[0].rstrip(":")
            if stage in kills:
                continue
            time.sleep(rng.uniform(0.0, 0.4))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills.append(stage)
                killed = True
            break
        proc.communicate()  # drains its log, so it never blocks on a full pipe
        if not killed and proc.returncode == 0:
            break
    assert len(set(kills)) >= 6, f"the kills landed in too few stages: {kills}"
    straight = tmp_path / "straight"
    for folder in (root, straight):
        assert main(["run", "--preset", "smoke", "--run-dir", str(folder)]) == 0

    layout = RunDir(root)
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    assert len(open_episodes(layout.episodes)) == 6 and len(open_latents(layout.latents)) == 6
    load_acting_agent(root)
    for folder, key in (
        (layout.vae, "epoch"),
        (layout.mdnrnn, "epoch"),
        (layout.controller, "generation"),
    ):
        steps = [r[key] for r in read_metrics(folder / "metrics.jsonl")]  # M logs epoch 0 too
        assert steps == list(range(steps[0], steps[0] + len(steps))) and steps[0] in (0, 1)
    report = json.loads((layout.eval / "eval.json").read_text())
    assert len(report["episodes"]) == 2
    ours, theirs = _files(root), _files(straight)
    episodes = [name for name in theirs if name.startswith("data/episodes/episode_")]
    assert episodes and all(ours[name] == theirs[name] for name in episodes)  # seeded collection


def test_a_full_disk_is_one_line_and_leaves_no_half_written_file(
    trained_run, tmp_path, capsys, monkeypatch
):
    """The disk fills while export writes: one line, exit 1, no temp file, no partial agent;
    with space again, the same command completes."""
    import errno

    from worldmodels import io

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "agent"
    monkeypatch.setattr(io.os, "fsync", full)
    assert main(["export", "--run-dir", str(trained_run), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "rerun" in err[0]
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]
    monkeypatch.undo()
    assert main(["export", "--run-dir", str(trained_run), "--out", str(out)]) == 0
    assert (out / "agent.json").exists() and not list(out.rglob("*.tmp"))


def test_every_preset_is_built_of_its_stages_configs_with_values_they_accept():
    """A typo in a preset (`epoch=2`) fails when the preset is built; a value of the wrong type
    (`epochs="2"`) or out of range fails here, not an hour into a run."""
    import dataclasses

    from worldmodels import pipeline
    from worldmodels.presets import presets

    stages = {s.key: s for s in pipeline.stages()}
    assert set(presets()) == set(
        pipeline.RunConfig.__dataclass_fields__["preset"].metadata["choices"]
    )
    for name, preset in presets().items():
        assert set(preset.configs) <= set(stages), name
        assert set(preset.expected_min) <= set(stages), name
        for key, stage in stages.items():
            given = preset.configs.get(key)
            assert given is None or type(given) is stage.config, (name, key)
            cfg = pipeline.stage_config(stage, pipeline.RunConfig(preset=name), None)
            for field in dataclasses.fields(cfg):
                value, default = getattr(cfg, field.name), field.default
                assert isinstance(value, type(default)), (name, key, field.name)
            if hasattr(cfg, "validate"):
                cfg.validate()
