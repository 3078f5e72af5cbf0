"""The manifest: one JSON line per finished episode, appended after its file is safely on disk.

A file is data only if its manifest line exists and its checksum matches, so a kill at any moment
leaves either a complete episode or something that is detected and collected again.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from worldmodels.data.episodes import sha256_file
from worldmodels.io import atomic_write_text

MANIFEST_NAME = "manifest.jsonl"


@dataclass(frozen=True)
class ManifestEntry:
    index: int
    file: str
    seed: int
    steps: int
    total_reward: float
    terminated: bool
    truncated: bool
    sha256: str


def episode_file_name(index: int) -> str:
    return f"episode_{index:06d}.npz"


def read_manifest(folder: Path) -> list[ManifestEntry]:
    """Entries by index (the last line wins); a half-written last line is skipped."""
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        return []
    entries: dict[int, ManifestEntry] = {}
    for line in path.read_text().splitlines():
        try:
            entry = ManifestEntry(**json.loads(line))
        except (json.JSONDecodeError, TypeError):
            continue
        entries[entry.index] = entry
    return [entries[i] for i in sorted(entries)]


def append_manifest(folder: Path, entry: ManifestEntry) -> None:
    path = Path(folder) / MANIFEST_NAME
    with open(path, "a") as handle:
        handle.write(json.dumps(asdict(entry)) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def rewrite_manifest(folder: Path, entries: list[ManifestEntry]) -> None:
    text = "".join(json.dumps(asdict(e)) + "\n" for e in sorted(entries, key=lambda e: e.index))
    atomic_write_text(Path(folder) / MANIFEST_NAME, text)


def validate_entries(
    folder: Path, entries: list[ManifestEntry]
) -> tuple[list[ManifestEntry], list[str]]:
    """Split entries into those whose file exists with the right checksum, and problem lines."""
    valid, problems = [], []
    for entry in entries:
        path = Path(folder) / entry.file
        if not path.exists():
            problems.append(f"{entry.file}: listed in the manifest but missing")
        elif sha256_file(path) != entry.sha256:
            problems.append(f"{entry.file}: checksum mismatch (truncated or corrupt)")
        else:
            valid.append(entry)
    return valid, problems
