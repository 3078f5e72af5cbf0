"""Learning inside the dream: the dream evaluator CMA-ES trains in, the Gymnasium dream env (and
its vector form) that other RL libraries train in, and that the two dream the same dream."""

from __future__ import annotations

import json
import shutil

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from helpers import tiny_search

from worldmodels import make_dream_env, runtime
from worldmodels.artifacts import load_controller, load_mdnrnn, load_world_model
from worldmodels.checkpoint import save_model
from worldmodels.data.latents import first_latents
from worldmodels.dream import DreamEvaluator
from worldmodels.dream_gym import DreamCarRacing, DreamVectorEnv
from worldmodels.errors import UserError
from worldmodels.layout import RunDir
from worldmodels.metrics import read_metrics
from worldmodels.models import (
    MDNRNN,
    Bf16Step,
    ConvVAE,
    batched_controller_actions,
    controller_param_count,
)
from worldmodels.stages import encode, train_controller

Z, H = 8, 16
VAE_ARCH = {"z_dim": Z, "channels": [4, 8, 8, 16]}
MDN_ARCH = {"z_dim": Z, "action_dim": 3, "hidden": H, "n_gaussians": 2}


@pytest.fixture(scope="module")
def dream_run(tiny_run, tmp_path_factory):
    """The tiny real episodes with a small random V and M, encoded: everything a dream needs."""
    root = tmp_path_factory.mktemp("dream_run")
    shutil.copytree(RunDir(tiny_run).data, RunDir(root).data)
    torch.manual_seed(0)
    save_model(RunDir(root).vae, ConvVAE(Z, tuple(VAE_ARCH["channels"])), VAE_ARCH)
    mdnrnn = MDNRNN(**MDN_ARCH)
    with torch.no_grad():  # a done head that rarely fires: dreams run to their step limit
        mdnrnn.head.bias[-1] = -20.0
    save_model(RunDir(root).mdnrnn, mdnrnn, MDN_ARCH)
    encode.run(encode.EncodeConfig(run_dir=root, batch_size=16, device="cpu"))
    return root


def _controllers(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 0.5, (count, controller_param_count(Z + H))).astype(np.float32)


def test_dreams_start_from_real_first_frames_spread_over_the_episodes(dream_run, tmp_path):
    """At most `limit` starts, spread evenly; only the files read are checked, so a damaged
    latents file elsewhere does not stop a dream (encode heals it when run)."""
    folder = RunDir(dream_run).latents
    every = first_latents(folder)
    assert every.shape == (6, Z)
    np.testing.assert_array_equal(first_latents(folder, limit=2), every[[0, 5]])
    copy = tmp_path / "latents"
    shutil.copytree(folder, copy)
    (copy / "episode_000002.npz").write_bytes(b"damaged")
    np.testing.assert_array_equal(first_latents(copy, limit=2), every[[0, 5]])
    with pytest.raises(UserError, match="rerun `worldmodels encode`"):
        first_latents(copy)


def test_the_dream_env_passes_gymnasium_env_checker(dream_run):
    for obs in ("features", "pixels"):
        env = make_dream_env(dream_run, obs=obs, max_steps=20, render_mode="rgb_array")
        check_env(env, skip_render_check=False)
        first, _ = env.reset(seed=3)
        assert env.observation_space.contains(first)
        assert env.render().shape == (64, 64, 3)


