"""Laps finished and tiles missed by track length, from evaluations' `eval.json`
(docs/experiments.md, "Where the runs on the faster machine lose their points"). Tracks below
600 are left out: they are the car leaving the road, not the lap it could not finish.

    python docs/scripts/laps_by_length.py runs/seed7/eval/eval.json runs/seed8/eval/eval.json
"""

import json
import sys
from pathlib import Path

import numpy as np

BINS = [(0, 270), (270, 290), (290, 310), (310, 1000)]


def main(paths: list[str]) -> None:
    for path in paths:
        episodes = json.loads(Path(path).read_text())["episodes"]
        kept = [e for e in episodes if e["return"] >= 600]
        print(f"{path}: {len(kept)} tracks at 600 or more")
        for low, high in BINS:
            some = [e for e in kept if low <= e["tiles"] < high]
            if not some:
                continue
            laps = np.mean([e["end"] == "lap" for e in some])
            missed = np.median([e["tiles_missed"] for e in some])
            mean = np.mean([e["return"] for e in some])
            print(
                f"  {low}-{high - 1} tiles: {len(some):3d} tracks, {laps:4.0%} laps, "
                f"median {missed:.0f} tiles missed, mean return {mean:.1f}"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
