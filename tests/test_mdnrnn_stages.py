"""encode → train-mdnrnn → dream on tiny real episodes, and the batched dream API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from worldmodels.checkpoint import save_model
from worldmodels.cli import main
from worldmodels.data import load_episode, open_episodes
from worldmodels.data.latents import LatentEpisode, chunks, load_latents, make_batch, open_latents
from worldmodels.dream import DreamEnv, dream_rollout
from worldmodels.errors import UserError
from worldmodels.layout import RunDir
from worldmodels.metrics import read_metrics
from worldmodels.models import MDNRNN, ConvVAE, frames_to_tensor
from worldmodels.stages import dream, encode, train_mdnrnn

TINY_ARCH = {"z_dim": 8, "channels": [8, 16, 16, 32]}


def _tiny_vae(seed: int = 0) -> ConvVAE:
    """An untrained VAE with a confident posterior (σ ≈ 0.02), so z follows the frames and M has
    something to learn beyond noise."""
    torch.manual_seed(seed)
    vae = ConvVAE(z_dim=8, channels=tuple(TINY_ARCH["channels"])).eval()
    with torch.no_grad():
        vae.logvar.weight.mul_(0.01)
        vae.logvar.bias.fill_(-8.0)
    return vae


def _new_run(root: Path, source: Path, links: tuple[str, ...] = ("data",)) -> Path:
    """A fresh run dir that reads `source`'s finished stages through symlinks (never writes)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in links:
        (root / name).symlink_to(source / name, target_is_directory=True)
    return root


def _train_cfg(root: Path, **kw) -> train_mdnrnn.TrainMDNRNNConfig:
    base = dict(run_dir=root, epochs=2, batch_size=4, seq_len=8, hidden=16, n_gaussians=3)
    base.update(lr=1e-2, val_fraction=0.2, device="cpu")
    base.update(kw)
    return train_mdnrnn.TrainMDNRNNConfig(**base)


@pytest.fixture(scope="module")
def encoded_run(tmp_path_factory, tiny_run) -> Path:
    root = _new_run(tmp_path_factory.mktemp("encoded"), tiny_run)
    save_model(RunDir(root).vae, _tiny_vae(), arch=TINY_ARCH)
    encode.run(encode.EncodeConfig(run_dir=root, batch_size=16, device="cpu"))
    return root


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, encoded_run) -> Path:
    root = _new_run(tmp_path_factory.mktemp("trained"), encoded_run, ("data", "vae", "latents"))
    train_mdnrnn.run(_train_cfg(root, epochs=1))
    return root


# --- encode -----------------------------------------------------------------------------------


def test_encode_writes_the_vae_posterior_of_every_frame(encoded_run):
    layout = RunDir(encoded_run)
    vae = _tiny_vae()
    episodes = open_episodes(layout.episodes)
    latents = open_latents(layout.latents)
    assert [e.index for e in latents] == [e.index for e in episodes]
    for entry in episodes:
        ep = load_episode(layout.episodes / entry.file)
        lat = load_latents(layout.latents / entry.file)
        with torch.no_grad():
            mu, logvar = vae.encode(frames_to_tensor(ep.obs))
        assert lat.mu.dtype == np.float32 and lat.mu.shape == (ep.steps + 1, 8)
        np.testing.assert_allclose(lat.mu, mu.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(lat.logvar, logvar.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_array_equal(lat.actions, ep.actions)
        np.testing.assert_array_equal(lat.rewards, ep.rewards)
        assert (lat.terminated, lat.truncated, lat.seed) == (ep.terminated, ep.truncated, ep.seed)


def test_encode_resumes_redoing_only_missing_or_damaged_files(tmp_path, encoded_run):
    root = _new_run(tmp_path, encoded_run, ("data", "vae"))
    cfg = encode.EncodeConfig(run_dir=root, batch_size=7, device="cpu")
    folder = encode.run(cfg)
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.glob("episode_*.npz")}
    (folder / "episode_000001.npz").unlink()
    damaged = folder / "episode_000002.npz"
    damaged.write_bytes(damaged.read_bytes()[:500])
    (folder / ".episode_000003.npz.x.tmp").write_bytes(b"half")

    encode.run(cfg)
    assert len(open_latents(folder)) == 6 and not list(folder.glob("*.tmp"))
    redone = {
        p.name for p in folder.glob("episode_*.npz") if p.stat().st_mtime_ns != mtimes[p.name]
    }
    assert redone == {"episode_000001.npz", "episode_000002.npz"}

    save_model(RunDir(root).vae, _tiny_vae(seed=1), arch=TINY_ARCH)  # a retrained VAE
    encode.run(cfg)
    fresh = load_latents(folder / "episode_000004.npz")
    with torch.no_grad():
        mu, _ = _tiny_vae(seed=1).encode(
            frames_to_tensor(load_episode(RunDir(root).episodes / "episode_000004.npz").obs)
        )
    np.testing.assert_allclose(fresh.mu, mu.numpy(), atol=1e-5, rtol=0)


# --- train-mdnrnn -----------------------------------------------------------------------------


def _latent_episode(steps: int, terminated: bool) -> LatentEpisode:
    rng = np.random.default_rng(steps)
    return LatentEpisode(
        mu=rng.standard_normal((steps + 1, 4)).astype(np.float32),
        logvar=np.full((steps + 1, 4), -40.0, np.float32),  # σ ≈ 0: z is μ
        actions=np.ones((steps, 3), np.float32),
        rewards=np.arange(steps, dtype=np.float32),
        terminated=terminated,
        truncated=not terminated,
        seed=steps,
    )


def test_done_target_is_one_only_at_the_end_of_terminated_episodes():
    short, long = _latent_episode(3, terminated=True), _latent_episode(5, terminated=False)
    batch = make_batch([short, long], np.random.default_rng(0))
    assert batch.z.shape == (2, 6, 4) and batch.actions.shape == (2, 5, 3)
    assert batch.done.tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 0, 0]]
    assert batch.mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    np.testing.assert_allclose(batch.z[0, :4].numpy(), short.mu, atol=1e-6)
    assert float(batch.z[0, 4:].abs().sum()) == 0  # padding
    pieces = list(chunks(batch, 2, "cpu"))
    assert [p[0].shape[1] for p in pieces] == [2, 2, 1]
    torch.testing.assert_close(pieces[1][2], batch.z[:, 3:5])  # targets are z_{t+1}


