"""The agent step, the episode loop, CMA-ES training and official evaluation, on tiny models."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from worldmodels import scoring
from worldmodels.agent import Agent
from worldmodels.artifacts import (
    load_controller,
    load_mdnrnn,
    load_world_model,
    world_model_sources,
)
from worldmodels.checkpoint import read_model_meta, save_model
from worldmodels.cli import main
from worldmodels.envs import BatchedEnv, make_env
from worldmodels.errors import UserError
from worldmodels.evaluators import EpisodeSettings, LocalEvaluator, Played
from worldmodels.layout import RunDir
from worldmodels.metrics import read_metrics
from worldmodels.models import MDNRNN, ConvVAE, LinearController, controller_param_count
from worldmodels.rollout import run_episodes
from worldmodels.search import SearchSettings, SearchState
from worldmodels.stages import encode, evaluate, train_controller
from worldmodels.warm_start import fit_steering, recorded_steering, road_following_start

VAE_ARCH = {"z_dim": 8, "channels": [4, 8, 8, 16]}
MDN_ARCH = {"z_dim": 8, "action_dim": 3, "hidden": 16, "n_gaussians": 2}


def tiny_models(seed: int = 0) -> tuple[ConvVAE, MDNRNN]:
    torch.manual_seed(seed)
    return ConvVAE(VAE_ARCH["z_dim"], tuple(VAE_ARCH["channels"])), MDNRNN(**MDN_ARCH)


@pytest.fixture
def world_run(tiny_run, tmp_path):
    """A run dir with the tiny real data plus small random V and M saved as the stages would."""
    shutil.copytree(RunDir(tiny_run).data, RunDir(tmp_path).data)
    vae, mdnrnn = tiny_models()
    save_model(RunDir(tmp_path).vae, vae, VAE_ARCH)
    save_model(RunDir(tmp_path).mdnrnn, mdnrnn, MDN_ARCH)
    return tmp_path


def test_batched_agent_equals_one_controller_at_a_time():
    vae, mdnrnn = tiny_models()
    frames = np.random.default_rng(0).integers(0, 256, (4, 96, 96, 3), dtype=np.uint8)
    n_params = controller_param_count(8 + 16)
    params = torch.randn(4, n_params) * 0.5
    batched = Agent(vae, mdnrnn)
    batched.reset(4)
    together = [batched.act(frames, params) for _ in range(3)]
    for i in range(4):
        single = Agent(vae, mdnrnn)
        single.reset(1)
        alone = [single.act(frames[i : i + 1], params[i : i + 1]) for _ in range(3)]
        for step in range(3):
            np.testing.assert_allclose(together[step][i], alone[step][0], atol=1e-5)
        controller = LinearController.from_flat(params[i])
        z = single.encode(frames[i : i + 1])
        first = controller(torch.cat([z, torch.zeros(1, 16)], dim=1))  # h starts at zero
        np.testing.assert_allclose(together[0][i], first[0].detach().numpy(), atol=1e-5)
    assert not np.allclose(together[0][0], together[0][1])  # different controllers, different acts


def test_early_stop_charges_the_remaining_steps():
    vae, mdnrnn = tiny_models()
    agent = Agent(vae, mdnrnn)
    params = torch.zeros(2, controller_param_count(24))
    params[:, 3 * 24 + 2] = 5.0  # bias: brake hard, so the car sits still and earns nothing
    with make_env("envpool", 2, max_steps=200) as env:
        full = run_episodes(env, agent, params, [1, 2])
        stopped = run_episodes(env, agent, params, [1, 2], early_stop=30)
    assert stopped.stopped_early.all() and (stopped.steps < 200).all()
    assert stopped.env_steps < full.env_steps
    # a parked car loses 0.1 a step either way, so the honest charge gives the same return
    np.testing.assert_allclose(stopped.returns, full.returns, atol=1e-3)


@pytest.mark.slow  # over 4 s: worker processes, a whole search or a real agent
def test_workers_served_as_ready_play_the_same_episodes_as_one_process():
    """Gymnasium workers get their next actions as soon as their own block is back; that
    reordering must not change any episode."""
    vae, mdnrnn = tiny_models()
    params = torch.randn(5, controller_param_count(24)) * 0.5
    params[:, 3 * 24 + 1] += 2.0  # gas, so the cars move and the returns differ
    seeds = [11, 12, 13, 14, 15]
    results = []
    for workers in (0, 2):
        with make_env("gymnasium", 5, max_steps=40, workers=workers) as env:
            seen = []
            result = run_episodes(
                env, Agent(vae, mdnrnn), params, seeds, early_stop=25, on_step=seen.append
            )
            results.append(result)
        assert sum(len(got.ids) for got in seen) == result.env_steps == result.steps.sum()
    in_process, served = results
    np.testing.assert_allclose(served.returns, in_process.returns, atol=1e-3)
    np.testing.assert_array_equal(served.steps, in_process.steps)
    assert np.ptp(in_process.returns) > 0.1


def _train(run_dir, generations: int, **kw):
    cfg = train_controller.TrainControllerConfig(
        run_dir=run_dir,
        generations=generations,
        population=4,
        rollouts=2,
        early_stop=0,
        **{
            "max_steps": 40,
            "check_steps": 40,
            "check_every": 2,
            "check_episodes": 2,
            "select_episodes": 2,
            **kw,
        },
    )
    return train_controller.run(cfg)


def test_train_controller_writes_checked_means_a_best_candidate_and_a_selection(world_run):
    """(That a stopped run resumes to exactly an uninterrupted one: tests/test_resume.py.)"""
    folder = _train(world_run, generations=3)
    rows = read_metrics(folder / "metrics.jsonl")
    assert [r["generation"] for r in rows] == [1, 2, 3]
    assert "check_mean" in rows[1] and np.isfinite(rows[1]["check_mean"])
    assert all(r["best"] >= r["mean"] >= r["worst"] for r in rows)
    assert (folder / "model.json").exists() and (folder / "best" / "model.json").exists()
    meta = json.loads((folder / "model.json").read_text())
    assert meta["generation"] in (2, 3) and meta["arch"]["input_dim"] == 24  # the checked means
    selection = json.loads((folder / "selection.json").read_text())
    assert selection["generation"] == meta["generation"]


def test_selection_keeps_the_finalist_that_plays_best_on_fresh_tracks(world_run):
    folder = _train(world_run, generations=4, check_every=1, select_top=2, select_episodes=3)
    checks = {r["generation"]: r["check_mean"] for r in read_metrics(folder / "metrics.jsonl")}
    selection = json.loads((folder / "selection.json").read_text())
    finalists = selection["finalists"]
    chosen = {f["generation"] for f in finalists}
    assert len(chosen) == 2
    assert min(checks[g] for g in chosen) >= max(checks[g] for g in checks if g not in chosen)
    winner = max(finalists, key=lambda f: f["select_mean"])
    assert selection["generation"] == winner["generation"]
    # the saved controller is that finalist: replaying the selection tracks gives its score
    params, meta = load_controller(world_run)
    assert meta["generation"] == winner["generation"]
    seeds = list(range(selection["seeds"][0], selection["seeds"][1] + 1))
    agent = load_world_model(world_run)
    with make_env("envpool", len(seeds), max_steps=40) as env:
        replay = run_episodes(env, agent, params.repeat(len(seeds), 1), seeds)
    assert replay.returns.mean() == pytest.approx(winner["select_mean"], abs=1e-3)


def test_the_average_of_the_finalists_is_one_more_finalist_and_wins_only_by_playing_best(
    world_run,
):
    """--select-centroid: the average of the finalists' vectors plays the same fresh tracks as
    they do (its recorded score is what it plays), and the kept controller is whichever
    of the four played best, the average included."""
    folder = _train(
        world_run, generations=4, check_every=1, select_top=3, select_episodes=3,
        select_centroid=True,
    )  # fmt: skip
    selection = json.loads((folder / "selection.json").read_text())
    finalists = selection["finalists"]
    assert len(finalists) == 4 and "centroid_of" in finalists[-1]
    members = finalists[-1]["centroid_of"]
    assert sorted(members) == sorted(f["generation"] for f in finalists[:3])
    checked = json.loads((folder / "es_state.json").read_text())["checked"]
    vectors = {c["generation"]: np.asarray(c["vector"]) for c in checked}
    average = np.mean([vectors[g] for g in members], axis=0)
    assert np.linalg.norm(average - vectors[members[0]]) > 1e-3  # a point of its own

    seeds = list(range(selection["seeds"][0], selection["seeds"][1] + 1))
    agent = load_world_model(world_run)
    with make_env("envpool", len(seeds), max_steps=40) as env:
        replay = run_episodes(env, agent, torch.tensor(average).float().repeat(3, 1), seeds)
    assert replay.returns.mean() == pytest.approx(finalists[-1]["select_mean"], abs=1e-3)
    winner = int(np.argmax([f["select_mean"] for f in finalists]))
    assert selection["winner"] == winner
    params, meta = load_controller(world_run)
    expected = average if winner == 3 else vectors[finalists[winner]["generation"]]
    np.testing.assert_allclose(params.numpy(), expected, atol=1e-6)
    assert ("centroid_of" in meta) == (winner == 3)


@pytest.mark.slow  # over 4 s: worker processes, a whole search or a real agent
def test_two_searches_run_side_by_side_until_the_cull_then_the_better_one_goes_on(
    world_run, tmp_path_factory
):
    """Before the cull both searches play and are checked; after it only the one whose last two
    checks average best is stepped, checked and saved, also across a resume."""
    other = tmp_path_factory.mktemp("two_searches")
    shutil.copytree(world_run, other, dirs_exist_ok=True)
    kw = {"searches": 2, "cull_after": 2, "check_every": 1, "select_top": 0, "force": False}
    folder = _train(world_run, generations=2, **kw)
    _train(world_run, generations=4, **kw)  # resumes after the cull
    straight = _train(other, generations=4, **kw)
    rows = read_metrics(folder / "metrics.jsonl")
    assert [r["generation"] for r in rows] == [1, 2, 3, 4]
    both = [(r["check_mean_search0"], r["check_mean_search1"]) for r in rows[:2]]
    winner = int(np.argmax(np.mean(both, axis=0)))
    assert all(r["check_mean"] == max(pair) for r, pair in zip(rows, both))
    assert all(
        list(r).count("check_mean_search0") + list(r).count("check_mean_search1") == 1
        and f"check_mean_search{winner}" in r
        for r in rows[2:]
    )
    state = json.loads((folder / train_controller.ES_STATE).read_text())
    stepped = [[k for k, _ in generation] for generation in state["told"]]
    assert state["alive"] == [winner] and stepped == [[0, 1], [0, 1], [winner], [winner]]
    saved = load_controller(world_run)[0].numpy()
    np.testing.assert_allclose(saved, state["means"][winner], rtol=1e-6, atol=1e-7)
    for a, b in zip(rows, read_metrics(straight / "metrics.jsonl")):
        assert a["check_mean"] == pytest.approx(b["check_mean"], abs=1e-4)


def test_deterministic_training_repeats_bit_for_bit(world_run, tmp_path_factory):
    """Lockstep envs: two runs of one seed give the same controller bytes and the same rows."""
    other = tmp_path_factory.mktemp("deterministic")
    shutil.copytree(world_run, other, dirs_exist_ok=True)
    kw = {"deterministic": True}
    first_run, second_run = _train(world_run, 3, **kw), _train(other, 3, **kw)
    for name in ("model.safetensors", "best/model.safetensors", "selection.json"):
        assert (first_run / name).read_bytes() == (second_run / name).read_bytes()
    strip = [
        {k: v for k, v in r.items() if k not in ("steps_per_s", "seconds")}
        for r in read_metrics(first_run / "metrics.jsonl")
    ]
    again = [
        {k: v for k, v in r.items() if k not in ("steps_per_s", "seconds")}
        for r in read_metrics(second_run / "metrics.jsonl")
    ]
    assert strip == again and len(strip) == 3


def test_several_searches_need_checks_to_choose_by(world_run, capsys):
    argv = ["train-controller", "--run-dir", str(world_run), "--searches", "2"]
    assert main([*argv, "--check-every", "0"]) == 2
    assert main([*argv, "--check-every", "5", "--cull-after", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("--cull-after" in line for line in err)


def test_evaluate_writes_the_protocol_and_statistics(world_run):
    _train(world_run, generations=1)
    cfg = evaluate.EvaluateConfig(
        run_dir=world_run, episodes=3, max_steps=30, seed=77, workers=2, gif=1
    )
    folder = evaluate.run(cfg)
    report = json.loads((folder / "eval.json").read_text())
    assert (
        report["protocol"]["env"] == "CarRacing-v3" and report["protocol"]["backend"] == "gymnasium"
    )
    assert [e["seed"] for e in report["episodes"]] == [77, 78, 79]
    returns = np.array([e["return"] for e in report["episodes"]])
    assert report["mean"] == pytest.approx(returns.mean()) and report["std"] == pytest.approx(
        returns.std(ddof=1)
    )
    assert report["ci95"][0] <= report["mean"] <= report["ci95"][1]
    assert all(e["steps"] == 30 for e in report["episodes"])
    gifs = list(folder.glob("best_seed*.gif"))
    assert len(gifs) == 1
    import imageio.v3 as iio

    assert iio.imread(gifs[0]).shape[0] == 15  # every 2nd of 30 frames


@pytest.mark.slow  # over 4 s: worker processes, a whole search or a real agent
def test_evaluation_returns_do_not_depend_on_the_worker_processes(trained_run):
    """Each car acts on its own frame, so which cars' steps came back together from the worker
    processes cannot change a single return: in-process and 3 workers agree bit for bit."""
    returns = []
    for workers in ("0", "3"):
        argv = ["evaluate", "--run-dir", str(trained_run), "--episodes", "5", "--max-steps", "60"]
        assert main([*argv, "--gif", "0", "--workers", workers]) == 0
        report = json.loads((RunDir(trained_run).eval / "eval.json").read_text())
        assert report["protocol"]["deterministic"] is True
        returns.append([e["return"] for e in report["episodes"]])
    assert returns[0] == returns[1] and len(set(returns[0])) > 1


def test_evaluate_sums_ms_reward_head_along_every_real_drive(trained_run):
    """eval.json sets M's reward head (the dream's only reward), summed along each real drive,
    beside the real return: with a head that says 0.25 whatever the memory, every track's sum is
    0.25 per step driven, and a constant has no correlation to report."""
    layout = RunDir(trained_run)
    mdnrnn = load_mdnrnn(trained_run)
    row = 3 * mdnrnn.n_gaussians * mdnrnn.z_dim  # the reward output of the one linear head
    with torch.no_grad():
        mdnrnn.head.weight[row] = 0.0
        mdnrnn.head.bias[row] = 0.25
    save_model(layout.mdnrnn, mdnrnn, read_model_meta(layout.mdnrnn, "train-mdnrnn")["arch"])
    params, meta = load_controller(trained_run)
    meta = {k: v for k, v in meta.items() if k not in ("arch", "sha256")}
    save_model(
        layout.controller,
        LinearController.from_flat(params),
        read_model_meta(layout.controller, "train-controller")["arch"],
        {**meta, **world_model_sources(trained_run)},  # C goes with the edited M
    )
    argv = ["evaluate", "--run-dir", str(trained_run), "--episodes", "3", "--max-steps", "40"]
    assert main([*argv, "--gif", "0", "--dream-episodes", "0"]) == 0
    report = json.loads((layout.eval / "eval.json").read_text())
    for episode in report["episodes"]:
        assert episode["m_return"] == pytest.approx(0.25 * episode["steps"], rel=1e-5)
    expected = np.mean([e["m_return"] for e in report["episodes"]])
    assert report["m_reward"]["mean_expected"] == pytest.approx(expected)
    assert report["m_reward"]["mean_real"] == pytest.approx(report["mean"])
    assert report["m_reward"]["correlation"] is None


def test_missing_controller_says_what_to_run(world_run, capsys):
    assert main(["evaluate", "--run-dir", str(world_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "run `worldmodels train-controller` first" in err and len(err.splitlines()) == 1


def test_play_draws_frames_and_saves_a_screenshot(world_run, tmp_path):
    _train(world_run, generations=1)
    shot = tmp_path / "play.png"
    args = ["play", "--run-dir", str(world_run), "--max-steps", "15", "--fps", "0"]
    assert main([*args, "--screenshot", str(shot)]) == 0
    import imageio.v3 as iio

    image = iio.imread(shot)
    assert image.shape[:2] == (288 + 40, 2 * 288)
    left, right = image[:288, :288].astype(int), image[:288, 288:].astype(int)
    assert left.std() > 10 and right.std() > 1  # a real frame and a (random-V) reconstruction


def test_tiles_read_back_from_the_return_match_the_official_env():
    """Drive real official tracks straight ahead; the tiles `lap_outcomes` reads back from each
    return equal the env's own visited count, and the car is on its way, not at a lap's end."""
    from worldmodels.envs.gymnasium_backend import make_official_env

    seeds, steps = [5, 6], 120
    returns, counts, visited = [], [], []
    for seed in seeds:
        env = make_official_env()
        env.reset(seed=seed)
        total = 0.0
        for _ in range(steps):
            total += env.step(np.array([0.0, 0.3, 0.0], np.float32))[1]
        returns.append(total)
        counts.append(len(env.unwrapped.track))
        visited.append(env.unwrapped.tile_visited_count)
        env.close()
    from worldmodels.envs import official_track_tiles

    assert official_track_tiles(seeds) == counts
    outcomes = evaluate.lap_outcomes(
        np.array(returns), np.array([steps] * 2), np.array([False, False]), counts
    )
    assert [o["tiles_missed"] for o in outcomes] == [c - v for c, v in zip(counts, visited)]
    assert all(o["end"] == "timeout" and 0 < v < c for o, v, c in zip(outcomes, visited, counts))


def test_lap_outcomes_tell_a_finished_lap_from_the_playfield_edge():
    tiles = [300, 300, 300]
    returns = np.array([1000 - 0.1 * 850, 290 / 300 * 1000 - 100, 100 / 300 * 1000 - 20 - 100])
    outcomes = evaluate.lap_outcomes(
        returns, np.array([850, 1000, 200]), np.array([True, False, True]), tiles
    )
    assert [o["end"] for o in outcomes] == ["lap", "timeout", "off_playfield"]
    assert [o["tiles_missed"] for o in outcomes] == [0, 10, 200]
    episodes = [
        {"return": r, "steps": s, **o} for r, s, o in zip(returns, [850, 1000, 200], outcomes)
    ]
    summary = evaluate.summarize_laps(episodes)
    assert summary["fraction_laps"] == pytest.approx(1 / 3)
    assert summary["lap_steps_mean"] == 850
    assert summary["tiles_missed_mean"] == pytest.approx(70)
    assert summary["fraction_below_600"] == pytest.approx(1 / 3)


class _ScriptedEnds(BatchedEnv):
    """Slot 0 finishes its lap on step 3 (a last tile, +3.2), slot 1 leaves the playfield on
    step 2 (-100), slot 2 plays to the step limit."""

    def _reset(self, seeds):
        return np.zeros((self.num_envs, 96, 96, 3), np.uint8)

    def _step(self, ids, actions):
        steps = self.steps[ids] + 1
        lap, off = (ids == 0) & (steps == 3), (ids == 1) & (steps == 2)
        reward = np.where(lap, 3.2, np.where(off, -100.0, 1.0)).astype(np.float32)
        return np.zeros((len(ids), 96, 96, 3), np.uint8), reward, lap | off


def test_a_lap_is_told_from_leaving_the_playfield_and_earns_the_lap_bonus(world_run):
    """Both end the episode (terminated); only the one with every tile visited is a lap, and
    only a lap gets --lap-bonus added to its training fitness."""
    agent = load_world_model(world_run)
    controllers = torch.zeros(3, controller_param_count(agent.input_dim))
    result = run_episodes(_ScriptedEnds(3, max_steps=5), agent, controllers, [0, 1, 2])
    assert result.terminated.tolist() == [True, True, False]
    assert result.laps.tolist() == [True, False, False]

    class Scripted:
        def play(self, params, seeds, early_stop=0, max_steps=None):
            played = run_episodes(_ScriptedEnds(3, max_steps=5), agent, controllers, seeds)
            return Played(played.returns, played.env_steps, played.laps)

    plain, _ = scoring.evaluate_candidates(Scripted(), np.zeros((3, 1)), [0], 0)
    bonus, _ = scoring.evaluate_candidates(Scripted(), np.zeros((3, 1)), [0], 0, 50.0)
    assert (bonus - plain).tolist() == [50.0, 0.0, 0.0]


def _stop_after(generations: int):
    """`_out_of_time` of a budget that ends the search after `generations` generations."""
    return lambda cfg, state: state.generation >= generations


def test_a_budget_that_ends_between_checks_checks_the_last_mean_and_may_keep_it(
    world_run, monkeypatch, capsys
):
    """Only checked means can be kept: without a check of the last one, the generations after
    the last periodic check would count for nothing."""
    monkeypatch.setattr(train_controller, "_out_of_time", _stop_after(3))
    folder = _train(world_run, generations=50, check_every=2, select_top=4, time_budget_min=1)
    assert "checked the last mean (generation 3)" in capsys.readouterr().err
    saved = json.loads((folder / train_controller.ES_STATE).read_text())
    assert [c["generation"] for c in saved["checked"]] == [2, 3]
    np.testing.assert_allclose(saved["checked"][1]["vector"], saved["means"][0])
    rows = read_metrics(folder / "metrics.jsonl")
    assert [r["generation"] for r in rows] == [1, 2, 3]  # the check joins generation 3's row
    assert rows[2]["check_mean"] == pytest.approx(saved["checked"][1]["check_mean"])
    assert rows[2]["best"] >= rows[2]["mean"]  # the rest of the row is kept
    # what was recorded is what the last mean plays on the check tracks
    agent = load_world_model(world_run)
    seeds = [scoring.CHECK_SEED_BASE + i for i in range(2)]
    mean = torch.tensor(saved["means"][0]).float().repeat(len(seeds), 1)
    with make_env("envpool", len(seeds), max_steps=40) as env:
        replay = run_episodes(env, agent, mean, seeds)
    assert replay.returns.mean() == pytest.approx(rows[2]["check_mean"], abs=1e-3)
    selection = json.loads((folder / "selection.json").read_text())
    assert sorted(f["generation"] for f in selection["finalists"]) == [2, 3]


def test_a_run_killed_in_its_final_selection_finishes_it_without_checking_again(
    world_run, monkeypatch
):
    monkeypatch.setattr(train_controller, "_out_of_time", _stop_after(3))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_controller, "select_mean", killed)
    with pytest.raises(KeyboardInterrupt):
        _train(world_run, generations=50, check_every=2, select_top=4, time_budget_min=1)
    folder = RunDir(world_run).controller
    assert not (folder / "selection.json").exists()
    monkeypatch.setattr(train_controller, "select_mean", scoring.select_mean)
    _train(world_run, generations=50, check_every=2, select_top=4, time_budget_min=1)
    saved = json.loads((folder / train_controller.ES_STATE).read_text())
    assert [c["generation"] for c in saved["checked"]] == [2, 3] and saved["selected"]
    assert [r["generation"] for r in read_metrics(folder / "metrics.jsonl")] == [1, 2, 3]
    assert json.loads((folder / "selection.json").read_text())["finalists"]


def test_the_budget_keeps_minutes_for_the_last_check_and_the_finalists_there_will_be():
    cfg = train_controller.TrainControllerConfig(
        check_every=5, check_episodes=8, select_top=4, select_episodes=24, time_budget_min=10
    )
    state = SearchState.new(SearchSettings(np.ones(12), 0.1, 8, False, 0))
    state.check_s_per_episode = 2.0
    assert train_controller._endgame_reserve_s(cfg, state) == 2.0 * (8 + 1 * 24)
    state.checked = [object()] * 2  # two checks so far: three finalists with the last mean
    assert train_controller._endgame_reserve_s(cfg, state) == 2.0 * (8 + 3 * 24)
    state.checked = [object()] * 6  # never more finalists than --select-top
    assert train_controller._endgame_reserve_s(cfg, state) == 2.0 * (8 + 4 * 24)
    state.elapsed = 600 - 2.0 * (8 + 4 * 24) - 1
    assert not train_controller._out_of_time(cfg, state)
    state.elapsed += 1
    assert train_controller._out_of_time(cfg, state)
    no_selection = dataclasses.replace(cfg, select_top=0)
    assert train_controller._endgame_reserve_s(no_selection, state) == 0.0


def test_check_plays_its_own_step_limit_not_the_training_one(world_run):
    """Training episodes may be short; the check and selection play the length evaluation does."""
    agent = load_world_model(world_run)
    evaluator = LocalEvaluator(agent, EpisodeSettings("envpool", 20))
    params = np.zeros((2, controller_param_count(agent.input_dim)))
    try:
        short = evaluator.play(params, [3, 4])
        longer = evaluator.play(params, [3, 4], 0, 35)
    finally:
        evaluator.close()
    assert short.env_steps == 2 * 20 and longer.env_steps == 2 * 35
    folder = _train(world_run, generations=2, max_steps=10, check_steps=30, select_top=1)
    rows = read_metrics(folder / "metrics.jsonl")
    assert all(r["steps_per_s"] > 0 for r in rows)
    selection = json.loads((folder / "selection.json").read_text())
    params, _ = load_controller(world_run)
    seeds = list(range(selection["seeds"][0], selection["seeds"][1] + 1))
    with make_env("envpool", len(seeds), max_steps=30) as env:
        replay = run_episodes(env, agent, params.repeat(len(seeds), 1), seeds)
    assert replay.returns.mean() == pytest.approx(
        selection["finalists"][0]["select_mean"], abs=1e-3
    )


def test_diagonal_cma_learns_the_variances_faster(world_run):
    """On a separable problem where one weight matters 100x more, separable CMA-ES shrinks that
    weight's step size relative to the others within 30 generations, several times more than the
    full covariance does (its learning rate is (n+2)/3 times smaller: 26x for this tiny agent,
    290x for the real one)."""
    agent = load_world_model(world_run)
    spread = {}
    for diagonal in (False, True):
        cfg = train_controller.TrainControllerConfig(
            run_dir=world_run, population=8, diagonal=diagonal
        )
        es = SearchState.new(train_controller._settings(cfg, agent)).optimizers[0]
        stds0 = scoring.initial_stds(agent, cfg.h_sigma_scale)
        for _ in range(30):
            xs = es.ask()
            es.tell(xs, [float(1e4 * x[0] ** 2 + np.sum(x**2)) for x in xs])
        learned = np.sqrt(es.dC) * es.sigma_vec.scaling / stds0
        spread[diagonal] = learned[1:].mean() / learned[0]
    assert spread[True] > 1.02 and spread[True] - 1 > 5 * abs(spread[False] - 1)


def test_scaled_inputs_give_every_input_the_same_initial_pull(world_run):
    """--scale-inputs: the rms of each input [z; h] is what the agent's own step-by-step memory
    sees along the recorded episodes; each weight's std times its input's rms is then one value
    within z and one within h, each group's total pull is the plain one, and biases keep 1."""
    from worldmodels.data.latents import load_latents, open_latents

    encode.run(encode.EncodeConfig(run_dir=world_run, batch_size=16, device="cpu"))
    agent = load_world_model(world_run)
    latents = RunDir(world_run).latents
    rows = []
    for entry in open_latents(latents):
        ep = load_latents(latents / entry.file)
        agent.reset(1)
        for z, action in zip(ep.mu[:-1], ep.actions):
            z, action = torch.from_numpy(z)[None], torch.from_numpy(action)[None]
            rows.append(torch.cat([z, agent.h], dim=1)[0])
            agent.h, agent.c = agent.mdnrnn.advance(z, action, agent.h, agent.c)
    stepped = torch.stack(rows).pow(2).mean(0).sqrt().detach().numpy()
    rms = scoring.input_rms(agent, latents)
    np.testing.assert_allclose(rms, stepped, rtol=1e-4, atol=1e-6)

    d, z_dim = agent.input_dim, agent.vae.z_dim
    plain = scoring.initial_stds(agent, 0.1)
    scaled = scoring.initial_stds(agent, 0.1, rms)
    cfg = train_controller.TrainControllerConfig(run_dir=world_run, scale_inputs=True)
    np.testing.assert_allclose(train_controller._settings(cfg, agent).stds, scaled)
    assert rms[z_dim:].max() > 2 * rms[z_dim:].min()  # the inputs differ, so the stds must
    assert np.all(scaled[3 * d :] == 1.0)
    for group in (slice(0, z_dim), slice(z_dim, d)):
        pull = scaled[: 3 * d].reshape(3, d)[:, group] * rms[group]
        np.testing.assert_allclose(pull, pull[0, 0], rtol=1e-5)
        plain_pull = plain[: 3 * d].reshape(3, d)[:, group] * rms[group]
        assert np.sum(pull**2) == pytest.approx(np.sum(plain_pull**2), rel=1e-5)


