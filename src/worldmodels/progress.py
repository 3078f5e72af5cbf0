"""Progress bars that stay quiet when nobody is watching (CI, tests, pipes)."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress_enabled() -> bool:
    if os.environ.get("WORLDMODELS_PROGRESS") is not None:
        return os.environ["WORLDMODELS_PROGRESS"] not in ("0", "false", "")
    return sys.stderr.isatty()


def progress_bar(total: float | None, desc: str, unit: str = "it", **kwargs) -> tqdm:
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=True,
        dynamic_ncols=True,
        disable=not progress_enabled(),
        **kwargs,
    )


def log(message: str) -> None:
    """One status line on stderr, printed above any progress bar."""
    tqdm.write(message, file=sys.stderr)
