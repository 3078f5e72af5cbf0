"""Model files and resumable training checkpoints.

A finished model is `<folder>/model.safetensors` + `<folder>/model.json` (architecture kwargs and
the weights' checksum), so any model rebuilds from its folder with no flags. Training state is
written as epoch-numbered files first and a small pointer (`checkpoint.json`) last, atomically:
a `kill -9` at any moment leaves the pointer naming a complete, verified set.
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
            f"{meta_path} is corrupt ({err}): rerun `worldmodels {command} --force`"
        ) from None


def load_model(folder: Path, build: Callable[..., nn.Module], command: str) -> nn.Module:
    """Rebuild a model with `build(**arch)` and load its verified weights (on the CPU)."""
    meta = read_model_meta(folder, command)
    data = (Path(folder) / MODEL_WEIGHTS).read_bytes()
    if _sha256(data) != meta.get("sha256"):
        raise UserError(
            f"{Path(folder) / MODEL_WEIGHTS} is corrupt (checksum mismatch): "
            f"rerun `worldmodels {command} --force`"
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
        pointer = {
            "epoch": epoch,
            "files": names,
            "sha256": {"weights": _sha256(weights), "train_state": _sha256(train_state)},
        }
        atomic_write_text(self.folder / POINTER, json.dumps(pointer, indent=2) + "\n")
        for old in self.folder.glob("epoch_*"):
            if old.name not in names.values():
                old.unlink(missing_ok=True)

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict | None:
        """Restore the last epoch into `model` (and `optimizer`); None if there is none."""
        pointer_path = self.folder / POINTER
        if not pointer_path.exists():
            return None
        try:
            pointer = json.loads(pointer_path.read_text())
            weights = (self.folder / pointer["files"]["weights"]).read_bytes()
            train_state = (self.folder / pointer["files"]["train_state"]).read_bytes()
        except (OSError, json.JSONDecodeError, KeyError) as err:
            raise self._corrupt(f"unreadable ({type(err).__name__})") from None
        if (
            _sha256(weights) != pointer["sha256"]["weights"]
            or _sha256(train_state) != pointer["sha256"]["train_state"]
        ):
            raise self._corrupt("checksum mismatch")
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
