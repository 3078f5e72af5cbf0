"""The batched env contract, honoured by both backends (after Gymnasium's own env tests)."""

from __future__ import annotations

import numpy as np
import pytest

from worldmodels.envs import BatchedEnv, make_env, preprocess_frames
from worldmodels.errors import UserError

GAS = np.array([0.0, 0.5, 0.0], np.float32)


def play(env: BatchedEnv, seeds: list[int], steps: int, action=GAS):
    frames, rewards = [env.reset(seeds)], []
    for _ in range(steps):
        result = env.step(np.tile(action, (len(seeds), 1)))
        frames.append(result.obs)
        rewards.append(result.reward)
    return np.stack(frames, 1), np.stack(rewards, 1)


@pytest.mark.parametrize("backend", ["envpool", "gymnasium"])
def test_backend_honours_the_contract(backend):
    with make_env(backend, 2, max_steps=5) as env:
        obs = env.reset([7, 8])
        assert obs.shape == (2, 96, 96, 3) and obs.dtype == np.uint8
        for _t in range(5):
            assert env.active.all()
            result = env.step(np.tile(GAS, (2, 1)))
            assert result.reward.dtype == np.float32 and result.reward.shape == (2,)
            assert np.isfinite(result.reward).all()
        # truncated at max_steps, not terminated; the slot is frozen afterwards
        assert result.truncated.all() and not result.terminated.any() and env.done
        frozen = env.step(np.tile(GAS, (2, 1)))
        assert (frozen.reward == 0).all()
        np.testing.assert_array_equal(frozen.obs, result.obs)
        assert (env.steps == 5).all()


@pytest.mark.parametrize("backend", ["envpool", "gymnasium"])
def test_same_seed_replays_the_same_episode(backend):
    with make_env(backend, 2, max_steps=30) as env:
        first = play(env, [11, 12], 25)
        second = play(env, [11, 12], 25)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    # and different seeds are different tracks (rewards count tiles, which differ per track)
    assert not np.array_equal(first[1][0], first[1][1])


def _serve_as_ready(env: BatchedEnv, seeds: list[int], steps: int, stop_at: dict[int, int]):
    """Play with `send`/`recv`, each batch re-sent as soon as it is back; slot k is stopped
    after `stop_at[k]` steps. Returns frames, rewards and how many batches came back."""
    n = len(seeds)
    env.reset(seeds)
    obs = np.zeros((n, steps, 96, 96, 3), np.uint8)
    rewards, served = np.zeros((n, steps), np.float32), 0
    env.send(np.arange(n), np.tile(GAS, (n, 1)))
    while env.in_flight.any():
        got = env.recv()
        served += 1
        t = env.steps[got.ids] - 1
        obs[got.ids, t], rewards[got.ids, t] = got.obs, got.reward
        ending = [k for k, played in zip(got.ids, t + 1) if stop_at.get(k) == played]
        env.stop(np.isin(np.arange(n), ending))
        live = got.ids[env.active[got.ids]]
        if len(live):
            env.send(live, np.tile(GAS, (len(live), 1)))
    return obs, rewards, served


def test_envpool_served_as_ready_matches_lockstep():
    """EnvPool's asynchronous mode (half the slots back at a time, in whatever order they
    finish) plays exactly the episodes of lockstep stepping, also once most slots have
    stopped and the finished ones step along as padding to fill EnvPool's batches."""
    from worldmodels.envs.envpool_backend import EnvPoolEnv

    seeds, steps = [21, 22, 23, 24, 25, 26], 30
    with EnvPoolEnv(6, max_steps=steps, batch_size=6) as env:
        lockstep = play(env, seeds, steps)
    stop_at = {0: 5, 2: 9, 3: 9, 5: 12}  # from step 12 on, 2 slots play: fewer than a batch
    with EnvPoolEnv(6, max_steps=steps) as env:
        assert env.batch_size == 3
        obs, rewards, served = _serve_as_ready(env, seeds, steps, stop_at)
        assert list(env.steps) == [5, steps, 9, 9, steps, 12]
    for k in range(6):
        played = stop_at.get(k, steps)
        np.testing.assert_array_equal(obs[k, :played], lockstep[0][k, 1 : played + 1])
        np.testing.assert_array_equal(rewards[k, :played], lockstep[1][k, :played])
        assert (rewards[k, played:] == 0).all()
    assert served > steps  # batches came back on their own, not as one lockstep step


def test_gymnasium_worker_processes_match_in_process():
    with make_env("gymnasium", 3, max_steps=20, workers=2) as env:
        spread = play(env, [1, 2, 3], 15)
    with make_env("gymnasium", 3, max_steps=20, workers=0) as env:
        local = play(env, [1, 2, 3], 15)
    np.testing.assert_array_equal(spread[0], local[0])
    np.testing.assert_array_equal(spread[1], local[1])


