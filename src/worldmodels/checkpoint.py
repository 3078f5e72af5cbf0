"""Model files and resumable training checkpoints.

A finished model is `<folder>/model.safetensors` + `<folder>/model.json` (architecture kwargs and
the weights' checksum), so any model rebuilds from its folder with no flags. Training state is
written as epoch-numbered files first and a small pointer (`checkpoint.json`) last, atomically:
a `kill -9` at any moment leaves the pointer naming a complete, verified set. The epoch before
it stays on disk as a fallback, so one damaged file costs an epoch, not the run.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from worldmodels.errors import MissingStageError, UserError
from worldmodels.io import atomic_write_bytes, atomic_write_text
from worldmodels.progress import log

MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
POINTER = "checkpoint.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _weights_bytes(model: nn.Module) -> bytes:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return st_save(state)


def save_model(
    folder: Path, model: nn.Module, arch: dict[str, Any], extra: dict | None = None
) -> None:
    """Write the weights, then the metadata that vouches for them (checksum last)."""
    data = _weights_bytes(model)
    atomic_write_bytes(Path(folder) / MODEL_WEIGHTS, data)
    meta = {"arch": arch, "sha256": _sha256(data), **(extra or {})}
    atomic_write_text(Path(folder) / MODEL_META, json.dumps(meta, indent=2) + "\n")


def read_model_meta(folder: Path, command: str) -> dict[str, Any]:
    meta_path = Path(folder) / MODEL_META
    if not meta_path.exists() or not (Path(folder) / MODEL_WEIGHTS).exists():
        raise MissingStageError(f"model in {folder}", command)
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(
            f"{meta_path} is corrupt ({err}): rerun `worldmodels {command}`; it writes the "
            "model again from its training checkpoint"
        ) from None


def model_is_intact(folder: Path) -> bool:
    """Whether the finished model in `folder` exists, its metadata reads and its weights match
    their checksum: a training stage that finds it damaged writes it again from its checkpoint."""
    try:
        meta = json.loads((Path(folder) / MODEL_META).read_text())
        return _sha256((Path(folder) / MODEL_WEIGHTS).read_bytes()) == meta.get("sha256")
    except (OSError, ValueError, AttributeError):
        return False


def finished_model_meta(folder: Path, command: str) -> dict[str, Any] | None:
    """The finished model's metadata, or None when there is none or it is damaged (then the
    stage writes it again from its training checkpoint, and says so)."""
    if not (Path(folder) / MODEL_META).exists():
        return None
    if not model_is_intact(folder):
        log(f"{command}: the model in {folder} is damaged: writing it again from the checkpoint")
        return None
    return read_model_meta(folder, command)


def load_model(folder: Path, build: Callable[..., nn.Module], command: str) -> nn.Module:
    """Rebuild a model with `build(**arch)` and load its verified weights (on the CPU)."""
    meta = read_model_meta(folder, command)
    data = (Path(folder) / MODEL_WEIGHTS).read_bytes()
    if _sha256(data) != meta.get("sha256"):
        raise UserError(
            f"{Path(folder) / MODEL_WEIGHTS} is corrupt (checksum mismatch): rerun "
            f"`worldmodels {command}`; it writes the model again from its training checkpoint"
        )
    model = build(**meta["arch"])
    model.load_state_dict(st_load(data))
    return model


class TrainingCheckpoint:
    """Epoch checkpoints of model + optimizer + loop state in one folder, resumable after a kill."""

    def __init__(self, folder: Path, command: str):
        self.folder = Path(folder)
        self.command = command

    def save(
        self, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict
    ) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        weights = _weights_bytes(model)
        buffer = io.BytesIO()
        torch.save({"optimizer": optimizer.state_dict(), "state": state}, buffer)
        train_state = buffer.getvalue()
        names = {
            "weights": f"epoch_{epoch:04d}.safetensors",
            "train_state": f"epoch_{epoch:04d}.pt",
        }
        atomic_write_bytes(self.folder / names["weights"], weights)
        atomic_write_bytes(self.folder / names["train_state"], train_state)
        old = self._pointer()
        # the fallback if this epoch's files get damaged: the epoch before (when this epoch is
        # being redone after such damage, the fallback the damaged one had)
        fallback = old if old.get("epoch", epoch) != epoch else old.get("previous") or {}
        pointer = {
            "epoch": epoch,
            "files": names,
            "sha256": {"weights": _sha256(weights), "train_state": _sha256(train_state)},
        }
        if fallback:
            pointer["previous"] = {k: v for k, v in fallback.items() if k != "previous"}
        atomic_write_text(self.folder / POINTER, json.dumps(pointer, indent=2) + "\n")
        keep = {*names.values(), *pointer.get("previous", {}).get("files", {}).values()}
        for old in self.folder.glob("epoch_*"):
            if old.name not in keep:
                old.unlink(missing_ok=True)

    def _pointer(self) -> dict:
        try:
            return json.loads((self.folder / POINTER).read_text())
        except (OSError, ValueError):
            return {}

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict | None:
        """Restore the last intact epoch into `model` (and `optimizer`); None if there is none.

        A damaged last epoch falls back to the one before it (that epoch is trained again)."""
        if not (self.folder / POINTER).exists():
            return None
        pointer = self._pointer()
        tried = []
        for candidate in (pointer, pointer.get("previous")):
            if not candidate:
                continue
            files = self._verified(candidate)
            if files is None:
                tried.append(f"epoch {candidate.get('epoch', '?')}")
                continue
            if tried:
                log(
                    f"{self.command}: {', '.join(tried)} damaged; resuming from epoch "
                    f"{candidate['epoch']} instead"
                )
            weights, train_state = files
            return self._restore(candidate, weights, train_state, model, optimizer)
        raise self._corrupt(f"{' and '.join(tried) or 'the pointer'} unreadable or damaged")

    def _verified(self, pointer: dict) -> tuple[bytes, bytes] | None:
        try:
            weights = (self.folder / pointer["files"]["weights"]).read_bytes()
            train_state = (self.folder / pointer["files"]["train_state"]).read_bytes()
            sums = pointer["sha256"]
        except (OSError, KeyError, TypeError):
            return None
        if _sha256(weights) != sums["weights"] or _sha256(train_state) != sums["train_state"]:
            return None
        return weights, train_state

    def _restore(self, pointer, weights, train_state, model, optimizer) -> dict:
        model.load_state_dict(st_load(weights))
        saved = torch.load(io.BytesIO(train_state), map_location="cpu", weights_only=True)
        if optimizer is not None:
            optimizer.load_state_dict(saved["optimizer"])
        return {"epoch": pointer["epoch"], **saved["state"]}

    def _corrupt(self, why: str) -> UserError:
        return UserError(
            f"training checkpoint in {self.folder} is corrupt ({why}): "
            f"rerun `worldmodels {self.command} --force` to start over"
        )


def clear_training_outputs(folder: Path) -> None:
    """Forget every previous attempt of a training stage (for --force or a fresh start)."""
    folder = Path(folder)
    shutil.rmtree(folder / "ckpt", ignore_errors=True)
    shutil.rmtree(folder / "tensorboard", ignore_errors=True)
    for name in (MODEL_WEIGHTS, MODEL_META, "metrics.jsonl"):
        (folder / name).unlink(missing_ok=True)
