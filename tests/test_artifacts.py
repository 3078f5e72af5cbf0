"""An exported agent is one folder that rebuilds and drives with no run dir, and never runs code."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from worldmodels import artifacts, load_agent
from worldmodels.artifacts import export_agent, load_world_model
from worldmodels.cli import main
from worldmodels.errors import UserError
from worldmodels.layout import RunDir


def _frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)


def _drive(agent, frames: np.ndarray, steps: int = 4) -> np.ndarray:
    agent.reset(len(frames))
    return np.stack([agent.act(frames) for _ in range(steps)])


def test_fp32_export_drives_exactly_like_its_run_dir(trained_run, tmp_path):
    out = export_agent(trained_run, tmp_path / "agent", half=False)
    info = json.loads((out / "agent.json").read_text())
    assert info["crop"] is True and info["z_dim"] == 8 and info["controller_input_dim"] == 24
    assert "tanh" in info["action_mapping"] and info["versions"]["torch"]
    frames = _frames(3)
    np.testing.assert_array_equal(
        _drive(load_agent(out), frames), _drive(load_agent(trained_run), frames)
    )


def test_fp16_export_is_half_the_size_and_acts_within_rounding(trained_run, tmp_path):
    full = export_agent(trained_run, tmp_path / "fp32", half=False)
    half = export_agent(trained_run, tmp_path / "fp16", half=True)
    for part in ("vae", "mdnrnn"):
        weights = RunDir(half).root / part / "model.safetensors"
        with safe_open(weights, "pt") as f:
            assert all(f.get_tensor(k).dtype.itemsize == 2 for k in f.keys())  # noqa: SIM118
        ratio = (
            weights.stat().st_size / (RunDir(full).root / part / "model.safetensors").stat().st_size
        )
        assert 0.45 < ratio < 0.55
    frames = _frames(4, seed=1)
    a, b = _drive(load_agent(full), frames), _drive(load_agent(half), frames)
    assert np.abs(a - b).max() < 0.05 and not np.array_equal(a, b)
    assert load_world_model(half).vae.mu.weight.dtype == torch.float32  # cast back on load


def test_act_refuses_frames_it_cannot_use(trained_run):
    agent = load_agent(trained_run)
    agent.reset(2)
    with pytest.raises(ValueError, match="reset"):
        agent.act(_frames(3))
    with pytest.raises(ValueError, match="96, 96, 3"):
        agent.act(np.zeros((2, 64, 64, 3), np.uint8))


def test_evaluate_an_agent_folder_writes_beside_not_into_it(trained_run, tmp_path, capsys):
    out = export_agent(trained_run, tmp_path / "agent", half=False)
    results = tmp_path / "results"
    argv = ["--episodes", "2", "--max-steps", "30", "--gif", "0", "--seed", "11"]
    assert main(["evaluate", "--agent", str(out), "--run-dir", str(results), *argv]) == 0
    assert main(["evaluate", "--run-dir", str(trained_run), *argv]) == 0
    mine = json.loads((results / "eval" / "eval.json").read_text())
    source = json.loads((RunDir(trained_run).eval / "eval.json").read_text())
    assert [e["return"] for e in mine["episodes"]] == [e["return"] for e in source["episodes"]]
    assert mine["protocol"]["agent"] == str(out) and not (out / "eval").exists()
    # only the run's own evaluation vouches for what it ran on: the agent folder's is not a run's
    assert (RunDir(trained_run).eval / "inputs.json").exists()
    assert not (results / "eval" / "inputs.json").exists()


def test_pretrained_and_agent_flags_fail_in_one_line(trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(artifacts, "PRETRAINED", tmp_path / "nothing")
    assert main(["evaluate", "--pretrained", "--run-dir", str(tmp_path / "r")]) == 2
    assert main(["evaluate", "--agent", str(trained_run), "--run-dir", str(tmp_path / "r")]) == 2
    assert main(["export", "--run-dir", str(trained_run)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3
    assert "no pretrained agent" in lines[0] and "not an exported agent" in lines[1]
    assert "--out is required" in lines[2]
    monkeypatch.setattr(artifacts, "PRETRAINED", export_agent(trained_run, tmp_path / "shipped"))
    assert load_agent().info["controller_generation"] == 1


def test_a_controller_trained_with_another_v_is_refused_everywhere(trained_run, tmp_path, capsys):
    """V retrained after C: evaluate, play, dream --agent's export and load_agent all refuse in
    one line, and an export carries the checksums of its own (float16) copies."""
    from worldmodels.checkpoint import save_model
    from worldmodels.models import ConvVAE

    good = export_agent(trained_run, tmp_path / "good")
    meta = json.loads((good / "controller" / "model.json").read_text())
    assert meta["vae_sha256"] == json.loads((good / "vae" / "model.json").read_text())["sha256"]
    assert load_agent(good).act(_frames(1)).shape == (1, 3)

    vae_meta = json.loads((RunDir(trained_run).vae / "model.json").read_text())
    torch.manual_seed(1)
    save_model(RunDir(trained_run).vae, ConvVAE(8, (4, 8, 8, 16)), vae_meta["arch"])
    for argv in (
        ["evaluate", "--run-dir", str(trained_run), "--episodes", "1"],
        ["play", "--run-dir", str(trained_run), "--max-steps", "2", "--fps", "0"],
        ["export", "--run-dir", str(trained_run), "--out", str(tmp_path / "bad")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "trained with another V than" in err[0], argv
    with pytest.raises(UserError, match="another V"):
        load_agent(trained_run)
    assert not (tmp_path / "bad").exists()


def test_a_controller_for_another_world_model_is_refused(trained_run, tmp_path, capsys):
    from worldmodels.checkpoint import save_model
    from worldmodels.models import LinearController

    save_model(
        RunDir(trained_run).controller, LinearController(40), {"input_dim": 40, "action_dim": 3}
    )
    assert main(["evaluate", "--run-dir", str(trained_run), "--episodes", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has 123 parameters but V and M there need 75" in err and len(err.splitlines()) == 1


def test_play_drives_an_agent_folder_with_no_run_dir(trained_run, tmp_path, capfd):
    out = export_agent(trained_run, tmp_path / "agent")
    shot = tmp_path / "shot.png"
    argv = ["play", "--agent", str(out), "--max-steps", "12", "--fps", "0"]
    assert main([*argv, "--screenshot", str(shot)]) == 0
    import imageio.v3 as iio

    assert iio.imread(shot).shape[:2] == (288 + 40, 2 * 288)
    captured = capfd.readouterr()
    assert "ALSA" not in captured.err and "ALSA" not in captured.out
    assert not (out / "eval").exists() and not list(tmp_path.glob("runs"))


def test_dream_follows_an_agent_folder_on_real_tracks_with_no_run_dir(trained_run, tmp_path):
    """The agent drives official tracks; the dream starts from the latent of its first frame and
    replays its actions; pictures go to the results folder, never into the agent folder."""
    import imageio.v3 as iio

    out = export_agent(trained_run, tmp_path / "agent", half=False)
    results = tmp_path / "results"
    argv = ["--agent", str(out), "--run-dir", str(results), "--steps", "10"]
    assert main(["dream", *argv, "--error-episodes", "2", "--error-samples", "3"]) == 0
    assert iio.imread(results / "dream" / "dream.gif", index=None).shape[0] == 11
    curves = json.loads((results / "dream" / "latent_error.json").read_text())
    assert curves["error_episodes"] == 2 and len(curves["dream"]) == 11
    assert curves["dream"][0] == pytest.approx(0, abs=1e-6) and curves["no_change"][0] == 0
    assert curves["dream"][-1] > 0 and curves["no_change"][-1] > 0  # the car moved; M guessed
    assert not (out / "dream").exists() and not list(tmp_path.glob("runs"))


@pytest.mark.slow
def test_the_readme_notebook_snippet_runs(trained_run, tmp_path, monkeypatch, capsys):
    """The README's snippet, as a user would paste it, on a tiny exported agent."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("<!-- snippet: load_agent -->")
    block = readme[start:].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.setattr(artifacts, "PRETRAINED", export_agent(trained_run, tmp_path / "agent"))
    exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("return ") and float(printed.split()[1]) != 0.0