def test_mirrored_candidates_come_in_pairs_around_the_mean_and_resume_the_same(tmp_path):
    """--mirrors: candidates 2k and 2k+1 are mean + d and mean - d, so both play the same tracks
    and their shared track luck cancels; the JSON state replays them exactly."""
    settings = SearchSettings(np.ones(12), 0.1, 8, False, 0, mirrors=True)
    state = SearchState.new(settings)
    for _ in range(2):
        [asked] = state.ask()
        mean = state.means()[0][1]
        np.testing.assert_allclose(asked[0::2] - mean, mean - asked[1::2], atol=1e-12)
        assert np.abs(asked[0::2] - mean).min() > 0
        state.tell([asked], -np.sum(asked**2, axis=1))
    state.save(tmp_path / "state.json")
    [expected] = state.ask()
    again = SearchState.load(settings, tmp_path / "state.json")
    np.random.set_state(again.np_random)
    np.testing.assert_array_equal(again.ask()[0], expected)


def test_a_sigma_cap_bounds_the_step_size_and_resumes_the_same(tmp_path):
    """After a generation told with a cap, σ ≤ cap whatever the ranking said (a random ranking,
    which keeps pycma's own σ near its start); the recorded caps replay on resume."""
    settings = SearchSettings(np.ones(12), 0.1, 8, False, 0)
    caps = 0.1 * 0.5 ** (np.arange(1, 7) / 2.0)
    sigmas = {}
    for capped in (False, True):
        state = SearchState.new(settings)  # seeds numpy's generator, which pycma draws from
        rng = np.random.default_rng(0)
        for cap in caps:
            [asked] = state.ask()
            state.tell([asked], rng.normal(size=8), float(cap) if capped else None)
            sigmas.setdefault(capped, []).append(state.sigma())
    assert np.all(np.array(sigmas[True]) <= caps + 1e-12)
    assert state.sigma() == pytest.approx(0.1 / 8) and min(sigmas[False]) > 0.05
    state.save(tmp_path / "state.json")
    [expected] = state.ask()
    again = SearchState.load(settings, tmp_path / "state.json")
    np.random.set_state(again.np_random)
    assert again.sigma() == pytest.approx(0.1 / 8) and again.caps == list(caps)
    np.testing.assert_array_equal(again.ask()[0], expected)


