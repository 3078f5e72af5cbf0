"""One `worldmodels` command with the gas eased while the car steers (docs/experiments.md,
"Where the runs on the faster machine lose their points").

    python docs/scripts/traction_map.py 0.8 train-controller --run-dir ARM ...
    python docs/scripts/traction_map.py 0.8 evaluate --run-dir ARM --episodes 100 --gif 0

The project's mapping gives gas = (tanh(raw) + 1) / 2 whatever the steering. Gymnasium's car is
driven by its rear wheels, and at full gas on full lock they lose their grip and the car spins;
the privileged teacher (`privileged_teacher.py`) laps only with its gas multiplied by
1 - 0.8 |steer|. A linear controller cannot form that product itself, so here the mapping does:
gas *= 1 - K |steer|. It is replaced in this process only, where V, M and C act (the
env workers only step the cars); train and evaluate an arm with the same K.
"""

import sys

import worldmodels.models.controller as controller

plain = controller.squash_actions
EASE = 0.0


def eased(raw):
    actions = plain(raw)
    actions[..., 1] = actions[..., 1] * (1 - EASE * actions[..., 0].abs())
    return actions


if __name__ == "__main__":  # env workers re-import this file: only the parent runs the command
    EASE = float(sys.argv[1])
    controller.squash_actions = eased
    print(f"gas eased by 1 - {EASE} |steer|", file=sys.stderr)
    from worldmodels.cli import main

    sys.exit(main(sys.argv[2:]))