def test_the_dream_env_is_seeded_and_ends_at_its_step_limit(dream_run):
    env = make_dream_env(dream_run, max_steps=7)
    actions = np.random.default_rng(0).uniform(-1, 1, (7, 3)).astype(np.float32)

    def episode(seed: int) -> tuple[np.ndarray, list[bool]]:
        obs, _ = env.reset(seed=seed)
        seen, truncations = [obs], []
        for a in actions:
            obs, reward, terminated, truncated, _ = env.step(a)
            seen.append(obs)
            truncations.append(truncated)
            assert not terminated and np.isfinite(reward)
        return np.stack(seen), truncations

    a, ends = episode(5)
    b, _ = episode(5)
    c, _ = episode(6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert ends == [False] * 6 + [True]
    assert a[0, Z:].tolist() == [0.0] * H  # every episode starts with an empty memory
    starts = first_latents(RunDir(dream_run).latents)
    assert any(np.allclose(a[0, :Z], s) for s in starts)  # from a real encoded first frame


def test_the_vector_dream_env_batches_and_autoresets_on_the_next_step(dream_run):
    envs = make_dream_env(dream_run, num_envs=5, max_steps=3)
    assert isinstance(envs, DreamVectorEnv) and isinstance(envs, gym.vector.VectorEnv)
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (5, Z + H) and envs.observation_space.contains(obs)
    actions = envs.action_space.sample()
    for _ in range(3):
        obs, reward, terminated, truncated, _ = envs.step(actions)
        assert reward.shape == (5,) and not terminated.any()
    assert truncated.all()
    obs, reward, terminated, truncated, _ = envs.step(actions)  # the autoreset step
    assert (reward == 0).all() and not (terminated | truncated).any()
    assert np.abs(obs[:, Z:]).max() == 0.0  # fresh memories


def test_the_dream_evaluator_gives_every_candidate_the_same_dream_per_seed(dream_run):
    mdnrnn = load_mdnrnn(dream_run)
    starts = first_latents(RunDir(dream_run).latents)
    evaluator = DreamEvaluator(mdnrnn, starts, max_steps=30)
    params = _controllers(2)
    same = evaluator.play(np.repeat(params, 2, axis=0), [11, 11, 11, 11])
    assert same.returns[0] == same.returns[1] and same.returns[2] == same.returns[3]
    other = evaluator.play(params[:1], [12])
    assert other.returns[0] != same.returns[0]
    alone = evaluator.play(params[1:], [11])  # a row's dream does not depend on its batch
    assert alone.returns[0] == pytest.approx(same.returns[2], abs=1e-4)
    assert same.env_steps == 4 * 30 and not same.laps.any()


def test_the_dream_evaluator_dreams_what_the_gymnasium_env_dreams(dream_run):
    """With a near-zero temperature and a sharp M the dream is deterministic given its start: a
    controller's dreamed return is the same through the CMA-ES evaluator and the Gymnasium env."""
    mdnrnn = load_mdnrnn(dream_run)
    kz = MDN_ARCH["n_gaussians"] * Z
    with torch.no_grad():  # every sigma ~1e-5
        mdnrnn.head.weight[2 * kz : 3 * kz].zero_()
        mdnrnn.head.bias[2 * kz : 3 * kz] = -12.0
    start = first_latents(RunDir(dream_run).latents)[:1]
    params = _controllers(1, seed=4)
    evaluator = DreamEvaluator(mdnrnn, start, max_steps=25, temperature=1e-6)
    dreamed = evaluator.play(params, [0]).returns[0]
    env = DreamCarRacing(mdnrnn, start, temperature=1e-6, max_steps=25)
    obs, _ = env.reset(seed=0)
    total, done = 0.0, False
    while not done:
        action = batched_controller_actions(torch.as_tensor(params), torch.as_tensor(obs[None]))
        obs, reward, terminated, truncated, _ = env.step(action[0].numpy())
        total, done = total + reward, terminated or truncated
    assert total == pytest.approx(dreamed, abs=1e-3)


def test_the_dream_evaluator_stops_hopeless_dreams_and_charges_them(dream_run):
    mdnrnn = load_mdnrnn(dream_run)
    with torch.no_grad():
        mdnrnn.head.weight[-2].zero_()
        mdnrnn.head.bias[-2] = -0.5  # every dreamed step loses 0.5: never a positive reward
    evaluator = DreamEvaluator(mdnrnn, first_latents(RunDir(dream_run).latents), max_steps=40)
    played = evaluator.play(_controllers(1), [0], early_stop=10)
    assert played.env_steps == 10
    assert played.returns[0] == pytest.approx(-0.5 * 10 - 0.1 * 30, abs=1e-4)


def _train(root, **kw):
    return train_controller.run(tiny_search(root, **{"early_stop": 0, "force": True, **kw}))


def test_train_controller_in_the_dream_keeps_a_mean_checked_in_the_dream(dream_run):
    folder = _train(dream_run, generations=3, env="dream")
    rows = read_metrics(folder / "metrics.jsonl")
    assert [r["generation"] for r in rows] == [1, 2, 3]
    assert all("check_mean" in r for r in rows)
    assert all(r["steps_per_s"] > 0 for r in rows)
    selection = json.loads((folder / "selection.json").read_text())
    assert selection["generation"] in (1, 2, 3)
    params, meta = load_controller(dream_run)
    assert len(params) == controller_param_count(Z + H)
    assert meta["generation"] == selection["generation"]


def test_dream_then_real_checks_only_the_real_generations(dream_run):
    folder = _train(dream_run, generations=4, env="envpool", dream_generations=2)
    rows = read_metrics(folder / "metrics.jsonl")
    assert ["check_mean" in r for r in rows] == [False, False, True, True]
    selection = json.loads((folder / "selection.json").read_text())
    assert {f["generation"] for f in selection["finalists"]} <= {3, 4}


@pytest.mark.slow  # over 4 s: worker processes, a whole search or a real agent
def test_stable_baselines3_trains_inside_the_dream(dream_run, tmp_path, monkeypatch):
    sb3 = pytest.importorskip("stable_baselines3")
    monkeypatch.setenv("SB3_LOGDIR", str(tmp_path))  # else SB3 leaves a log folder in /tmp
    from stable_baselines3.common.monitor import Monitor

    env = Monitor(make_dream_env(dream_run, max_steps=64))
    model = sb3.PPO("MlpPolicy", env, n_steps=256, batch_size=64, n_epochs=2, seed=0, device="cpu")
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(total_timesteps=2048)
    assert model.num_timesteps >= 2048
    assert len(env.get_episode_rewards()) == 2048 // 64  # every dream ran to its step limit
    assert all(np.isfinite(env.get_episode_rewards()))
    changed = [not torch.equal(a, b) for a, b in zip(before, model.policy.parameters())]
    assert any(changed)
    action, _ = model.predict(env.reset(seed=0)[0], deterministic=True)
    assert env.action_space.contains(action.astype(np.float32))


def test_the_readme_dream_snippet_runs(dream_run, tmp_path, monkeypatch):
    """The README's dream snippet as a user would paste it, on the tiny dream run."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("<!-- snippet: make_dream_env -->")
    block = readme[start:].split("```python\n", 1)[1].split("```", 1)[0]
    shutil.copytree(dream_run, tmp_path / "runs" / "quick")
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    exec(compile(block, "README.md", "exec"), names)
    assert names["envs"].num_envs == 256 and names["obs"].shape == (Z + H,)
    assert names["pixels"].observation_space.shape == (64, 64, 3)


def test_evaluate_sets_the_dreamed_returns_beside_the_real_ones(dream_run, tmp_path):
    from worldmodels.stages import evaluate

    root = tmp_path / "run"
    shutil.copytree(dream_run, root)
    _train(root, generations=1, env="dream", check_every=0, select_top=0)
    cfg = evaluate.EvaluateConfig(
        run_dir=root, episodes=2, max_steps=30, env="envpool", gif=1, dream_episodes=3
    )
    folder = evaluate.run(cfg)
    dreamed = json.loads((folder / "dream.json").read_text())
    assert len(dreamed["returns"]) == 3 and dreamed["temperature"] == 1.0
    assert dreamed["mean"] == pytest.approx(np.mean(dreamed["returns"]))
    params, _ = load_controller(root)
    again = DreamEvaluator(load_mdnrnn(root), first_latents(RunDir(root).latents), 30)
    replay = again.play(np.repeat(params.numpy()[None], 3, axis=0), [0, 1, 2])
    np.testing.assert_allclose(replay.returns, dreamed["returns"], atol=1e-4)
    assert (folder / "dream_drive.gif").stat().st_size > 1000


def test_m_stepped_in_bf16_matches_its_fp32_step_up_to_rounding():
    """The bf16 dream rounds only the products' inputs: one step's h, c and predictions stay
    within bf16's relative precision (~0.4 %) of the fp32 step, at full size."""
    torch.manual_seed(0)
    model = MDNRNN().eval()
    low = Bf16Step(model)
    z, a = torch.randn(64, 32), torch.rand(64, 3)
    h, c = torch.randn(64, 256) * 0.3, torch.randn(64, 256)
    with torch.inference_mode():
        want_h, want_c = model.advance(z, a, h, c)
        got_h, got_c = low.advance(z, a, h, c)
        want, got = model.predict(want_h), low.predict(want_h)
    assert got_h.dtype == got_c.dtype == torch.float32  # the state the dream carries
    assert (got_h - want_h).abs().max() < 0.02 and (got_c - want_c).abs().max() < 0.02
    assert (got_h - want_h).abs().mean() < 0.002
    for name in ("mu", "logsigma", "logpi", "reward"):
        diff = (getattr(got, name) - getattr(want, name)).abs()
        assert diff.max() < 0.05 and diff.mean() < 0.005, name
    assert not torch.equal(got_h, want_h)  # it did round


def test_a_bf16_dream_scores_controllers_as_the_fp32_dream_does(dream_run):
    """Near-deterministic dreams (sharp M, tiny temperature): every controller's dreamed return
    in bf16 is its fp32 return up to rounding, so the search ranks candidates alike."""
    mdnrnn = load_mdnrnn(dream_run)
    kz = MDN_ARCH["n_gaussians"] * Z
    with torch.no_grad():
        mdnrnn.head.bias[2 * kz : 3 * kz] = -12.0
        mdnrnn.head.weight[2 * kz : 3 * kz].zero_()
    starts = first_latents(RunDir(dream_run).latents)
    params = np.repeat(_controllers(8, seed=2), 2, axis=0)
    seeds = [0, 1] * 8
    fp32 = DreamEvaluator(mdnrnn, starts, 25, temperature=1e-6).play(params, seeds).returns
    bf16 = DreamEvaluator(mdnrnn, starts, 25, temperature=1e-6, bf16=True).play(params, seeds)
    assert np.abs(bf16.returns - fp32).max() < 0.02 * np.abs(fp32).max()
    assert np.corrcoef(bf16.returns, fp32)[0, 1] > 0.999


def test_train_controller_dreams_in_the_precision_asked(dream_run):
    """--dream-precision: the search's dream steps M in bf16 only when asked (fp32 by default)."""
    agent = load_world_model(dream_run)
    for precision, stepper in (("fp32", MDNRNN), ("bf16", Bf16Step)):
        cfg = tiny_search(dream_run, env="dream", dream_precision=precision)
        venues = train_controller._make_venues(cfg, agent)
        assert isinstance(venues.dream.dream.stepper, stepper) and venues.real is None
    assert tiny_search(dream_run).dream_precision == "fp32"


def test_the_dream_precision_follows_the_one_bf16_rule(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_supports_fast_bf16", lambda: True)
    assert runtime.dream_in_bf16("auto") and not runtime.dream_in_bf16("fp32")
    monkeypatch.setattr(runtime, "cpu_supports_fast_bf16", lambda: False)
    assert not runtime.dream_in_bf16("auto") and runtime.dream_in_bf16("bf16")
