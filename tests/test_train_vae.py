"""train-vae and visualize-vae on tiny real episodes: it learns, resumes, refuses corruption,
and draws pictures of the right size."""

from __future__ import annotations

import json
import math
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from worldmodels import cli, runtime, vae_speed
from worldmodels.artifacts import load_vae
from worldmodels.data import iterate_frame_batches, open_episodes, split_by_episode
from worldmodels.data.dataset import first_frames
from worldmodels.layout import RunDir
from worldmodels.metrics import read_metrics
from worldmodels.models import ConvVAE, frames_to_tensor
from worldmodels.stages import train_vae as tv
from worldmodels.stages import visualize_vae as viz

# A small net, plain fp32 and a fixed layout: runs are then bit-for-bit repeatable, so a resumed
# run can be compared with an uninterrupted one.
TINY = dict(
    channels=(8, 16, 16, 32),
    z_dim=8,
    batch_size=16,
    lr=3e-3,
    precision="fp32",
    channels_last="off",
)
TINY_FLAGS = [
    "--channels=8,16,16,32",
    "--z-dim=8",
    "--batch-size=16",
    "--lr=0.003",
    "--precision=fp32",
    "--channels-last=off",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny nets gain nothing from a second thread, and on a busy 2-core machine two threads
    waiting on each other made these tests up to 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _new_run(root: Path, tiny_run: Path) -> Path:
    """A fresh run dir that reads tiny_run's episodes (never writes beside them)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").symlink_to(RunDir(tiny_run).data, target_is_directory=True)
    return root


def _cfg(run_dir: Path, **overrides) -> tv.TrainVAEConfig:
    return tv.TrainVAEConfig(run_dir=run_dir, **{**TINY, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_run) -> Path:
    """One uninterrupted 2-epoch run, shared by the tests that only read it."""
    run_dir = _new_run(tmp_path_factory.mktemp("vae") / "run", tiny_run)
    tv.run(_cfg(run_dir, epochs=2))
    return run_dir


@pytest.fixture
def run_dir(tmp_path, tiny_run) -> Path:
    return _new_run(tmp_path / "run", tiny_run)


@pytest.fixture
def epoch_calls(monkeypatch) -> list[int]:
    """Records every call of train_epoch (one per epoch actually trained)."""
    calls: list[int] = []
    real = tv.train_epoch

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tv, "train_epoch", counting)
    return calls


def _rows(run_dir: Path) -> list[dict]:
    return read_metrics(RunDir(run_dir).vae / "metrics.jsonl")


def _val_sse(model: ConvVAE, run_dir: Path) -> float:
    """Validation SSE of `model` on the held-out episodes, computed here independently."""
    folder = RunDir(run_dir).episodes
    _, val = split_by_episode(open_episodes(folder), tv.TrainVAEConfig().val_fraction)
    batches = iterate_frame_batches(folder, val, 64)
    return tv.evaluate(model, batches, torch.device("cpu"), vae_speed.Speed(), 0.5)["val_sse"]


def test_two_epochs_learn_and_keep_the_best_model(trained):
    rows = _rows(trained)
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("train_sse", "train_mse", "train_kl", "val_sse", "val_mse", "val_kl"):
            assert math.isfinite(row[key]), key
        assert row["img_per_s"] > 0 and row["speed"] == "fp32"
        assert row["val_mse"] == pytest.approx(row["val_sse"] / (64 * 64 * 3), rel=1e-3)

    torch.manual_seed(0)
    untrained = ConvVAE(8, (8, 16, 16, 32))
    vae = load_vae(trained)
    assert not vae.training and vae.channels == (8, 16, 16, 32) and vae.z_dim == 8
    before, after = _val_sse(untrained, trained), _val_sse(vae, trained)
    # Untrained ~670 (a flat grey image); predicting the mean training image gives ~300.
    assert after < 0.6 * before, (before, after)

    meta = json.loads((RunDir(trained).vae / "model.json").read_text())
    best = min(rows, key=lambda r: r["val_sse"])
    assert meta["arch"] == {"z_dim": 8, "channels": [8, 16, 16, 32]}
    assert meta["epochs"] == 2 and meta["best_epoch"] == best["epoch"]
    assert meta["val_sse"] == pytest.approx(best["val_sse"], rel=1e-5)
    assert after == pytest.approx(meta["val_sse"], rel=1e-4)  # the saved weights are the best
    assert (RunDir(trained).vae / "config.json").exists()


def test_resume_trains_only_the_missing_epochs(run_dir, trained, epoch_calls, capsys):
    tv.run(_cfg(run_dir, epochs=1))
    assert len(epoch_calls) == 1
    tv.run(_cfg(run_dir, epochs=2))
    assert len(epoch_calls) == 2
    rows = _rows(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2]
    # Same weights, optimizer state, data order and noise as the run that was never stopped.
    assert rows[-1]["val_sse"] == pytest.approx(_rows(trained)[-1]["val_sse"], rel=1e-4)

    tv.run(_cfg(run_dir, epochs=2))  # finished: nothing is trained again
    assert len(epoch_calls) == 2
    assert "nothing to do" in capsys.readouterr().err
    assert [r["epoch"] for r in _rows(run_dir)] == [1, 2]


def test_crash_mid_epoch_resumes_from_last_checkpoint(run_dir, trained, monkeypatch):
    real_step = vae_speed.train_step
    pointer = RunDir(run_dir).vae / "ckpt" / "checkpoint.json"
    steps_after_checkpoint = []

    def crashing_step(*args, **kwargs):
        if pointer.exists():  # epoch 1 is checkpointed: die two steps into epoch 2
            steps_after_checkpoint.append(1)
            if len(steps_after_checkpoint) == 3:
                raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(tv, "train_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        tv.run(_cfg(run_dir, epochs=2))
    assert json.loads(pointer.read_text())["epoch"] == 1
    assert [r["epoch"] for r in _rows(run_dir)] == [1]
    assert not (RunDir(run_dir).vae / "model.json").exists()

    monkeypatch.setattr(tv, "train_step", real_step)
    tv.run(_cfg(run_dir, epochs=2))
    rows = _rows(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["val_sse"] == pytest.approx(_rows(trained)[-1]["val_sse"], rel=1e-4)


def test_corrupt_checkpoint_is_refused_in_one_line(run_dir, capsys, epoch_calls):
    tv.run(_cfg(run_dir, epochs=1))
    weights = RunDir(run_dir).vae / "ckpt" / "epoch_0001.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2 :][:8])
    weights.write_bytes(bytes(data))
    capsys.readouterr()

    argv = ["train-vae", f"--run-dir={run_dir}", "--epochs=2", *TINY_FLAGS]
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "corrupt" in lines[0] and "--force" in lines[0], lines

    assert cli.main([*argv, "--force=true"]) == 0  # starting over is the way out
    assert len(epoch_calls) == 1 + 2
    assert [r["epoch"] for r in _rows(run_dir)] == [1, 2]


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2 :][:8])
    path.write_bytes(bytes(data))


def test_a_damaged_last_epoch_falls_back_to_the_one_before(run_dir, trained, epoch_calls, capsys):
    """The epoch before the last stays on disk: damage to the last costs one epoch, no --force,
    and the run ends exactly as the undamaged one did."""
    tv.run(_cfg(run_dir, epochs=2))
    ckpt = RunDir(run_dir).vae / "ckpt"
    assert sorted(p.name for p in ckpt.glob("epoch_*.safetensors")) == [
        "epoch_0001.safetensors",
        "epoch_0002.safetensors",
    ]
    _flip_bytes(ckpt / "epoch_0002.safetensors")
    (RunDir(run_dir).vae / "model.json").unlink()  # as if killed before the model was written
    capsys.readouterr()
    assert cli.main(["train-vae", f"--run-dir={run_dir}", "--epochs=2", *TINY_FLAGS]) == 0
    assert "epoch 2 damaged; resuming from epoch 1" in capsys.readouterr().err
    assert len(epoch_calls) == 2 + 1  # epoch 2 trained again, nothing more
    assert [r["epoch"] for r in _rows(run_dir)] == [1, 2]
    assert _rows(run_dir)[-1]["val_sse"] == pytest.approx(_rows(trained)[-1]["val_sse"], rel=1e-4)


def test_a_damaged_final_model_is_written_again_from_the_checkpoint(run_dir, epoch_calls, capsys):
    tv.run(_cfg(run_dir, epochs=1))
    model = RunDir(run_dir).vae / "model.safetensors"
    good = model.read_bytes()
    _flip_bytes(model)
    with pytest.raises(Exception, match="rerun `worldmodels train-vae`; it writes the model"):
        load_vae(run_dir)
    capsys.readouterr()
    assert cli.main(["train-vae", f"--run-dir={run_dir}", "--epochs=1", *TINY_FLAGS]) == 0
    assert "damaged: writing it again" in capsys.readouterr().err
    assert model.read_bytes() == good and len(epoch_calls) == 1  # healed, nothing retrained


def test_missing_data_says_run_collect(tmp_path, capsys):
    assert cli.main(["train-vae", f"--run-dir={tmp_path / 'empty'}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "run `worldmodels collect` first" in lines[0]


def test_visualize_writes_pictures_of_the_expected_size(trained, tmp_path, capsys):
    assert cli.main(["visualize-vae", f"--run-dir={tmp_path}"]) == 2
    assert "run `worldmodels train-vae` first" in capsys.readouterr().err

    assert cli.main(["visualize-vae", f"--run-dir={trained}", "--columns=5", "--scale=2"]) == 0
    grid = iio.imread(RunDir(trained).vae / "reconstructions.png")
    cell = 64 + viz.GAP
    assert grid.shape == (2 * (3 * cell + viz.GAP), 2 * (viz.LABEL_WIDTH + 5 * cell + viz.GAP), 3)
    traversal = iio.imread(RunDir(trained).vae / "traversal.png")
    # 6 most-used dims (of 8) as rows, 7 values from -2 to +2 sigma as columns.
    assert traversal.shape == (
        2 * (6 * cell + viz.GAP),
        2 * (viz.LABEL_WIDTH + 7 * cell + viz.GAP),
        3,
    )

    # Row 2 is the VAE's reconstruction of exactly the frames in row 1; row 3 is something else.
    def tiles(image: np.ndarray, row: int, count: int) -> np.ndarray:
        small = image[::2, ::2]  # undo the 2x nearest-neighbour upscale
        top = viz.GAP + row * cell
        lefts = [viz.LABEL_WIDTH + viz.GAP + j * cell for j in range(count)]
        return np.stack([small[top : top + 64, x : x + 64] for x in lefts])

    originals, recons, priors = (tiles(grid, r, 5) for r in range(3))
    vae = load_vae(trained)
    with torch.no_grad():
        expected = viz.to_images(vae.decode(vae.encode(frames_to_tensor(originals))[0]))
    assert np.abs(recons.astype(int) - expected).max() <= 1
    assert np.abs(priors.astype(int) - recons).mean() > 1
    # The centre column of the traversal is the unchanged frame in every row.
    centres = np.stack([tiles(traversal, r, 7)[3] for r in range(6)])
    assert (centres == centres[0]).all()
    assert any((tiles(traversal, r, 7)[0] != centres[0]).any() for r in range(6))


def test_auto_speed_picks_a_measured_option_that_keeps_the_loss(trained):
    cfg = _cfg(trained, precision="auto", channels_last="auto")
    device = torch.device("cpu")
    frames = first_frames(RunDir(trained).episodes, open_episodes(RunDir(trained).episodes), 32)
    torch.manual_seed(0)
    speed, results = vae_speed.choose_speed(cfg, ConvVAE(8, (8, 16, 16, 32)), frames, device)
    assert list(results) == vae_speed.speed_candidates(cfg, device)
    assert speed in results and vae_speed.keeps_loss(results[speed], results[vae_speed.Speed()])
    assert results[speed].img_per_s >= results[vae_speed.Speed()].img_per_s


def _result(img_per_s: float, loss: float) -> vae_speed.SpeedResult:
    return vae_speed.SpeedResult(img_per_s, [1000.0, loss], model=None)


def test_pick_fastest_needs_the_same_loss_and_a_clear_gain():
    fp32, cl, bf16 = (
        vae_speed.Speed(),
        vae_speed.Speed(channels_last=True),
        vae_speed.Speed(bf16=True),
    )
    assert vae_speed.pick_fastest({fp32: _result(100, 500), bf16: _result(150, 505)}) == bf16
    # bf16 is faster but its loss moved by 10%: the next fastest that keeps it wins.
    picked = vae_speed.pick_fastest(
        {fp32: _result(100, 500), cl: _result(120, 500), bf16: _result(300, 550)}
    )
    assert picked == cl
    assert vae_speed.pick_fastest({fp32: _result(100, 500), bf16: _result(300, math.nan)}) == fp32
    assert vae_speed.pick_fastest({fp32: _result(100, 500), cl: _result(103, 500)}) == fp32  # noise


def test_bf16_is_not_a_candidate_without_native_bf16(monkeypatch):
    cfg = tv.TrainVAEConfig()
    monkeypatch.setattr(runtime, "cpu_supports_fast_bf16", lambda: False)
    names = [s.name for s in vae_speed.speed_candidates(cfg, torch.device("cpu"))]
    assert names == ["fp32", "fp32+channels_last"]
    monkeypatch.setattr(runtime, "cpu_supports_fast_bf16", lambda: True)
    assert len(vae_speed.speed_candidates(cfg, torch.device("cpu"))) == 4
    fixed = tv.TrainVAEConfig(precision="bf16", channels_last="on")
    assert vae_speed.speed_candidates(fixed, torch.device("cpu")) == [vae_speed.Speed(True, True)]


def test_early_stop_counts_epochs_without_improvement():
    model = ConvVAE(8, (8, 16, 16, 32))
    state = {"epoch": 0, "best_epoch": 0, "best_score": math.inf, "bad_epochs": 0}
    for epoch, val_sse in enumerate([300.0, 200.0, 210.0, 205.0], start=1):
        state = tv._update_best(
            state, {"epoch": epoch, "val_sse": val_sse, "train_sse": 1.0}, model
        )
    assert state["best_epoch"] == 2 and state["bad_epochs"] == 2
    assert state["best_row"]["val_sse"] == 200.0


def test_the_pictures_show_the_car_on_the_road_from_many_episodes():
    """Exploration data is mostly grass: the grid picks frames with road around the car, one
    per episode while episodes last, and only falls back to grass when road frames run out."""
    grass = np.zeros((64, 64, 3), np.uint8)
    grass[...] = (102, 204, 102)
    road = grass.copy()
    road[viz.CAR_WINDOW] = (105, 105, 105)
    frames = np.stack([grass] * 12 + [road] * 6)
    episodes = np.array([0] * 6 + [1] * 6 + [0, 0, 1, 1, 2, 2])
    np.testing.assert_allclose(viz.road_around_car(frames), [0] * 12 + [1] * 6)
    generator = torch.Generator().manual_seed(0)
    picks = viz.pick_frames(frames, episodes, 3, generator)
    assert all(p >= 12 for p in picks) and sorted(episodes[picks]) == [0, 1, 2]
    picks = viz.pick_frames(frames, episodes, 8, generator)
    assert len(set(picks)) == 8 and sum(p >= 12 for p in picks) == 6


def test_a_time_budget_cuts_each_epoch_short_and_says_so(run_dir, trained, capsys):
    full = _rows(trained)[0]["train_frames"]
    tv.run(_cfg(run_dir, epochs=2, time_budget_min=1e-9))  # every pass stops after one batch
    rows = _rows(run_dir)
    assert [r["train_frames"] for r in rows] == [16, 16] and full > 16
    assert "used its share of --time-budget-min" in capsys.readouterr().err
    assert json.loads((RunDir(run_dir).vae / "model.json").read_text())["epochs"] == 2
