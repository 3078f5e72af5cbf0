"""Dream the same seeds in fp32 and in bf16 with each given controller, and compare the dreamed
returns (docs/experiments.md, "M stepped in bf16 in the dream").

    python docs/scripts/dream_precision.py WORLD_RUN CONTROLLER_RUN [CONTROLLER_RUN ...] [DREAMS]

WORLD_RUN gives M and the dreams' start frames (its encoded latents); each CONTROLLER_RUN's kept
controller (it must have been trained on that M's input size) dreams DREAMS seeds (default
1000) at temperature 1, 1000 steps, in both precisions, with the same starts and noise.
"""

import sys
from pathlib import Path

import numpy as np

from worldmodels.artifacts import load_controller, load_mdnrnn
from worldmodels.data.latents import first_latents
from worldmodels.dream import DreamEvaluator
from worldmodels.layout import RunDir


def main(args: list[str]) -> None:
    dreams = int(args.pop()) if args[-1].isdigit() else 1000
    world, controllers = Path(args[0]), [Path(a) for a in args[1:]]
    mdnrnn = load_mdnrnn(world)
    starts = first_latents(RunDir(world).latents)
    seeds = list(range(5_000_000, 5_000_000 + dreams))
    for run in controllers:
        vector, _ = load_controller(run)
        params = np.repeat(vector.numpy()[None], dreams, axis=0)
        fp32, bf16 = (
            DreamEvaluator(mdnrnn, starts, 1000, bf16=low).play(params, seeds).returns
            for low in (False, True)
        )
        diff = bf16 - fp32
        half = 1.96 * diff.std(ddof=1) / np.sqrt(dreams)
        corr = np.corrcoef(fp32, bf16)[0, 1]
        print(
            f"{run}: fp32 {fp32.mean():.1f}, bf16 {bf16.mean():.1f}, paired "
            f"{diff.mean():+.1f} ± {half:.1f} over {dreams} dreams (per-dream r {corr:.2f})"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
