"""`worldmodels collect`: resumable, exact, never duplicates a seed, fails with one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from worldmodels.artifacts import load_acting_agent
from worldmodels.cli import main
from worldmodels.data import load_episode, open_episodes, read_manifest
from worldmodels.envs import make_env
from worldmodels.layout import RunDir
from worldmodels.policies import road_heading
from worldmodels.rollout import Recorder, run_episodes
from worldmodels.stages import collect


def _cfg(root, **kw) -> collect.CollectConfig:
    base = dict(run_dir=root, episodes=5, max_steps=25, envs=3)
    base.update(kw)
    return collect.CollectConfig(**base)


def test_resume_repairs_damage_and_recollects_identical_episodes(tmp_path):
    folder = RunDir(tmp_path).episodes
    collect.run(_cfg(tmp_path))
    before = {e.index: e.sha256 for e in read_manifest(folder)}
    assert sorted(before) == [0, 1, 2, 3, 4]
    mtime_untouched = (folder / "episode_000004.npz").stat().st_mtime_ns

    (folder / "episode_000001.npz").unlink()  # lost file
    damaged = folder / "episode_000002.npz"
    damaged.write_bytes(damaged.read_bytes()[:1000])  # truncated file
    (folder / ".episode_000003.npz.abc.tmp").write_bytes(b"half")  # leftover temp file
    (folder / "episode_000007.npz").write_bytes(b"orphan")  # no manifest line

    collect.run(_cfg(tmp_path, episodes=6))
    entries = open_episodes(folder)
    assert [e.index for e in entries] == [0, 1, 2, 3, 4, 5]
    assert len({e.seed for e in entries}) == 6
    assert not list(folder.glob("*.tmp")) and not (folder / "episode_000007.npz").exists()
    after = {e.index: e.sha256 for e in entries}
    assert all(after[i] == before[i] for i in before)  # re-collected episodes are bit-identical
    assert (folder / "episode_000004.npz").stat().st_mtime_ns == mtime_untouched  # not redone


@pytest.mark.slow
def test_kill_9_then_rerun_gives_exactly_n_valid_episodes(tmp_path):
    args = [
        "collect",
        "--run-dir",
        str(tmp_path),
        "--episodes",
        "12",
        "--max-steps",
        "60",
        "--envs",
        "2",
    ]
    env = dict(os.environ, WORLDMODELS_PROGRESS="0")
    proc = subprocess.Popen([sys.executable, "-m", "worldmodels.cli", *args], env=env)
    manifest = RunDir(tmp_path).episodes / "manifest.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (
        not manifest.exists() or len(manifest.read_text().splitlines()) < 3
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= len(read_manifest(manifest.parent)) < 12, "kill landed too late to test anything"
    assert main(args) == 0
    entries = open_episodes(manifest.parent)
    assert len(entries) == 12 and sorted(e.seed for e in entries) == list(range(12))
    assert not list(manifest.parent.glob("*.tmp"))
    for entry in entries:
        assert load_episode(manifest.parent / entry.file).steps == 60


def test_gymnasium_backend_collects_too(tmp_path):
    collect.run(
        _cfg(tmp_path, env="gymnasium", episodes=2, max_steps=10, workers=2, policy="random")
    )
    entries = open_episodes(RunDir(tmp_path).episodes)
    assert [e.steps for e in entries] == [10, 10]
    assert load_episode(RunDir(tmp_path).episodes / entries[0].file).env == "gymnasium"


def test_brownian_actions_are_smooth_and_random_ones_are_not(tmp_path):
    actions = {}
    for policy in ("brownian", "random"):
        collect.run(_cfg(tmp_path / policy, policy=policy, episodes=1, max_steps=40))
        actions[policy] = load_episode(RunDir(tmp_path / policy).episodes / "episode_000000.npz")
    jump = lambda ep: np.abs(np.diff(ep.actions[:, 0])).mean()  # noqa: E731
    assert jump(actions["brownian"]) < 0.2 < jump(actions["random"])


def test_road_heading_points_at_the_grey_road():
    grass = np.zeros((2, 96, 96, 3), np.uint8)
    grass[...] = (102, 204, 102)
    grass[0, :, 60:76] = (105, 105, 105)  # road right of the car
    grass[1, :, 10:30] = (107, 107, 107)  # road left of the car
    offset, seen = road_heading(np.concatenate([grass, grass[:1] * 0 + (102, 204, 102)]))
    assert seen.tolist() == [True, True, False]
    assert offset[0] == pytest.approx((67.5 - 48) / 48) and offset[1] < -0.5


def test_road_policy_covers_more_track_than_brownian(tmp_path):
    """What the road policy is for: more road in the data (tiles earn reward) than random walks."""
    totals = {}
    for policy in ("road", "brownian"):
        cfg = _cfg(tmp_path / policy, policy=policy, episodes=6, max_steps=300, envs=6)
        collect.run(cfg)
        totals[policy] = np.mean(
            [e.total_reward for e in read_manifest(RunDir(cfg.run_dir).episodes)]
        )
    assert totals["road"] > totals["brownian"] + 50


def test_a_trained_agent_collects_on_policy_episodes_the_same_in_any_wave(trained_run, tmp_path):
    """--policy agent: the run's controller drives, its weights shifted by noise drawn from each
    episode's seed, so an episode is the same whichever wave it ran in; with no noise every
    episode is exactly the controller's own drive, and the noise changes the drives."""

    def collected(root, **changes) -> list[np.ndarray]:
        cfg = _cfg(root, policy="agent", agent=trained_run, episodes=4, max_steps=30, **changes)
        collect.run(cfg)
        folder = RunDir(root).episodes
        return [load_episode(folder / e.file).actions for e in read_manifest(folder)]

    together = collected(tmp_path / "four_at_once", envs=4)
    alone = collected(tmp_path / "one_by_one", envs=1)
    assert all(np.array_equal(a, b) for a, b in zip(together, alone, strict=True))
    clean = collected(tmp_path / "no_noise", envs=4, agent_noise=0.0)
    assert not any(np.array_equal(a, b) for a, b in zip(together, clean, strict=True))

    agent, mean, _ = load_acting_agent(trained_run)
    agent.one_at_a_time = True
    env = make_env("envpool", 1, 30, 1)
    recorder = Recorder(agent, 1, 30, lambda frames: frames[:, :1, :1])
    run_episodes(env, recorder, mean[None], [0])  # track 0, as episode 0 played it
    env.close()
    assert np.array_equal(recorder.episode(0)[1], clean[0])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--episodes", "-1"], "--episodes must be >= 0"),
        (["--env", "atari"], "invalid choice"),
        (["--max-steps", "5000"], "--max-steps must be in 1..1000"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) if "--env" in argv else _nothing():
        code = main(["collect", "--run-dir", str(tmp_path), *argv])
        assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_unwritable_run_dir_and_changed_settings_keep_existing_data(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["collect", "--run-dir", str(blocker / "run"), "--episodes", "1"]) == 2
    assert "cannot write to" in capsys.readouterr().err

    collect.run(_cfg(tmp_path, episodes=2))
    before = read_manifest(RunDir(tmp_path).episodes)
    capsys.readouterr()
    assert (
        main(
            [
                "collect",
                "--run-dir",
                str(tmp_path),
                "--episodes",
                "3",
                "--max-steps",
                "25",
                "--seed",
                "9",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "seed=0" in err and len(err.strip().splitlines()) == 1
    assert read_manifest(RunDir(tmp_path).episodes) == before


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
