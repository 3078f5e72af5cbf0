"""`worldmodels train-vae`: fit V, the conv VAE, on the collected frames.

Frames stream from the episode files (bounded memory, shuffled across episodes); whole episodes
are held out for validation. Every epoch writes a checkpoint (model + optimizer + the best
weights so far), so a rerun after a kill resumes at the last finished epoch and never starts
over; the final model is the epoch with the lowest validation SSE.

Speed options (precision, memory layout, compilation) are chosen by measurement on the machine
it runs on: see `worldmodels.vae_speed`. Validation runs in fp32, so the reported figures do not
depend on them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worldmodels.checkpoint import (
    MODEL_META,
    MODEL_WEIGHTS,
    TrainingCheckpoint,
    clear_training_outputs,
    finished_model_meta,
    save_model,
)
from worldmodels.config import Config, option, require_same_settings, save_config
from worldmodels.data import (
    count_frames,
    iterate_frame_batches,
    open_episodes,
    split_by_episode,
)
from worldmodels.data.dataset import VAE_VAL_FRACTION, first_frames, take_frames
from worldmodels.errors import UserError
from worldmodels.layout import RunDir, writable_dir
from worldmodels.metrics import MetricsLog
from worldmodels.models import ConvVAE, vae_loss
from worldmodels.progress import log, progress_bar
from worldmodels.runtime import pick_device
from worldmodels.vae_speed import Speed, choose_speed, prepare_model, to_input, train_step

COMMAND = "train-vae"


@dataclass
class TrainVAEConfig(Config):
    run_dir: Path = option(Path("runs/default"), "run directory; the VAE goes to <run-dir>/vae")
    epochs: int = option(10, "passes over the training frames", low=1)
    batch_size: int = option(100, "frames per optimisation step (the paper uses 100)", low=1)
    lr: float = option(1e-3, "Adam learning rate", above=0)
    free_bits: float = option(0.5, "KL floor in nats per latent dim (the paper uses 0.5)", low=0)
    z_dim: int = option(32, "latent size", low=1)
    channels: tuple[int, ...] = option((32, 64, 128, 256), "encoder channels, 4 comma-separated")
    val_fraction: float = option(
        VAE_VAL_FRACTION, "share of episodes held out for validation", low=0, below=1
    )
    buffer_episodes: int = option(8, "episodes mixed in the shuffle buffer (bounds memory)", low=1)
    max_train_frames: int = option(0, "training frames per epoch, a random subset (0 = all)", low=0)
    max_val_frames: int = option(
        0, "validation frames per epoch, always the same ones (0 = all)", low=0
    )
    patience: int = option(
        0, "stop after this many epochs without a better val SSE (0 = off)", low=0
    )
    time_budget_min: float = option(
        0.0,
        "minutes for all the training passes: each epoch's pass stops when its share "
        "(budget / epochs) is used, so a slow CPU trains on fewer frames instead of taking "
        "longer (0 = no limit; validation not counted)",
        low=0,
    )
    seed: int = option(0, "seed for weights, shuffling and the reparameterisation noise")
    device: str = option("auto", "where to train (auto = cuda if present)", ("auto", "cpu", "cuda"))
    precision: str = option(
        "auto", "training precision (auto = bf16 if measured faster)", ("auto", "fp32", "bf16")
    )
    channels_last: str = option(
        "auto", "channels_last memory layout (auto = if measured faster)", ("auto", "on", "off")
    )
    compile: bool = option(False, "torch.compile the model (costs tens of seconds up front)")
    force: bool = option(False, "discard the checkpoint and any finished model, start over")

    def check(self) -> None:
        if len(self.channels) != 4 or min(self.channels) < 1:
            raise UserError(f"--channels needs 4 positive sizes, got {self.channels}")


# Settings that define what a checkpoint *is*; the rest (epochs, lr, speed) may change on resume.
_IDENTITY = ("z_dim", "channels", "val_fraction")


# ---------------------------------------------------------------------------------------------
# Training


def train_epoch(
    model: ConvVAE,
    forward: Callable,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[np.ndarray],
    total: int,
    cfg: TrainVAEConfig,
    device: torch.device,
    speed: Speed,
    desc: str,
    limit_s: float = 0.0,
) -> dict[str, float]:
    """One pass over the training batches, cut short after `limit_s` seconds (0 = never);
    returns frame-weighted means and img/s."""
    model.train()
    sums = {k: torch.zeros((), device=device) for k in ("loss", "sse", "mse", "kl")}
    frames = 0
    start = time.perf_counter()
    with progress_bar(total, desc, unit="img") as bar:
        for step, batch in enumerate(batches):
            out = train_step(
                forward, optimizer, to_input(batch, device, speed), cfg.free_bits, device, speed
            )
            for key in sums:
                sums[key] += out[key] * len(batch)
            frames += len(batch)
            bar.update(len(batch))
            if step % 20 == 0:
                bar.set_postfix(sse=f"{out['sse'].item():.1f}", kl=f"{out['kl'].item():.1f}")
            if limit_s and time.perf_counter() - start >= limit_s:
                break
    seconds = time.perf_counter() - start
    means = {f"train_{k}": (v / max(frames, 1)).item() for k, v in sums.items()}
    return {**means, "train_frames": frames, "img_per_s": frames / max(seconds, 1e-9)}


@torch.no_grad()
def evaluate(
    model: ConvVAE,
    batches: Iterable[np.ndarray],
    device: torch.device,
    speed: Speed,
    free_bits: float,
) -> dict[str, float]:
    """Held-out figures in fp32 on the posterior mean (deterministic, comparable across runs)."""
    model.eval()
    sums: dict[str, float] = {"loss": 0.0, "sse": 0.0, "mse": 0.0, "kl": 0.0}
    frames = 0
    for batch in batches:
        x = to_input(batch, device, speed)
        x_hat, mu, logvar = model(x)
        out = vae_loss(x, x_hat, mu, logvar, free_bits)
        for key in sums:
            sums[key] += out[key].item() * len(batch)
        frames += len(batch)
    model.train()
    if frames == 0:
        return {}
    return {f"val_{k}": v / frames for k, v in sums.items()} | {"val_frames": frames}


def _check_same_identity(cfg: TrainVAEConfig, out: Path) -> None:
    """Refuse to resume (or skip to) a VAE whose architecture or held-out split differ."""
    config_path = out / "config.json"
    started = (out / "ckpt" / "checkpoint.json").exists() or (out / MODEL_META).exists()
    if not (started and config_path.exists()):
        return
    require_same_settings(
        cfg,
        config_path,
        _IDENTITY,
        "a VAE trained",
        "use the same setting, --force, or a new --run-dir",
    )


def _finished(out: Path, cfg: TrainVAEConfig) -> dict | None:
    """The finished model's metadata if it already covers the requested epochs."""
    meta = finished_model_meta(out, COMMAND)
    return meta if meta and meta.get("epochs_requested", 0) >= cfg.epochs else None