SHIPPED = artifacts.PRETRAINED


@pytest.mark.slow  # over 4 s: worker processes, a whole search or a real agent
@pytest.mark.skipif(not (SHIPPED / "agent.json").exists(), reason="no pretrained agent shipped")
def test_the_shipped_agent_replays_its_recorded_short_evaluation(tmp_path):
    """`evaluate --pretrained` repeats the short evaluation recorded beside the agent, track for
    track, with worker processes: every car acts on its own frame, so the batches the workers'
    steps came back in cannot change a return (where V encodes in the same precision)."""
    record = json.loads((SHIPPED / "short_eval.json").read_text())
    proto = record["protocol"]
    if proto["encoder"] != ("bf16" if load_agent().world_model.bf16 else "fp32"):
        pytest.skip("this CPU encodes in another precision than the machine that recorded it")
    argv = ["--episodes", str(proto["episodes"]), "--seed", str(proto["seeds"][0])]
    argv += ["--max-steps", str(proto["max_steps"]), "--gif", "0"]
    assert main(["evaluate", "--pretrained", "--run-dir", str(tmp_path), *argv]) == 0
    mine = json.loads((tmp_path / "eval" / "eval.json").read_text())["episodes"]
    assert [e["steps"] for e in mine] == [e["steps"] for e in record["episodes"]]
    for got, want in zip(mine, record["episodes"]):
        assert got["return"] == pytest.approx(want["return"], abs=1e-3)


@pytest.mark.skipif(not (SHIPPED / "agent.json").exists(), reason="no pretrained agent shipped")
def test_play_pretrained_opens_its_window_with_no_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["play", "--pretrained", "--max-steps", "20", "--fps", "0", "--screenshot", "s.png"]
    assert main(argv) == 0
    import imageio.v3 as iio

    assert iio.imread(tmp_path / "s.png").shape[:2] == (288 + 40, 2 * 288)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png"]  # no run dir made
    info = json.loads((SHIPPED / "agent.json").read_text())
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert info["weights_dtype"] == "torch.float16" and size <= 10_000_000
