"""Score a run's kept controller on the 100 official tracks with another action mapping, without
retraining it (docs/experiments.md, "The action mapping").

    python docs/scripts/mapped_eval.py cap:0.85 runs/quick runs/quick-cap085
    python docs/scripts/mapped_eval.py excl runs/quick runs/quick-excl

`cap:X` caps the brake at X (Gymnasium's car locks a wheel at brake >= 0.9); `excl` cuts the gas
while the controller brakes. The mapping is replaced in this process only (V, M and C act here;
the env workers only step the cars). DST gets a copy of SRC's V, M and C and the evaluation.
"""

import shutil
import sys
from pathlib import Path

import worldmodels.models.controller as controller

MODE = ""
plain = controller.squash_actions


def mapped(raw):
    actions = plain(raw)
    if MODE.startswith("cap:"):
        actions[..., 2] = actions[..., 2].clamp(max=float(MODE[4:]))
    elif MODE == "excl":
        actions[..., 1] = actions[..., 1] * (actions[..., 2] <= 0)
    return actions


if __name__ == "__main__":  # env workers re-import this file: only the parent evaluates
    MODE, src, dst = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    controller.squash_actions = mapped
    if not dst.exists():
        for part in ("vae", "mdnrnn", "controller"):
            shutil.copytree(src / part, dst / part)
        (dst / "data").mkdir()
        shutil.copy(src / "data/config.json", dst / "data/config.json")
    from worldmodels.cli import main

    args = ["evaluate", "--run-dir", str(dst), "--episodes", "100", "--gif", "0"]
    sys.exit(main([*args, "--dream-episodes", "0"]))
