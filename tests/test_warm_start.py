"""--start road: the road follower's steering fitted to V's latents as CMA-ES's first mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worldmodels.models import batched_controller_actions
from worldmodels.policies import AHEAD_ROWS
from worldmodels.search import SearchSettings, SearchState
from worldmodels.warm_start import (
    SteeringFit,
    ahead_rows,
    fit_steering,
    road_following_start,
    steering_targets,
)

GRASS, ROAD = (102, 204, 102), (105, 105, 105)


def test_the_strip_ahead_is_the_same_stretch_of_road_in_vs_small_frames():
    assert ahead_rows(96, crop=False) == AHEAD_ROWS
    assert ahead_rows(64, crop=True) == slice(30, 50)  # 84 cropped rows squeezed into 64


def test_the_follower_steers_toward_the_road_ahead_and_has_no_target_on_grass():
    frames = np.empty((3, 64, 64, 3), np.uint8)
    frames[...] = GRASS
    frames[0, :, 40:52] = ROAD  # right of the car (column 32): centre 45.5
    frames[1, :, 20:30] = ROAD  # left: centre 24.5
    frames[2, :29] = ROAD  # road only above the strip ahead: nothing to steer by
    steer, seen = steering_targets(frames, crop=True)
    assert seen.tolist() == [True, True, False]
    assert steer[0] == pytest.approx(min(1.0, 2.0 * (45.5 - 32) / 32))
    assert steer[1] == pytest.approx(2.0 * (24.5 - 32) / 32)


def test_the_fit_recovers_a_steering_that_is_tanh_of_a_linear_function():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4000, 6))
    weight, bias = np.array([0.4, -0.3, 0.0, 0.2, 0.1, -0.05]), 0.1
    fit = fit_steering(z, np.tanh(z @ weight + bias))
    assert fit.frames == 4000 and fit.r2 > 0.99
    np.testing.assert_allclose(fit.weight, weight, atol=0.02)  # the ridge shrinks by ~1 %
    assert fit.bias == pytest.approx(bias, abs=0.01)


def test_the_first_mean_steers_by_the_fit_holds_its_gas_never_brakes_and_ignores_h():
    fit = SteeringFit(np.array([0.5, -1.0, 0.25]), -0.2, frames=10, r2=1.0)
    start = road_following_start(fit, input_dim=3 + 5, gas=0.1)
    inputs = torch.randn(4, 8, dtype=torch.float64)
    params = torch.from_numpy(np.tile(start, (4, 1)))
    actions = batched_controller_actions(params, inputs).numpy()
    expected_steer = np.tanh(inputs[:, :3].numpy() @ fit.weight + fit.bias)
    np.testing.assert_allclose(actions[:, 0], expected_steer, rtol=1e-12)
    np.testing.assert_allclose(actions[:, 1:], [[0.1, 0.0]] * 4, atol=1e-12)
    inputs[:, 3:] = torch.randn(4, 5, dtype=torch.float64)  # another memory h
    np.testing.assert_allclose(batched_controller_actions(params, inputs).numpy(), actions)


def test_a_search_starts_at_its_first_mean_and_resumes_from_the_saved_one(tmp_path):
    start = np.linspace(-1, 1, 12)
    settings = SearchSettings(np.ones(12), 0.1, 8, False, 0, start=start)
    state = SearchState.new(settings)
    np.testing.assert_array_equal(state.means()[0][1], start)
    [asked] = state.ask()
    assert np.abs(asked.mean(axis=0) - start).max() < 0.2  # candidates around the first mean
    state.tell([asked], -np.sum(asked**2, axis=1))
    state.save(tmp_path / "state.json")
    [expected] = state.ask()
    # the stage rebuilds the settings without the fit on resume: the state brings its own
    again = SearchState.load(SearchSettings(np.ones(12), 0.1, 8, False, 0), tmp_path / "state.json")
    np.testing.assert_array_equal(again.settings.first_mean(), start)
    np.random.set_state(again.np_random)
    np.testing.assert_array_equal(again.ask()[0], expected)
