"""Per-epoch metrics: always `metrics.jsonl` (easy to plot and diff), TensorBoard when installed."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from worldmodels.io import atomic_write_text


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not Path(path).exists():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return rows


class MetricsLog:
    """Append-only metrics; on resume, rows past the restored step are dropped so the log never
    holds two histories."""

    def __init__(self, folder: Path, resume_after: int | None = None, key: str = "epoch"):
        self.path = Path(folder) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [
            r
            for r in read_metrics(self.path)
            if resume_after is not None and r.get(key, 0) <= resume_after
        ]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.key = key
        self._tb = _tensorboard_writer(Path(folder) / "tensorboard")

    def write(self, row: dict[str, Any], step: int) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(_rounded(row)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._to_tensorboard(row, step)

    def amend(self, step: int, fields: dict[str, Any]) -> None:
        """Add `fields` to the row of `step` already written (one row per step, so readers and
        plots never meet two): for what is measured after that row, as a final check."""
        rows = [
            {**r, **_rounded(fields)} if r.get(self.key) == step else r
            for r in read_metrics(self.path)
        ]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        self._to_tensorboard(fields, step)

    def _to_tensorboard(self, row: dict[str, Any], step: int) -> None:
        if self._tb is not None:
            for name, value in row.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(name, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _rounded(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()
    }


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional: metrics.jsonl always has everything
        return None
    return SummaryWriter(str(folder))
