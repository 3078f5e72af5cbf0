"""`worldmodels train-mdnrnn`: fit M, the MDN-RNN, to the encoded episodes.

What one epoch does:
  * draws a fresh z ~ N(μ, σ²) for every frame (the paper's trick: M never sees the same latent
    twice, so it cannot overfit to one sample per frame);
  * takes the training episodes `batch_size` at a time (one episode per batch row) and walks
    through them in chunks of `seq_len` steps: truncated BPTT, with the LSTM state carried
    (detached) from one chunk to the next so M still learns from everything before the chunk;
  * masks the padding after the shorter episodes of a batch end.

The "done" target is 1 only at the last step of an episode that *terminated* (the car left the
playfield or finished the lap); an episode cut at the step limit did not end in the world, so
its last step is 0.

Validation runs the same way on held-out episodes (split by episode seed), with fixed noise so
epochs compare, and reports:
  nll        mean negative log-likelihood of z_{t+1} per latent dimension (nats);
  nll_sum    the same summed over the Z latent dimensions (the NLL of the whole vector);
  reward_mse, done_bce.
Randomness depends only on (seed, epoch), so a resumed run is identical to an uninterrupted one.

Memory: episodes stream from disk one batch at a time (plus one prefetched batch), so RAM holds
about 2 × batch_size × T × (2Z + 5) floats, whatever the number of episodes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worldmodels.checkpoint import (
    TrainingCheckpoint,
    clear_training_outputs,
    finished_model_meta,
    save_model,
)
from worldmodels.config import Config, option, require_same_settings, save_config
from worldmodels.data import split_by_episode
from worldmodels.data.dataset import MDN_VAL_FRACTION
from worldmodels.data.latents import (
    EpisodeBatch,
    chunks,
    iterate_batches,
    latents_source,
    load_latents,
    open_latents,
)
from worldmodels.data.manifest import ManifestEntry
from worldmodels.errors import UserError
from worldmodels.layout import RunDir, writable_dir
from worldmodels.metrics import MetricsLog
from worldmodels.models import MDNRNN, mdnrnn_loss
from worldmodels.progress import log, progress_bar
from worldmodels.runtime import pick_device, seed_everything

COMMAND = "train-mdnrnn"
VAL_NOISE_KEY = 999_999  # validation noise is drawn from rng([seed, VAL_NOISE_KEY]) every epoch
LOSS_KEYS = ("loss", "nll", "nll_sum", "reward_mse", "done_bce")


@dataclass
class TrainMDNRNNConfig(Config):
    run_dir: Path = option(Path("runs/default"), "run directory; M goes to <run-dir>/mdnrnn")
    epochs: int = option(
        20, "passes over the training episodes (a rerun with more continues)", low=0
    )
    batch_size: int = option(64, "episodes per batch (one per row, walked chunk by chunk)", low=1)
    seq_len: int = option(32, "steps per chunk of truncated backpropagation through time", low=1)
    lr: float = option(1e-3, "Adam learning rate", above=0)
    grad_clip: float = option(1.0, "clip the gradient norm to this (0 = off)")
    hidden: int = option(256, "LSTM hidden units", low=1)
    n_gaussians: int = option(5, "mixture components per latent dimension", low=1)
    reward_weight: float = option(1.0, "weight of the reward MSE in the loss")
    done_weight: float = option(1.0, "weight of the done BCE in the loss")
    val_fraction: float = option(
        MDN_VAL_FRACTION, "fraction of episodes held out (by episode seed)", low=0, below=1
    )
    seed: int = option(0, "seed of the weights, the episode order and the z samples")
    device: str = option("auto", "torch device: auto (cuda if available), cpu or cuda")
    force: bool = option(False, "start over, discarding the checkpoint and the trained model")


# Settings that define the model being trained; changing them needs --force (or a new run dir).
_IDENTITY = ("hidden", "n_gaussians", "seed", "val_fraction")


# --- training ---------------------------------------------------------------------------------


class Averages:
    """Running means of the loss terms, weighted by the number of real (unmasked) steps.

    Sums stay tensors on the training device, so a GPU is not synchronised every chunk.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = dict.fromkeys(LOSS_KEYS, 0.0)
        self.count: torch.Tensor | float = 0.0

    def add(self, losses: dict[str, torch.Tensor], mask: torch.Tensor) -> None:
        weight = mask.sum()
        for key in LOSS_KEYS:
            self.sums[key] = self.sums[key] + losses[key].detach() * weight
        self.count = self.count + weight

    def means(self, prefix: str) -> dict[str, float]:
        count = max(float(self.count), 1e-8)
        return {f"{prefix}{k}": float(v) / count for k, v in self.sums.items()}


def _detach(state):
    return tuple(s.detach() for s in state)


def train_batch(
    model: MDNRNN,
    optimizer: torch.optim.Optimizer,
    batch: EpisodeBatch,
    cfg: TrainMDNRNNConfig,
    device,
    averages: Averages,
) -> int:
    """Truncated BPTT through one batch of episodes; returns the number of chunks trained."""
    model.train()
    state, n = None, 0
    for z, a, z_next, r, d, mask in chunks(batch, cfg.seq_len, device):
        out, state = model(z, a, state)
        losses = mdnrnn_loss(out, z_next, r, d, mask, cfg.reward_weight, cfg.done_weight)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        state = _detach(state)
        averages.add(losses, mask)
        n += 1
    return n