def test_culled_official_env_is_the_official_env_frame_for_frame():
    """Skipping the off-screen polygons must change no pixel: through the zoom-in, along the
    road (visited tiles change colour), onto the grass and into a spin, every frame and reward
    equals stock Gymnasium's."""
    from worldmodels.envs.gymnasium_backend import make_official_env

    t = np.arange(260)
    steer = np.where(t < 90, 0.0, np.sin(t / 15))  # along the start straight, then weave off
    actions = np.stack([steer, np.where(t < 150, 0.4, 1.0), (t > 230) * 0.8], 1)
    for seed in (5, 8):
        played = []
        for cull in (False, True):
            env = make_official_env(cull=cull)
            frames, rewards = [env.reset(seed=seed)[0]], []
            for action in actions.astype(np.float32):
                obs, reward, *_ = env.step(action)
                frames.append(obs)
                rewards.append(reward)
            env.close()
            played.append((np.stack(frames), np.array(rewards)))
        (stock, stock_rewards), (culled, culled_rewards) = played
        np.testing.assert_array_equal(culled, stock)
        np.testing.assert_array_equal(culled_rewards, stock_rewards)
        assert (stock_rewards > 0).sum() >= 5  # tiles were visited: their colour changed on screen


def test_backends_look_alike_on_a_straight_start():
    """Same seed gives a different track on each backend, but every track starts on a straight:
    after the zoom-in (50 steps) the frames should differ far less than the same frame shifted
    by 8 pixels sideways (a clearly visible misalignment, ~9 grey levels here)."""
    seeds = [3, 4]
    with make_env("gymnasium", 2, max_steps=60) as env:
        official = play(env, seeds, 50)[0][:, -1].astype(int)
    with make_env("envpool", 2, max_steps=60) as env:
        fast = play(env, seeds, 50)[0][:, -1].astype(int)
    cross = np.abs(official - fast).mean(axis=(1, 2, 3))
    shifted = np.abs(official - np.roll(official, 8, axis=2)).mean(axis=(1, 2, 3))
    assert (cross < 6).all(), cross
    assert (cross < 0.6 * shifted).all(), (cross, shifted)


class _ScriptedEnv(BatchedEnv):
    """A fake backend whose slot i terminates after `ends[i]` steps: tests the shared logic."""

    def __init__(self, ends, max_steps):
        super().__init__(len(ends), max_steps)
        self.ends = np.array(ends)
        self.calls = []

    def _reset(self, seeds):
        return np.zeros((self.num_envs, 96, 96, 3), np.uint8)

    def _step(self, ids, actions):
        self.calls.append(list(ids))
        obs = np.full((len(ids), 96, 96, 3), self.steps[ids][:, None, None, None] + 1, np.uint8)
        return obs, np.ones(len(ids), np.float32), self.steps[ids] + 1 >= self.ends[ids]


def test_terminated_and_truncated_are_told_apart_and_finished_slots_are_not_stepped():
    env = _ScriptedEnv(ends=[2, 100, 3], max_steps=4)
    env.reset([0, 1, 2])
    totals = np.zeros(3)
    while not env.done:
        totals += env.step(np.zeros((3, 3))).reward
    assert list(env.terminated) == [True, False, True]
    assert list(env.truncated) == [False, True, False]
    assert list(env.steps) == [2, 4, 3]
    np.testing.assert_array_equal(totals, [2, 4, 3])  # no reward after an episode ends
    assert env.calls == [[0, 1, 2], [0, 1, 2], [1, 2], [1]]


def test_unknown_backend_is_a_user_error():
    with pytest.raises(UserError, match="unknown env backend"):
        make_env("atari", 1)


@pytest.mark.parametrize("crop", [True, False])
def test_preprocess_shapes_and_batch_equals_single(crop):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
    batch = preprocess_frames(frames, crop=crop)
    assert batch.shape == (5, 64, 64, 3) and batch.dtype == np.uint8
    for frame, out in zip(frames, batch):
        np.testing.assert_array_equal(preprocess_frames(frame, crop=crop), out)


def test_crop_drops_the_dashboard():
    with make_env("envpool", 1, max_steps=60) as env:
        frame = play(env, [5], 50)[0][0, -1]
    dashboard = frame[84:]
    assert dashboard.mean() < 40  # the black bar with the gauges
    cropped = preprocess_frames(frame, crop=True)
    full = preprocess_frames(frame, crop=False)
    # the full frame's bottom rows are the dark dashboard; the cropped frame's are road and grass
    assert full[-6:].mean() < 50 < cropped[-6:].mean()
    # area resize keeps the mean brightness of the region it shrinks
    assert abs(cropped.mean() - frame[:84].mean()) < 1.5