def test_a_training_run_applies_the_sigma_schedule_and_records_each_cap(world_run):
    folder = _train(world_run, generations=2, check_every=0, select_top=0, sigma_halvings=2)
    caps = json.loads((folder / train_controller.ES_STATE).read_text())["caps"]
    assert caps == pytest.approx([0.1 / 2, 0.1 / 4])  # no time budget: half the generations each
    rows = read_metrics(folder / "metrics.jsonl")
    assert [r["sigma_cap"] for r in rows] == caps
    assert all(r["sigma"] <= r["sigma_cap"] + 1e-12 for r in rows)


def test_a_state_saved_before_caps_were_recorded_replays_the_caps_its_settings_gave(tmp_path):
    settings = SearchSettings(np.ones(12), 0.1, 8, False, 0)
    state = SearchState.new(settings)
    rng = np.random.default_rng(0)
    for g in range(1, 5):
        [asked] = state.ask()
        state.tell([asked], rng.normal(size=8), 0.1 * 0.5**g)
    state.save(tmp_path / "state.json")
    saved = json.loads((tmp_path / "state.json").read_text())
    del saved["caps"]
    (tmp_path / "old.json").write_text(json.dumps(saved))
    again = SearchState.load(settings, tmp_path / "old.json", lambda g: 0.1 * 0.5**g)
    assert again.sigma() == pytest.approx(state.sigma())
    with pytest.raises(UserError, match="--force"):  # replayed without its caps: refused
        SearchState.load(settings, tmp_path / "old.json")


