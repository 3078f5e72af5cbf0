"""A copy of a run whose controller is the checked CMA-ES mean of one generation, or the average
of several (weight by weight), so that mean can be scored like the kept one (docs/experiments.md,
"The selection or the last mean?", "Fresh-clone runs on a faster machine" and
"Where the runs on the faster machine lose their points").

    python docs/scripts/pick_finalist.py runs/seed7 /tmp/seed7_g30 30
    python docs/scripts/pick_finalist.py runs/seed7 /tmp/seed7_avg 20 25 30 35 37
    worldmodels evaluate --run-dir /tmp/seed7_g30 --episodes 100 --gif 0 --dream-episodes 0
    python3 ../shared/tools/compare_evals.py runs/seed7/eval/eval.json /tmp/seed7_g30/eval/eval.json

The copy holds the run's V, M and data config; its controller is written by the project's own
`save_controller` from the `checked` entry of that generation in `controller/es_state.json`.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from worldmodels.artifacts import load_world_model, save_controller, world_model_sources


def main(run: Path, copy: Path, generations: list[int]) -> None:
    state = json.loads((run / "controller" / "es_state.json").read_text())
    by_generation = {c["generation"]: c["vector"] for c in state["checked"]}
    unchecked = [g for g in generations if g not in by_generation]
    if unchecked:
        checked = sorted(by_generation)
        sys.exit(f"generation {unchecked[0]} was never checked in {run}: pick from {checked}")
    vector = np.mean([by_generation[g] for g in generations], axis=0)
    copy.mkdir(parents=True)
    for part in ("vae", "mdnrnn"):
        shutil.copytree(run / part, copy / part)
    (copy / "data").mkdir()
    shutil.copy(run / "data" / "config.json", copy / "data" / "config.json")
    agent = load_world_model(copy)
    meta = {**world_model_sources(copy), "generations": generations}
    save_controller(copy / "controller", vector, agent, meta)
    print(f"{copy}: the average of the checked means of generations {generations}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), [int(g) for g in sys.argv[3:]])
