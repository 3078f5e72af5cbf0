"""The road start with another look-ahead strip (docs/experiments.md, "A farther look-ahead").

    python docs/scripts/lookahead_start.py 30:50 train-controller --run-dir ARM ...

The road start steers toward the centre of the road in rows 40-66 of the 96-row frame
(`policies.AHEAD_ROWS`); this runs one `worldmodels` command with those rows replaced by
START:STOP in the fitted start only (the collecting road policy is untouched).
"""

import sys

import worldmodels.warm_start as warm_start

if __name__ == "__main__":  # env workers re-import this file: only the parent runs the command
    start, stop = (int(row) for row in sys.argv[1].split(":"))
    warm_start.AHEAD_ROWS = slice(start, stop)
    print(f"the road start looks at rows {start}-{stop}", file=sys.stderr)
    from worldmodels.cli import main

    sys.exit(main(sys.argv[2:]))