def test_train_mdnrnn_learns_and_a_finished_run_is_skipped(tmp_path, encoded_run):
    """(That a stopped run resumes to exactly an uninterrupted one: tests/test_resume.py.)"""
    root = _new_run(tmp_path / "run", encoded_run, ("data", "vae", "latents"))
    train_mdnrnn.run(_train_cfg(root, epochs=2))

    rows = read_metrics(RunDir(root).mdnrnn / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    for key in ("val_nll", "val_nll_sum", "val_reward_mse", "val_done_bce"):
        assert all(np.isfinite(r[key]) for r in rows)
    assert rows[2]["val_nll"] < rows[0]["val_nll"]  # better than the untrained model
    assert rows[2]["val_nll_sum"] == pytest.approx(8 * rows[2]["val_nll"], rel=1e-4)

    weights = RunDir(root).mdnrnn / "model.safetensors"
    before = weights.stat().st_mtime_ns
    train_mdnrnn.run(_train_cfg(root, epochs=2))  # finished: skipped
    assert weights.stat().st_mtime_ns == before


def test_train_mdnrnn_refuses_to_mix_latents_of_another_vae(tmp_path, encoded_run):
    root = _new_run(tmp_path, encoded_run)
    save_model(RunDir(root).vae, _tiny_vae(), arch=TINY_ARCH)
    encode.run(encode.EncodeConfig(run_dir=root, device="cpu"))
    train_mdnrnn.run(_train_cfg(root, epochs=1))
    save_model(RunDir(root).vae, _tiny_vae(seed=1), arch=TINY_ARCH)  # V retrained...
    encode.run(encode.EncodeConfig(run_dir=root, device="cpu"))  # ...and re-encoded
    with pytest.raises(UserError, match="--force"):
        train_mdnrnn.run(_train_cfg(root, epochs=2))
    train_mdnrnn.run(_train_cfg(root, epochs=1, force=True))


@pytest.mark.slow
def test_kill_9_during_train_mdnrnn_then_rerun_resumes(tmp_path, encoded_run, capsys):
    root = _new_run(tmp_path, encoded_run, ("data", "vae", "latents"))
    epochs = 60  # ~50 ms each: the kill lands a few epochs in
    args = ["train-mdnrnn", "--run-dir", str(root), "--epochs", str(epochs), "--hidden", "16"]
    args += ["--seq-len", "8", "--batch-size", "4", "--n-gaussians", "3", "--device", "cpu"]
    env = dict(os.environ, WORLDMODELS_PROGRESS="0")
    proc = subprocess.Popen([sys.executable, "-m", "worldmodels.cli", *args], env=env)
    pointer = RunDir(root).mdnrnn / "ckpt" / "checkpoint.json"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if pointer.exists() and json.loads(pointer.read_text())["epoch"] >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(pointer.read_text())["epoch"]
    assert 2 <= killed_at < epochs, "kill landed too late to test anything"

    capsys.readouterr()
    assert main(args) == 0
    assert f"resuming after epoch {killed_at}" in capsys.readouterr().err
    rows = read_metrics(RunDir(root).mdnrnn / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == list(range(epochs + 1))  # each epoch exactly once
    assert json.loads((RunDir(root).mdnrnn / "model.json").read_text())["epochs"] == epochs


# --- the dream API ----------------------------------------------------------------------------


def _tiny_mdnrnn() -> MDNRNN:
    """Random weights, but with clearly ranked mixture components (as a trained M has), so a
    temperature near 0 always picks the same one."""
    torch.manual_seed(0)
    model = MDNRNN(z_dim=8, action_dim=3, hidden=16, n_gaussians=3).eval()
    with torch.no_grad():
        model.head.bias[: 3 * 8].view(3, 8).add_(torch.tensor([[0.0], [3.0], [6.0]]))
    return model


def test_dream_env_shapes_and_reproducibility():
    model = _tiny_mdnrnn()
    z0, actions = torch.randn(5, 8), torch.rand(5, 12, 3)

    def dream_z(seed: int, tau: float = 1.0) -> torch.Tensor:
        env = DreamEnv(model, tau, torch.Generator().manual_seed(seed), vae=_tiny_vae())
        return dream_rollout(env, z0, actions=actions).z

    env = DreamEnv(model, 1.0, vae=_tiny_vae())
    features = env.reset(z0)
    assert features.shape == (5, 8 + 16)
    out = env.step(actions[:, 0])
    assert out.z.shape == (5, 8) and out.h.shape == (5, 16)
    assert out.reward.shape == out.done_prob.shape == out.done.shape == (5,)
    assert out.done.dtype == torch.bool and env.features().shape == (5, 24)
    assert env.decode(out.z).shape == (5, 64, 64, 3)

    assert dream_z(0).shape == (5, 13, 8)
    torch.testing.assert_close(dream_z(0), dream_z(0), atol=0, rtol=0)
    assert not torch.allclose(dream_z(0), dream_z(1))
    # τ → 0: the dominant component's mean plus √1e-3·σ of noise, so seeds barely matter
    cold = (dream_z(0, tau=0.0) - dream_z(1, tau=0.0)).abs().mean()
    warm = (dream_z(0, tau=1.0) - dream_z(1, tau=1.0)).abs().mean()
    assert cold < warm / 10

    traj = dream_rollout(env, z0, policy=lambda feats: torch.tanh(feats[:, :3]), steps=4)
    assert traj.z.shape == (5, 5, 8) and traj.actions.shape == (5, 4, 3)
    assert traj.reward.shape == traj.done_prob.shape == (5, 4)


# --- dream stage and error messages -----------------------------------------------------------


def test_dream_stage_writes_gif_and_latent_error_plot(trained_run, tmp_path):
    import imageio.v3 as iio

    out = dream.run(dream.DreamConfig(run_dir=trained_run, steps=10, out=tmp_path / "real"))
    frames = iio.imread(out / "dream.gif", index=None)
    assert frames.shape[0] == 11 and frames.shape[2] == 2 * 64 * 4 + 4
    assert iio.imread(out / "latent_error.png").ndim == 3
    curves = json.loads((out / "latent_error.json").read_text())
    assert len(curves["dream"]) == 11 and curves["dream"][0] == pytest.approx(0, abs=1e-6)

    out = dream.run(
        dream.DreamConfig(run_dir=trained_run, steps=50, policy="random", out=tmp_path / "rnd")
    )
    assert iio.imread(out / "dream.gif", index=None).shape[0] == 51  # past the 40-step episode


def test_missing_inputs_say_which_command_to_run(tmp_path, tiny_run, trained_run, capsys):
    root = _new_run(tmp_path / "no_vae", tiny_run)
    assert main(["encode", "--run-dir", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run `worldmodels train-vae` first" in err[0]

    assert main(["encode", "--run-dir", str(tmp_path / "empty")]) == 2
    assert "run `worldmodels collect` first" in capsys.readouterr().err
    assert main(["train-mdnrnn", "--run-dir", str(root)]) == 2
    assert "run `worldmodels encode` first" in capsys.readouterr().err
    no_m = _new_run(tmp_path / "no_m", trained_run, ("data", "vae", "latents"))
    assert main(["dream", "--run-dir", str(no_m)]) == 2
    assert "run `worldmodels train-mdnrnn` first" in capsys.readouterr().err
