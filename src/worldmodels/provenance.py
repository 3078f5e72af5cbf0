"""What vouches for a run dir's files.

Every stage, whether `run` calls it or a user does, records beside its output (`inputs.json`)
a checksum of each input it ran on. Comparing those with the files as they are now tells a
stage whose inputs changed since (`run` starts it over; the report warns) from one it may skip.
A finished stage's output is checked too before it is skipped: damage found there makes the
stage run again and heal it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from worldmodels.checkpoint import model_is_intact
from worldmodels.data.manifest import read_manifest, validate_entries
from worldmodels.io import atomic_write_text


def vouches(path: Path) -> bytes:
    """What a file says about the data, not its bytes: a manifest's (index, sha256) pairs in
    index order (collect rewrites it sorted), a model.json's weights checksum."""
    if not path.exists():
        return b"-"
    text = path.read_text()
    try:
        if path.name.endswith(".jsonl"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            return json.dumps(sorted((r["index"], r["sha256"]) for r in rows)).encode()
        return str(json.loads(text)["sha256"]).encode()
    except (ValueError, KeyError, TypeError):
        return text.encode()


RECORD = "inputs.json"  # beside a stage's output: {command: {input file: checksum}}


def input_sums(root: Path, files: tuple[str, ...] | list[str]) -> dict[str, str]:
    """The sha256 of what vouches for each input, by its path relative to the run dir."""
    return {name: hashlib.sha256(vouches(root / name)).hexdigest() for name in files}


def _records(folder: Path) -> dict[str, dict[str, str]]:
    try:
        records = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def record_inputs(root: Path, output: str, command: str, sums: dict[str, str]) -> None:
    """Write what `command` ran on beside its output (one file holds every stage writing there)."""
    folder = (root / output).parent
    records = {**_records(folder), command: sums}
    atomic_write_text(folder / RECORD, json.dumps(records, indent=2, sort_keys=True) + "\n")


def changed_inputs(root: Path, output: str, command: str) -> list[str] | None:
    """The inputs of `command` that changed since it wrote `output`; None without a record
    (a run dir from before records were kept, or a stage never finished)."""
    recorded = _records((root / output).parent).get(command)
    return _changed(root, recorded) if isinstance(recorded, dict) else None


def _changed(root: Path, recorded: dict[str, str]) -> list[str]:
    now = input_sums(root, list(recorded))
    return [name for name in recorded if recorded[name] != now[name]]


def stale_stages(root: Path) -> dict[str, list[str]]:
    """Every stage in the run dir whose recorded inputs changed since it ran, with those inputs:
    its output no longer follows from the files upstream of it."""
    stale = {}
    for path in sorted(root.glob(f"**/{RECORD}")):
        for command, recorded in _records(path.parent).items():
            changed = _changed(root, recorded) if isinstance(recorded, dict) else []
            if changed:
                stale[command] = changed
    return stale


def output_problem(path: Path) -> str | None:
    """What is wrong with a finished stage's output, or None: a manifest's files must all match
    their checksums and a model.json its weights, so a skipped stage never hands on damage."""
    if not path.exists():
        return f"{path.name} is missing"
    if path.name == "manifest.jsonl":
        entries = read_manifest(path.parent)
        if not entries:
            return f"{path} lists nothing"
        _, problems = validate_entries(path.parent, entries)
        return problems[0] if problems else None
    if path.name == "model.json" and not model_is_intact(path.parent):
        return f"{path.parent.name}'s weights do not match their checksum"
    return None
