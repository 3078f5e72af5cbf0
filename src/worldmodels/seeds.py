"""Every range of track seeds the project uses, in one place, so no two uses share a track.

A track is drawn from its seed, so a seed used for training and again for evaluation would score
an agent on a track it trained on. Each use owns a half-open range; a stage that derives seeds
asks `require_within` before it plays, and a request that would spill into the next range is
refused in one line.
"""

from __future__ import annotations

from worldmodels.errors import UserError

# name: (first seed, end of the range, what it is for)
RANGES: dict[str, tuple[int, int, str]] = {
    "collect": (0, 100_000, "exploration episodes (collect)"),
    "train": (100_000, 300_000, "controller training episodes"),
    "train_extra": (300_000, 500_000, "controller training episodes beyond --rollouts"),
    "check": (500_000, 600_000, "the periodic held-out check of the CMA-ES mean"),
    "select": (600_000, 1_000_000, "the final selection among checked means"),
    "evaluate": (1_000_000, 2**31 - 1, "evaluation (the official protocol: 1,000,000 + i)"),
}
COLLECT_TRACKS_PER_RUN_SEED = 10_000  # run seed s collects on tracks s*10000 + i


def first(name: str) -> int:
    return RANGES[name][0]


def require_within(name: str, start: int, count: int, flag: str) -> None:
    """Refuse seeds start … start+count-1 unless they all lie in the range `name`."""
    low, end, purpose = RANGES[name]
    if count and not (low <= start and start + count <= end):
        raise UserError(
            f"{flag}: tracks {start}..{start + count - 1} leave the range kept for {purpose} "
            f"({low}..{end - 1}); choose a smaller seed or fewer episodes"
        )