def _cpu_state(model: ConvVAE) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def run(cfg: TrainVAEConfig) -> Path:
    """Train (or resume, or skip if finished); return the `<run>/vae` folder."""
    cfg.validate()
    layout = RunDir(cfg.run_dir)
    entries = open_episodes(layout.episodes)
    out = writable_dir(layout.vae)
    if cfg.force:
        clear_training_outputs(out)
    else:
        _check_same_identity(cfg, out)
        if meta := _finished(out, cfg):
            log(
                f"{COMMAND}: {out} already holds a VAE trained {meta['epochs']} epochs "
                f"(val SSE {meta.get('val_sse', float('nan')):.1f}); nothing to do "
                "(--force retrains)"
            )
            return out
    save_config(cfg, out / "config.json")

    train_entries, val_entries = split_by_episode(entries, cfg.val_fraction)
    device = pick_device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available")
    torch.manual_seed(cfg.seed)
    model = ConvVAE(cfg.z_dim, cfg.channels)
    sample = first_frames(layout.episodes, train_entries, cfg.batch_size)
    speed, _ = choose_speed(cfg, model, sample, device)
    model, forward = prepare_model(model, device, speed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    checkpoint = TrainingCheckpoint(out / "ckpt", COMMAND)
    state = checkpoint.load(model, optimizer)
    if state is None:
        clear_training_outputs(out)
        state = {"epoch": 0, "best_epoch": 0, "best_score": float("inf"), "bad_epochs": 0}
        state |= {"best_state": _cpu_state(model), "best_row": {}}
    else:
        log(f"{COMMAND}: resuming after epoch {state['epoch']} from {checkpoint.folder}")
    for group in optimizer.param_groups:  # a changed --lr applies from the resumed epoch on
        group["lr"] = cfg.lr
    metrics = MetricsLog(out, resume_after=state["epoch"])

    epoch_frames = count_frames(train_entries)
    if cfg.max_train_frames:
        epoch_frames = min(epoch_frames, cfg.max_train_frames)
    log(
        f"{COMMAND}: {len(train_entries)} training episodes ({epoch_frames} frames an epoch), "
        f"{len(val_entries)} held out; {device.type}, {speed.name}, batch {cfg.batch_size}"
    )
    early_stopped = False
    try:
        for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
            if cfg.patience and state["bad_epochs"] >= cfg.patience:
                early_stopped = True
                log(f"{COMMAND}: no better val SSE in {cfg.patience} epochs, stopping early")
                break
            started = time.perf_counter()
            # Seeded by (seed, epoch): a resumed epoch sees the data order and noise it would
            # have seen without the interruption.
            torch.manual_seed(cfg.seed * 100_003 + epoch)
            rng = np.random.default_rng([cfg.seed, epoch])
            train = iterate_frame_batches(
                layout.episodes, train_entries, cfg.batch_size, rng, cfg.buffer_episodes
            )
            row = {"epoch": epoch} | train_epoch(
                model, forward, optimizer, take_frames(train, cfg.max_train_frames), epoch_frames,
                cfg, device, speed, desc=f"{COMMAND} {epoch}/{cfg.epochs}",
                limit_s=cfg.time_budget_min * 60 / cfg.epochs,
            )  # fmt: skip
            train.close()  # a pass cut short leaves its reader's buffered episodes behind
            if cfg.time_budget_min and row["train_frames"] < epoch_frames:
                log(
                    f"{COMMAND}: epoch {epoch} used its share of --time-budget-min "
                    f"{cfg.time_budget_min:g} after {row['train_frames']} of {epoch_frames} frames"
                )
            val = iterate_frame_batches(layout.episodes, val_entries, cfg.batch_size, None, 1)
            row |= evaluate(
                model, take_frames(val, cfg.max_val_frames), device, speed, cfg.free_bits
            )
            row |= {"seconds": time.perf_counter() - started, "speed": speed.name}
            state = _update_best(state, row, model)
            metrics.write(row, step=epoch)  # before the checkpoint: a kill between the two
            checkpoint.save(epoch, model, optimizer, state)  # re-runs this epoch, dropping the row
            log(
                f"{COMMAND}: epoch {epoch}: train SSE {row['train_sse']:.1f}, "
                f"val SSE {row.get('val_sse', float('nan')):.1f}, KL {row['train_kl']:.1f}, "
                f"{row['img_per_s']:.0f} img/s"
            )
    finally:
        metrics.close()
    return _finish(out, state, cfg, early_stopped, speed)


def _update_best(state: dict, row: dict, model: ConvVAE) -> dict:
    """Loop state after an epoch: the best weights so far and the epochs since they improved.

    With no held-out episodes (--val-fraction 0) the last epoch counts as the best.
    """
    state = {**state, "epoch": row["epoch"]}
    score = row.get("val_sse")
    if score is None or score < state["best_score"]:
        keys = ("val_sse", "val_mse", "val_kl", "train_sse", "train_mse", "train_kl")
        best_row = {k: float(row[k]) for k in keys if k in row}
        state |= {"best_epoch": row["epoch"], "best_score": score or 0.0, "bad_epochs": 0}
        state |= {"best_state": _cpu_state(model), "best_row": best_row}
    else:
        state["bad_epochs"] += 1
    return state


def _finish(out: Path, state: dict, cfg: TrainVAEConfig, early_stopped: bool, speed: Speed) -> Path:
    """Write the best-on-validation weights as the stage's model."""
    final = ConvVAE(cfg.z_dim, cfg.channels)
    final.load_state_dict(state["best_state"])
    extra = {
        **state["best_row"],
        "best_epoch": state["best_epoch"],
        "epochs": state["epoch"],
        "epochs_requested": cfg.epochs,
        "early_stopped": early_stopped,
        "speed": speed.name,
        "seed": cfg.seed,
    }
    save_model(out, final, {"z_dim": cfg.z_dim, "channels": list(cfg.channels)}, extra)
    log(
        f"{COMMAND}: wrote {out / MODEL_WEIGHTS} (epoch {state['best_epoch']}, "
        f"val SSE {extra.get('val_sse', float('nan')):.1f})"
    )
    return out
