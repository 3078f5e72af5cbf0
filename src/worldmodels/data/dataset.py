"""Streaming access to collected episodes: bounded memory, shuffled across episodes.

The whole data set never sits in RAM (one reference implementation needed 125 GB). Frames are
read a few episodes at a time into a shuffle buffer; a background thread decompresses the next
episodes while the model trains on the current ones (zlib releases the GIL).
"""

from __future__ import annotations

import json
import queue
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from worldmodels.data.episodes import Episode, load_episode
from worldmodels.data.manifest import ManifestEntry, read_manifest, validate_entries
from worldmodels.errors import MissingStageError, UserError

T = TypeVar("T")
VAE_VAL_FRACTION = 0.1  # the default share of episodes train-vae holds out
MDN_VAL_FRACTION = 0.05  # and train-mdnrnn


def open_episodes(folder: Path, command: str = "collect") -> list[ManifestEntry]:
    """The valid episodes of a data folder; a missing or empty one says which command to run."""
    entries = read_manifest(folder)
    if not entries:
        raise MissingStageError(f"collected episodes in {folder}", command)
    valid, problems = validate_entries(folder, entries)
    if problems:
        raise UserError(
            f"{len(problems)} invalid episode file(s) in {folder} (first: {problems[0]}): "
            f"rerun `worldmodels {command}` to re-collect them"
        )
    return valid


def is_validation(entry: ManifestEntry, val_fraction: float) -> bool:
    """Held out by episode, from its seed alone: the split never moves as more data arrives."""
    bucket = zlib.crc32(str(entry.seed).encode()) % 10_000
    return bucket < val_fraction * 10_000


def saved_val_fraction(config_path: Path, default: float) -> float:
    """The held-out share a training stage saved in its config.json, so a later stage shows
    exactly the episodes that stage never trained on (its default when there is no config)."""
    try:
        return float(json.loads(Path(config_path).read_text()).get("val_fraction", default))
    except (OSError, ValueError, AttributeError):
        return default


def split_by_episode(
    entries: Sequence[ManifestEntry], val_fraction: float
) -> tuple[list[ManifestEntry], list[ManifestEntry]]:
    train = [e for e in entries if not is_validation(e, val_fraction)]
    val = [e for e in entries if is_validation(e, val_fraction)]
    if val_fraction > 0 and not val and len(train) > 1:
        val = [train.pop()]  # tiny data sets still get one held-out episode
    if not train:
        raise UserError("no training episodes left after the held-out split: collect more episodes")
    return train, val


def prefetch(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Run an iterator in a background thread, `depth` items ahead."""
    box: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                box.put(item)
            box.put(done)
        except BaseException as err:  # surface loader errors in the consumer
            box.put(err)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = box.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                box.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def load_in_order(
    folder: Path, entries: Sequence[ManifestEntry], loader: Callable[[Path], T] = load_episode
) -> Iterator[T]:
    for entry in entries:
        yield loader(Path(folder) / entry.file)


def iterate_frame_batches(
    folder: Path,
    entries: Sequence[ManifestEntry],
    batch_size: int,
    rng: np.random.Generator | None = None,
    buffer_episodes: int = 8,
    drop_last: bool = False,
) -> Iterator[np.ndarray]:
    """Yield uint8 (B,64,64,3) batches; with `rng`, episodes and frames are shuffled.

    Memory holds at most `buffer_episodes` (+ the prefetched ones) episodes' frames at a time.
    """
    order = list(entries)
    if rng is not None:
        order = [order[i] for i in rng.permutation(len(order))]
    episodes = prefetch(load_in_order(folder, order, _load_frames), depth=buffer_episodes)
    carry = np.zeros((0, 64, 64, 3), np.uint8)
    buffer: list[np.ndarray] = []
    for frames in episodes:
        buffer.append(frames)
        if len(buffer) < buffer_episodes:
            continue
        carry = yield from _emit(np.concatenate([carry, *buffer]), batch_size, rng)
        buffer = []
    pool = np.concatenate([carry, *buffer])
    rest = yield from _emit(pool, batch_size, rng)
    if len(rest) and not drop_last:
        yield rest


def _load_frames(path: Path) -> np.ndarray:
    return load_episode(path).obs


def _emit(pool: np.ndarray, batch_size: int, rng: np.random.Generator | None):
    """Yield full batches from `pool` (shuffled if rng) and return the leftover frames."""
    if rng is not None:
        pool = pool[rng.permutation(len(pool))]
    full = len(pool) // batch_size * batch_size
    for start in range(0, full, batch_size):
        yield pool[start : start + batch_size]
    return pool[full:]


def count_frames(entries: Sequence[ManifestEntry]) -> int:
    return sum(e.steps + 1 for e in entries)


def iterate_episodes(folder: Path, entries: Sequence[ManifestEntry]) -> Iterator[Episode]:
    """Episodes in manifest order, loaded one ahead in the background."""
    return prefetch(load_in_order(folder, entries), depth=1)


def first_frames(folder: Path, entries: list[ManifestEntry], n: int) -> np.ndarray:
    """`n` real frames (repeated if the data set is smaller) for the speed measurement."""
    frames = []
    for entry in entries:
        frames.append(load_episode(folder / entry.file).obs)
        if sum(len(f) for f in frames) >= n:
            break
    return np.resize(np.concatenate(frames), (n, 64, 64, 3))


def take_frames(batches: Iterable[np.ndarray], limit: int) -> Iterator[np.ndarray]:
    """Yield batches until `limit` frames (0 = no limit), trimming the last one to fit."""
    seen = 0
    for batch in batches:
        if limit:
            batch = batch[: limit - seen]
        if len(batch) == 0:
            return
        seen += len(batch)
        yield batch