def test_the_sigma_schedules_follow_generations_or_the_share_of_the_budget_used():
    def cap(cfg, gen, elapsed_s, reserve_s=0.0):
        return train_controller.sigma_cap(cfg, gen, elapsed_s, reserve_s)

    cfg = train_controller.TrainControllerConfig
    assert cap(cfg(), 10, 60.0) is None  # neither schedule: pycma's σ alone
    assert cap(cfg(sigma_halflife=30), 60, 0.0) == pytest.approx(0.1 / 4)
    timed = cfg(sigma_halvings=2, time_budget_min=10, generations=1000)
    assert cap(timed, 3, 300.0) == pytest.approx(0.1 / 2)  # half the budget: one halving
    assert cap(timed, 99, 300.0) == cap(timed, 3, 300.0)  # minutes count, not generations
    assert cap(timed, 99, 9999.0) == pytest.approx(0.1 / 4)  # never past the last halving
    # the minutes the final selection will take are not the search's: 540 s of 600 - 60 is all
    assert cap(timed, 3, 540.0, reserve_s=60.0) == pytest.approx(0.1 / 4)
    counted = cfg(sigma_halvings=2, time_budget_min=0, generations=40)
    assert cap(counted, 10, 9999.0) == pytest.approx(0.1 * 0.5**0.5)  # no budget: generations
    assert cap(cfg(sigma_halvings=2, time_budget_min=10, generations=20), 20, 60.0) == (
        pytest.approx(0.1 / 4)  # generations that end the run before its minutes do
    )
    both = cfg(sigma_halflife=30, sigma_halvings=2, time_budget_min=10)
    assert cap(both, 60, 60.0) == pytest.approx(0.1 / 4)  # the tighter of the two


