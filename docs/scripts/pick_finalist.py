"""A copy of a run whose controller is the checked CMA-ES mean of one generation, so that mean
can be scored like the kept one (docs/experiments.md, "The selection or the last mean?" and
"Fresh-clone runs on a faster machine").

    python docs/scripts/pick_finalist.py runs/seed7 /tmp/seed7_g30 30
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


def main(run: Path, copy: Path, generation: int) -> None:
    state = json.loads((run / "controller" / "es_state.json").read_text())
    vectors = [c["vector"] for c in state["checked"] if c["generation"] == generation]
    if not vectors:
        checked = [c["generation"] for c in state["checked"]]
        sys.exit(f"generation {generation} was never checked in {run}: pick one of {checked}")
    copy.mkdir(parents=True)
    for part in ("vae", "mdnrnn"):
        shutil.copytree(run / part, copy / part)
    (copy / "data").mkdir()
    shutil.copy(run / "data" / "config.json", copy / "data" / "config.json")
    agent = load_world_model(copy)
    meta = {**world_model_sources(copy), "generation": generation}
    save_controller(copy / "controller", np.array(vectors[0]), agent, meta)
    print(f"{copy}: the checked mean of generation {generation}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
