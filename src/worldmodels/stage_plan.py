"""Running a plan of stages: each one skipped when it is done, its inputs unchanged and its
output whole, and run (or started over) otherwise. `run` plans the whole pipeline, `round` the
stages a round of iterative training redoes; both record their progress in `<run-dir>/run.json`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worldmodels.config import to_jsonable
from worldmodels.io import atomic_write_text
from worldmodels.progress import log
from worldmodels.provenance import changed_inputs, input_sums, output_problem, record_inputs


@dataclass(frozen=True)
class Stage:
    key: str  # flag prefix and run.json key
    command: str
    config: type
    run: Callable[[Any], Any]
    inputs: tuple[str, ...] = ()  # files (relative to the run dir) that vouch for its inputs
    output: str = ""  # the file it finishes with: a finished stage missing it runs again
    help: str = ""  # its command's one-line help (the CLI's stage commands are these stages)

    def execute(self, cfg: Any) -> Any:
        """Run the stage, then record beside its output the inputs it ran on, so that `run`
        and the report can tell, whoever started it, whether it is still up to date."""
        sums = input_sums(cfg.run_dir, self.inputs)  # as they were when it started
        result = self.run(cfg)
        on_own_run = getattr(cfg, "on_own_run", None)  # False: an exported agent's, or --out
        if self.inputs and self.output and (on_own_run is None or on_own_run()):
            record_inputs(cfg.run_dir, self.output, self.command, sums)
        return result


def load_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def save_record(root: Path, record: dict) -> None:
    """Write `record` as `root/run.json`: what `run` and `round` know of the run's stages."""
    atomic_write_text(root / "run.json", json.dumps(record, indent=2) + "\n")


def record_done(
    root: Path, record: dict, key: str, settings: dict, wall_s: float, budget_min: float = 0.0
) -> None:
    """Mark stage `key` done with `settings` (what a rerun compares), its wall time and, where
    the run's budget cut it, the minutes it got (what the report's stage table shows); save."""
    record.setdefault("stages", {})[key] = {
        "done": True,
        "config": settings,
        "wall_s": round(wall_s, 1),
        **({"budget_min": budget_min} if budget_min else {}),
    }
    save_record(root, record)


@dataclass(frozen=True)
class Budget:
    """A whole run's minutes, kept by shrinking the time budget of one stage (`elastic`, the
    one whose extra minutes buy the least at the end: the controller's search) to what the
    stages before it left, less what the stages after it are expected to take on this machine.
    """

    minutes: float
    elastic: str
    pace_stage: str  # a stage whose expected/actual minutes tell how slow this machine is

    def fit(self, stage_cfg: Any, k: int, plan: list[tuple[Stage, Any]], record: dict,
            expected: dict) -> Any:  # fmt: skip
        """`stage_cfg` with its time budget cut to fit (only a positive budget of the elastic
        stage: 0 means "no limit", which a user who sets it means)."""
        stage = plan[k - 1][0]
        own = getattr(stage_cfg, "time_budget_min", 0)
        if stage.key != self.elastic or not self.minutes or not own:
            return stage_cfg
        spent = sum(_wall_min(record, s.key) for s, _ in plan[: k - 1])
        pace = self.pace(record, expected)
        after = pace * sum(expected.get(s.key, 0) for s, _ in plan[k:])
        fits = max(MIN_ELASTIC_MIN, self.minutes - spent - after)
        if fits >= own:
            return stage_cfg
        log(
            f"{stage.command}: {fits:.1f} of its {own:g} min fit the run's {self.minutes:g}: "
            f"{spent:.1f} spent, {after:.1f} expected after it (this machine at {pace:.2f}× "
            "the expected minutes)"
        )
        return dataclasses.replace(stage_cfg, time_budget_min=round(fits, 2))

    def pace(self, record: dict, expected: dict) -> float:
        """How much longer than expected the pace stage took, between 1 and 3 (a machine is
        never assumed faster than the estimates, nor a stalled stage taken for its pace)."""
        took, usual = _wall_min(record, self.pace_stage), expected.get(self.pace_stage, 0)
        return min(3.0, max(1.0, took / usual)) if took and usual else 1.0


MIN_ELASTIC_MIN = 5.0  # below this the elastic stage learns nothing; the run runs over instead


def _wall_min(record: dict, key: str) -> float:
    return record.get("stages", {}).get(key, {}).get("wall_s", 0) / 60


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def run_stages(
    root: Path,
    plan: list[tuple[Stage, Any]],
    record: dict,
    expected: dict,
    budget: Budget | None = None,
) -> None:
    """Run the stages of `plan` in order, skipping each one `record` (root/run.json) shows done
    with the same settings, its inputs unchanged and its output whole; then the report.
    `expected` holds each stage's usual minutes, for the "time left" estimate and `budget`.
    A stage's settings are compared before the budget cuts its time, so that a rerun on
    another day, when the cut would differ, still finds it done."""
    record.setdefault("stages", {})
    started = time.perf_counter()
    for k, (stage, stage_cfg) in enumerate(plan, 1):
        settings = to_jsonable(stage_cfg)
        settings.pop("force", None)
        settings.pop("run_dir", None)  # a moved or copied run dir is the same run
        done = record["stages"].get(stage.key, {})
        elapsed = time.perf_counter() - started
        left = sum(expected.get(s.key, 0) for s, _ in plan[k - 1 :])
        eta = f", about {left:.0f} min left" if left else ""
        stale = done.get("done") and bool(changed_inputs(root, stage.output, stage.command))
        same = done.get("done") and done.get("config") == settings and not stale
        damage = output_problem(root / stage.output) if same and stage.output else None
        if same and stage.output and not damage:
            log(f"[{k}/{len(plan)}] {stage.command}: already done, skipped")
            continue
        if damage:
            log(
                f"[{k}/{len(plan)}] {stage.command}: its output is damaged ({damage}): running again"
            )
        if stale:
            log(
                f"[{k}/{len(plan)}] {stage.command}: its inputs changed since it ran: starting over"
            )
            if hasattr(stage_cfg, "force"):
                stage_cfg = dataclasses.replace(stage_cfg, force=True)
        log(f"[{k}/{len(plan)}] {stage.command} (elapsed {_clock(elapsed)}{eta})")
        fitted = budget.fit(stage_cfg, k, plan, record, expected) if budget else stage_cfg
        stage_started = time.perf_counter()
        stage.execute(fitted)
        cut = fitted.time_budget_min if fitted is not stage_cfg else 0.0
        record_done(root, record, stage.key, settings, time.perf_counter() - stage_started, cut)
    from worldmodels import report

    report.run(report.ReportConfig(run_dir=root))  # again, now that every timing is recorded
    log(f"run: finished in {_clock(time.perf_counter() - started)}; report at {root / 'report.md'}")