def test_resume_with_other_search_settings_is_refused_and_keeps_the_state(world_run, capsys):
    folder = _train(world_run, generations=1, check_every=0, select_top=0)
    state = (folder / train_controller.ES_STATE).read_bytes()
    argv = ["train-controller", "--run-dir", str(world_run), "--population", "6"]
    assert main([*argv, "--generations", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "population=4, not 6" in err and "--force" in err and len(err.splitlines()) == 1
    assert (folder / train_controller.ES_STATE).read_bytes() == state


class _Payload:
    """Unpickling this writes a file: the proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_planted_pickle_state_is_never_loaded(world_run, tmp_path, capsys):
    import pickle

    folder = RunDir(world_run).controller
    folder.mkdir(parents=True, exist_ok=True)
    marker = tmp_path / "pwned"
    (folder / train_controller.PICKLED_STATE).write_bytes(pickle.dumps(_Payload(marker)))
    argv = ["train-controller", "--run-dir", str(world_run), "--generations", "1"]
    small = ["--population", "4", "--rollouts", "1", "--max-steps", "20", "--check-every", "0"]
    assert main([*argv, *small]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0] and not marker.exists()
    assert main([*argv, *small, "--force"]) == 0 and not marker.exists()
    state = json.loads((folder / train_controller.ES_STATE).read_text())
    assert state["generation"] == 1 and len(state["told"][0][0][1]) == 4


def test_a_state_that_does_not_replay_to_its_means_is_refused(world_run, capsys):
    folder = _train(world_run, generations=1, check_every=0, select_top=0)
    path = folder / train_controller.ES_STATE
    state = json.loads(path.read_text())
    costs = state["told"][0][0][1]
    state["told"][0][0][1] = [-c for c in costs]  # the ranking inverted: the replayed mean moves
    path.write_text(json.dumps(state))
    argv = ["train-controller", "--run-dir", str(world_run), "--generations", "2"]
    small = ["--population", "4", "--max-steps", "40", "--check-steps", "40", "--early-stop", "0"]
    same = ["--rollouts", "2", "--check-episodes", "2", "--check-every", "0", "--select-top", "0"]
    assert main([*argv, *small, *same]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "replay" in err[0]


def test_a_missing_cuda_device_is_one_line(trained_run, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["evaluate", "--run-dir", str(trained_run), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA device" in err and len(err.splitlines()) == 1


def test_rollouts_grow_as_the_search_narrows_on_tracks_of_their_own():
    """Episodes per candidate follow sqrt(sigma0 / sigma) between --rollouts and --max-rollouts;
    the first --rollouts tracks of a generation are the plain run's, the extra ones never
    repeat a track of any generation."""
    grow = [scoring.rollouts_at(s, 0.1, 2, 4) for s in (0.2, 0.1, 0.07, 0.05, 0.03, 0.01)]
    assert grow == [2, 2, 2, 3, 4, 4]
    assert scoring.rollouts_at(0.01, 0.1, 2, 0) == 2  # off: always --rollouts
    for gen in range(1, 50):
        assert scoring.training_tracks(gen, 2, 2, 4) == scoring.training_tracks(gen, 2, 2, 0)
    used = [t for gen in range(1, 50) for t in scoring.training_tracks(gen, 4, 2, 4)]
    assert len(used) == len(set(used)) == 49 * 4
    bad = train_controller.TrainControllerConfig(rollouts=3, max_rollouts=2)
    with pytest.raises(UserError, match="--max-rollouts"):
        bad.validate()


def test_a_generation_that_grows_plays_the_extra_tracks(world_run, monkeypatch):
    """When the rule asks for more episodes, every candidate plays the generation's plain tracks
    plus the extra ones, and the metrics row records how many."""
    asked = iter([2, 3, 3])
    monkeypatch.setattr(train_controller, "rollouts_at", lambda *args: next(asked))
    played_seeds = []
    evaluate = scoring.evaluate_candidates

    def spy(evaluator, candidates, seeds, *args):
        played_seeds.append(list(seeds))
        return evaluate(evaluator, candidates, seeds, *args)

    monkeypatch.setattr(train_controller, "evaluate_candidates", spy)
    folder = _train(world_run, generations=3, check_every=0, select_top=0, max_rollouts=3)
    assert [r["rollouts"] for r in read_metrics(folder / "metrics.jsonl")] == [2, 3, 3]
    base, extra = scoring.TRAIN_SEED_BASE, scoring.EXTRA_TRAIN_SEED_BASE
    assert played_seeds == [
        [base + 2, base + 3],
        [base + 4, base + 5, extra + 2],
        [base + 6, base + 7, extra + 3],
    ]


def test_the_local_evaluator_keeps_only_the_env_pools_in_use(world_run):
    """Growing rollouts change the training batch size; pools of old sizes are closed, not
    kept (with gymnasium each pool holds worker processes)."""
    agent = load_world_model(world_run)
    evaluator = LocalEvaluator(agent, EpisodeSettings("envpool", 5))
    params = np.zeros((6, controller_param_count(agent.input_dim)))
    closed = []
    try:
        for size in (2, 3, 2, 4, 5):
            evaluator.play(params[:size], list(range(size)))
            for env in evaluator._envs.values():
                if not hasattr(env, "_spy"):
                    env._spy = True
                    env.close = (lambda real, n: lambda: (closed.append(n), real())[1])(
                        env.close, env.num_envs
                    )
        assert list(evaluator._envs) == [(2, 5), (4, 5), (5, 5)]
        assert closed == [3]
    finally:
        evaluator.close()


def test_train_controller_starts_from_the_fit_on_the_run_own_frames(world_run):
    encode.run(encode.EncodeConfig(run_dir=world_run, batch_size=16, device="cpu"))
    short = dict(generations=1, check_every=0, select_top=0)
    folder = _train(world_run, start="road", start_gas=0.2, **short)
    saved = json.loads((folder / train_controller.ES_STATE).read_text())
    layout = RunDir(world_run)
    fit = fit_steering(*recorded_steering(layout.episodes, layout.latents))
    assert fit.frames > 100  # the tiny episodes start on the road
    with pytest.raises(UserError, match="too few .* --start zero"):  # 2 × 41 frames
        recorded_steering(layout.episodes, layout.latents, count=2)
    expected = road_following_start(fit, 8 + 16, 0.2)
    np.testing.assert_allclose(saved["start"], expected)
    plain = _train(world_run, force=True, **short) / train_controller.ES_STATE
    assert not np.any(json.loads(plain.read_text())["start"])  # --start zero, as before


def test_a_road_start_without_the_recorded_frames_says_what_to_do(world_run, capsys):
    encode.run(encode.EncodeConfig(run_dir=world_run, batch_size=16, device="cpu"))
    shutil.rmtree(RunDir(world_run).episodes)
    capsys.readouterr()  # encode's log
    args = ["train-controller", "--run-dir", str(world_run), "--start", "road"]
    assert main([*args, "--generations", "1", "--population", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--start zero" in err and len(err.splitlines()) == 1