@torch.no_grad()
def evaluate(
    model: MDNRNN, folder: Path, entries: Sequence[ManifestEntry], cfg: TrainMDNRNNConfig, device
) -> dict[str, float]:
    """Held-out figures (prefixed `val_`), with the same fixed noise every epoch."""
    model.eval()
    averages = Averages()
    rng = np.random.default_rng([cfg.seed, VAL_NOISE_KEY])
    for batch in iterate_batches(folder, entries, cfg.batch_size, rng, shuffle=False):
        state = None
        for z, a, z_next, r, d, mask in chunks(batch, cfg.seq_len, device):
            out, state = model(z, a, state)
            losses = mdnrnn_loss(out, z_next, r, d, mask, cfg.reward_weight, cfg.done_weight)
            averages.add(losses, mask)
    return averages.means("val_")


def train_epoch(
    model: MDNRNN,
    optimizer: torch.optim.Optimizer,
    folder: Path,
    entries: Sequence[ManifestEntry],
    cfg: TrainMDNRNNConfig,
    epoch: int,
    device,
) -> dict[str, float]:
    """One pass over the training episodes; returns `train_*` figures and sequences/s."""
    rng = np.random.default_rng([cfg.seed, epoch])
    averages, sequences = Averages(), 0
    started = time.perf_counter()
    bar = progress_bar(len(entries), f"train-mdnrnn epoch {epoch}/{cfg.epochs}", unit="ep")
    try:
        for batch in iterate_batches(folder, entries, cfg.batch_size, rng, shuffle=True):
            trained = train_batch(model, optimizer, batch, cfg, device, averages)
            sequences += trained * len(batch.mask)  # chunks × episodes in the batch
            bar.update(len(batch.mask))
            rate = sequences / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{averages.means('')['loss']:.3f}", seq_s=f"{rate:.0f}")
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    return {**averages.means("train_"), "seq_per_s": sequences / seconds, "epoch_s": seconds}


# --- the stage --------------------------------------------------------------------------------


def _check_same_model(cfg: TrainMDNRNNConfig, config_path: Path) -> None:
    require_same_settings(
        cfg,
        config_path,
        _IDENTITY,
        "an M trained",
        "use the same setting, --force or a new --run-dir",
    )


def _stale(what: str) -> UserError:
    return UserError(
        f"the latents were re-encoded with another VAE since {what} was made: "
        "rerun `worldmodels train-mdnrnn --force`"
    )


def _trained_epochs(folder: Path, source: str) -> int:
    """Epochs of the finished M in `folder` (-1 if none); an M of older latents is an error."""
    meta = finished_model_meta(folder, COMMAND)
    if meta is None:
        return -1
    if meta.get("latents_vae_sha256", source) != source:
        raise _stale("the trained M")
    return int(meta.get("epochs", -1))


def _summary(row: dict) -> str:
    text = f"train loss {row['train_loss']:.3f}"
    if "val_nll" in row:
        text += (
            f" · val nll {row['val_nll']:.3f}/dim ({row['val_nll_sum']:.2f} summed over z)"
            f" · reward mse {row['val_reward_mse']:.4f} · done bce {row['val_done_bce']:.4f}"
        )
    return text + f" · {row['seq_per_s']:.0f} seq/s"


def run(cfg: TrainMDNRNNConfig) -> Path:
    """Train (or resume, or skip if done) M; returns the mdnrnn folder."""
    cfg.validate()
    layout = RunDir(cfg.run_dir)
    entries = open_latents(layout.latents)  # says "run encode first" when there are none
    source = latents_source(layout.latents)
    folder = writable_dir(layout.mdnrnn)
    config_path = folder / "config.json"
    if cfg.force:
        clear_training_outputs(folder)
    else:
        _check_same_model(cfg, config_path)
        if _trained_epochs(folder, source) >= cfg.epochs:
            log(f"train-mdnrnn: {folder} already holds M trained for {cfg.epochs} epochs")
            return folder
    save_config(cfg, config_path)

    train, val = split_by_episode(entries, cfg.val_fraction)
    first = load_latents(layout.latents / entries[0].file)
    arch = {
        "z_dim": int(first.mu.shape[1]),
        "action_dim": int(first.actions.shape[1]),
        "hidden": cfg.hidden,
        "n_gaussians": cfg.n_gaussians,
    }
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    model = MDNRNN(**arch).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ckpt = TrainingCheckpoint(folder / "ckpt", COMMAND)
    restored = ckpt.load(model, optimizer)
    if restored and restored.get("latents_vae_sha256", source) != source:
        raise _stale("the checkpoint")
    done_epochs = restored["epoch"] if restored else 0
    metrics = MetricsLog(folder, resume_after=done_epochs if restored else None)
    log(
        f"train-mdnrnn: {len(train)} training / {len(val)} held-out episodes, "
        + (f"resuming after epoch {done_epochs}" if restored else "starting from scratch")
    )
    if not restored and val:  # the untrained model's figures, the baseline every epoch beats
        metrics.write({"epoch": 0, **evaluate(model, layout.latents, val, cfg, device)}, step=0)

    try:
        for epoch in range(done_epochs + 1, cfg.epochs + 1):
            row = {"epoch": epoch}
            row.update(train_epoch(model, optimizer, layout.latents, train, cfg, epoch, device))
            if val:
                row.update(evaluate(model, layout.latents, val, cfg, device))
            # metrics first, checkpoint second: a kill in between redoes the epoch, and the
            # resumed MetricsLog drops its row, so the log never holds an epoch twice.
            metrics.write(row, step=epoch)
            ckpt.save(epoch, model, optimizer, {"latents_vae_sha256": source})
            log(f"train-mdnrnn: epoch {epoch}/{cfg.epochs}: {_summary(row)}")
    finally:
        metrics.close()
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise UserError("M's weights went non-finite: lower --lr or --grad-clip and use --force")
    final_epoch = max(done_epochs, cfg.epochs)
    save_model(
        folder,
        model.cpu(),
        arch,
        extra={"epochs": final_epoch, "seed": cfg.seed, "latents_vae_sha256": source},
    )
    return folder
