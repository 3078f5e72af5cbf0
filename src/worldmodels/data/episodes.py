"""The episode file: one compressed `.npz` per finished episode, and its validation.

Schema (DESIGN.md): `obs` uint8 (T+1,64,64,3) · `actions` float32 (T,3) · `rewards` float32 (T,)
· `terminated` bool · `truncated` bool · `seed` int · `env` str · `crop` bool. Obs has T+1 frames:
the frame each action was taken in, plus the frame the last action led to.
"""

from __future__ import annotations

import hashlib
import io
import typing
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from worldmodels.io import atomic_write_bytes

T = TypeVar("T")


class InvalidEpisode(ValueError):
    """An episode file that must not be used as data (truncated, corrupt, wrong shapes)."""


@dataclass
class Episode:
    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: bool
    truncated: bool
    seed: int
    env: str
    crop: bool = True

    @property
    def steps(self) -> int:
        return len(self.actions)

    @property
    def total_reward(self) -> float:
        return float(self.rewards.sum())


def check_episode(ep: Episode) -> None:
    """Raise `InvalidEpisode` unless every array has the schema's dtype and matching lengths."""
    steps = len(ep.actions)
    problems = []
    if ep.obs.dtype != np.uint8 or ep.obs.ndim != 4 or ep.obs.shape[1:] != (64, 64, 3):
        problems.append(f"obs {ep.obs.dtype}{ep.obs.shape} is not uint8 (T+1,64,64,3)")
    if ep.actions.dtype != np.float32 or ep.actions.shape != (steps, 3):
        problems.append(f"actions {ep.actions.dtype}{ep.actions.shape} is not float32 (T,3)")
    if ep.rewards.dtype != np.float32 or ep.rewards.shape != (steps,):
        problems.append(f"rewards {ep.rewards.dtype}{ep.rewards.shape} is not float32 (T,)")
    if len(ep.obs) != steps + 1:
        problems.append(f"obs has {len(ep.obs)} frames for {steps} actions (want T+1)")
    if steps == 0:
        problems.append("episode has no steps")
    if problems:
        raise InvalidEpisode("; ".join(problems))


def encode_episode(ep: Episode, compress_level: int = 1) -> bytes:
    """Serialize to npz bytes. Level 1 deflate: several times smaller than raw, and cheap."""
    check_episode(ep)
    buffer = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress_level > 0 else zipfile.ZIP_STORED
    arrays = {
        "obs": ep.obs,
        "actions": ep.actions,
        "rewards": ep.rewards,
        "terminated": np.bool_(ep.terminated),
        "truncated": np.bool_(ep.truncated),
        "seed": np.int64(ep.seed),
        "env": np.str_(ep.env),
        "crop": np.bool_(ep.crop),
    }
    level = compress_level if compress_level > 0 else None
    with zipfile.ZipFile(buffer, "w", compression=method, compresslevel=level) as archive:
        for name, array in arrays.items():
            with archive.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_episode(path: Path, ep: Episode, compress_level: int = 1) -> str:
    """Write atomically; return the file's sha256 for the manifest."""
    data = encode_episode(ep, compress_level)
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def read_record(path: Path, cls: type[T]) -> T:
    """A dataclass from the .npz of its fields, never unpickled (a shared file must not run
    code): 0-d arrays become Python scalars; a field an older file lacks keeps its default."""
    scalar = {name: kind is not np.ndarray for name, kind in typing.get_type_hints(cls).items()}
    with np.load(path, allow_pickle=False) as data:
        values = {k: data[k] for k in data.files if k in scalar}
    return cls(**{k: v.item() if scalar[k] and v.ndim == 0 else v for k, v in values.items()})


def load_episode(path: Path) -> Episode:
    """Load and check one episode; any defect is an `InvalidEpisode`, never a crash later."""
    try:
        ep = read_record(path, Episode)
    except Exception as err:  # zipfile.BadZipFile, KeyError, EOFError, ValueError, OSError...
        raise InvalidEpisode(f"unreadable ({type(err).__name__}: {err})") from None
    check_episode(ep)
    return ep
