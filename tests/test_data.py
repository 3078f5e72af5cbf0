"""Episode files, the manifest and the streaming dataset, on real collected episodes."""

from __future__ import annotations

import numpy as np
import pytest

from worldmodels.data import (
    InvalidEpisode,
    count_frames,
    iterate_frame_batches,
    load_episode,
    open_episodes,
    read_manifest,
    split_by_episode,
    write_episode,
)
from worldmodels.data.manifest import ManifestEntry
from worldmodels.errors import MissingStageError
from worldmodels.layout import RunDir


def test_collected_episodes_follow_the_schema(tiny_run):
    entries = open_episodes(RunDir(tiny_run).episodes)
    assert [e.seed for e in entries] == list(range(6))
    for entry in entries:
        ep = load_episode(RunDir(tiny_run).episodes / entry.file)
        assert ep.obs.shape == (41, 64, 64, 3) and ep.obs.dtype == np.uint8
        assert ep.actions.shape == (40, 3) and ep.actions.dtype == np.float32
        assert ep.rewards.shape == (40,) and ep.env == "envpool" and ep.crop
        assert ep.truncated and not ep.terminated
        assert ep.seed == entry.seed and ep.total_reward == pytest.approx(
            entry.total_reward, abs=1e-3
        )
        assert (ep.actions[:, 0] >= -1).all() and (ep.actions[:, 1:] >= 0).all()
        assert ep.obs.std() > 10  # real pictures, not blank frames


def test_roundtrip_and_corruption_is_detected(tiny_run, tmp_path):
    source = RunDir(tiny_run).episodes / "episode_000000.npz"
    ep = load_episode(source)
    path = tmp_path / "copy.npz"
    write_episode(path, ep)
    again = load_episode(path)
    np.testing.assert_array_equal(again.obs, ep.obs)
    np.testing.assert_array_equal(again.actions, ep.actions)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidEpisode, match="unreadable"):
        load_episode(path)
    ep.actions = ep.actions[:-3]
    with pytest.raises(InvalidEpisode, match="actions"):
        write_episode(tmp_path / "bad.npz", ep)


def test_half_written_manifest_line_is_ignored(tiny_run, tmp_path):
    folder = tmp_path / "episodes"
    folder.mkdir()
    text = (RunDir(tiny_run).episodes / "manifest.jsonl").read_text()
    (folder / "manifest.jsonl").write_text(text + text.splitlines()[0][:40])
    assert len(read_manifest(folder)) == 6


def test_missing_data_says_which_command_to_run(tmp_path):
    with pytest.raises(MissingStageError, match="run `worldmodels collect` first"):
        open_episodes(tmp_path)


def _entry(seed: int) -> ManifestEntry:
    return ManifestEntry(seed, f"e{seed}", seed, 10, 0.0, False, True, "x")


def test_split_is_by_episode_and_stable_as_data_grows():
    small = [_entry(s) for s in range(100)]
    large = [_entry(s) for s in range(1000)]
    train, val = split_by_episode(small, 0.1)
    train2, val2 = split_by_episode(large, 0.1)
    assert not {e.seed for e in train} & {e.seed for e in val}
    assert {e.seed for e in val} <= {e.seed for e in val2}  # held-out episodes stay held out
    assert 0.05 < len(val2) / 1000 < 0.15


def test_stream_yields_every_frame_once_shuffled_across_episodes(tiny_run):
    folder = RunDir(tiny_run).episodes
    entries = open_episodes(folder)
    batches = list(
        iterate_frame_batches(folder, entries, 32, np.random.default_rng(0), buffer_episodes=3)
    )
    frames = np.concatenate(batches)
    assert len(frames) == count_frames(entries) == 6 * 41
    assert all(len(b) == 32 for b in batches[:-1])
    ordered = np.concatenate(list(iterate_frame_batches(folder, entries, 32)))
    # same multiset of frames: compare per-frame sums after sorting
    assert np.array_equal(
        np.sort(frames.reshape(len(frames), -1).sum(1)),
        np.sort(ordered.reshape(len(ordered), -1).sum(1)),
    )
    # shuffled: the first batch mixes frames of several episodes (episode = block of 41 frames)
    first_ids = {
        int(np.flatnonzero((ordered == f).all(axis=(1, 2, 3)))[0]) // 41 for f in batches[0]
    }
    assert len(first_ids) > 1
