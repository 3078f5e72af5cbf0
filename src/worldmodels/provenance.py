"""What vouches for a run dir's files: the checksums `run` compares to tell a stage whose
inputs changed (it starts over) from one it may skip, and the check of a finished stage's
output before it is skipped (damage found there makes the stage run again and heal it)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from worldmodels.checkpoint import model_is_intact
from worldmodels.data.manifest import read_manifest, validate_entries


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


def fingerprint(root: Path, files: tuple[str, ...]) -> str:
    """One sha256 over what vouches for a stage's inputs ("" for a stage with none)."""
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + b"\0" + vouches(root / name))
    return digest.hexdigest() if files else ""


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
