"""The whole pipeline, end to end, on the smoke preset: every artifact exists and is valid,
a rerun redoes nothing, and a `kill -9` mid-run is survived without redoing finished stages."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import imageio.v3 as iio
import numpy as np
import pytest

from worldmodels.artifacts import load_mdnrnn, load_vae, load_world_model
from worldmodels.cli import main
from worldmodels.data import open_episodes
from worldmodels.data.latents import open_latents
from worldmodels.data.manifest import read_manifest
from worldmodels.layout import RunDir
from worldmodels.metrics import read_metrics
from worldmodels.pipeline import stages
from worldmodels.provenance import input_sums, stale_stages

pytestmark = pytest.mark.slow  # the whole pipeline, several times

STAGES = [
    "collect",
    "vae",
    "visualize",
    "encode",
    "mdnrnn",
    "dream",
    "controller",
    "evaluate",
    "report",
]


def _run(run_dir, *extra) -> int:
    return main(["run", "--preset", "smoke", "--run-dir", str(run_dir), *extra])


def _outputs(layout: RunDir) -> dict:
    """The file each stage finishes with, and its modification time."""
    paths = {stage.key: layout.root / stage.output for stage in stages() if stage.output}
    return {k: p.stat().st_mtime_ns for k, p in paths.items() if p.exists()}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    assert _run(root, "--controller.generations", "3") == 0
    return root


def test_smoke_run_writes_every_artifact(smoke_run):
    layout = RunDir(smoke_run)
    assert len(open_episodes(layout.episodes)) == 6
    assert len(open_latents(layout.latents)) == 6
    assert load_vae(smoke_run).z_dim == 32 and load_mdnrnn(smoke_run).hidden == 32
    assert load_world_model(smoke_run).input_dim == 32 + 32
    assert iio.imread(layout.vae / "reconstructions.png").shape[0] > 64
    assert iio.imread(layout.dream / "dream.gif").shape[0] == 21  # start frame + 20 dream steps
    controller_rows = [
        json.loads(x) for x in (layout.controller / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["generation"] for r in controller_rows] == [1, 2, 3]  # the override took effect
    report = json.loads((layout.eval / "eval.json").read_text())
    assert len(report["episodes"]) == 2 and np.isfinite(report["mean"])
    assert report["protocol"]["backend"] == "gymnasium" and report["protocol"]["max_steps"] == 60
    record = json.loads((smoke_run / "run.json").read_text())
    assert list(record["stages"]) == STAGES and all(s["done"] for s in record["stages"].values())
    resolved = json.loads((smoke_run / "resolved_config.json").read_text())
    assert resolved["controller"]["generations"] == 3 and resolved["collect"]["episodes"] == 6
    markdown = (smoke_run / "report.md").read_text()
    assert f"{report['mean']:.1f} ± {report['std']:.1f}" in markdown
    assert "| VAE: summed squared error per image (held-out) |" in markdown
    kept = json.loads((layout.controller / "selection.json").read_text())
    assert (
        len(kept["finalists"]) == 2
        and f"| the mean of generation {kept['generation']}: " in markdown
    )
    assert "## How the laps ended" in markdown and "| worst tracks: seed |" in markdown
    worst = min(report["episodes"], key=lambda e: e["return"])
    assert (
        f"| {worst['seed']} | {worst['return']:.1f} | {worst['steps']} | {worst['end']} |"
        in markdown
    )
    assert report["fraction_laps"] == 0  # 60 steps finish no lap
    assert all(e["end"] in ("timeout", "off_playfield") for e in report["episodes"])
    html = (smoke_run / "report.html").read_text()
    assert html.count("data:image/") >= 5  # curves, reconstructions, traversal, dream, GIF


def test_rerun_redoes_no_finished_stage(smoke_run, capsys):
    before = _outputs(RunDir(smoke_run))
    assert _run(smoke_run, "--controller.generations", "3") == 0
    assert _outputs(RunDir(smoke_run)) == before
    assert capsys.readouterr().err.count("already done, skipped") == len(STAGES) - 1


def test_a_retrained_v_makes_every_stage_downstream_start_over(smoke_run, tmp_path, capsys):
    """More V epochs change V's weights: encode, M, dream, C and evaluate are stale and redo
    their work from scratch (C does not resume a search made with the old V); collect is kept."""
    root = tmp_path / "copy"
    shutil.copytree(smoke_run, root)
    before = _outputs(RunDir(root))
    capsys.readouterr()
    assert _run(root, "--controller.generations", "3", "--vae.epochs", "2") == 0
    after = _outputs(RunDir(root))
    assert after["collect"] == before["collect"]
    assert all(after[k] != before[k] for k in after if k != "collect")
    err = capsys.readouterr().err
    assert err.count("its inputs changed since it ran: starting over") == 6
    rows = read_metrics(RunDir(root).controller / "metrics.jsonl")
    assert [r["generation"] for r in rows] == [1, 2, 3]  # a new search, not a resumed one
    assert main(["evaluate", "--run-dir", str(root), "--episodes", "1", "--max-steps", "5"]) == 0


def test_a_stage_run_on_its_own_records_its_inputs_and_run_brings_the_rest_up_to_date(
    smoke_run, tmp_path, capsys
):
    """M retrained by hand (not through `run`) records what it ran on, as every stage does; the
    stages after it now show results of the old M: the report says which, and `run` starts
    exactly those over, keeping the hand-made M (its own record is up to date)."""
    root = tmp_path / "copy"
    shutil.copytree(smoke_run, root)
    layout = RunDir(root)
    recorded = json.loads((layout.mdnrnn / "inputs.json").read_text())
    assert recorded == {"train-mdnrnn": input_sums(root, ["latents/manifest.jsonl"])}
    assert set(json.loads((layout.vae / "inputs.json").read_text())) == {
        "train-vae",
        "visualize-vae",
    }
    assert stale_stages(root) == {}
    m_flags = ["--epochs", "1", "--hidden", "32", "--batch-size", "4", "--seed", "5"]
    assert main(["train-mdnrnn", "--run-dir", str(root), "--force", *m_flags]) == 0
    hand_made = (layout.mdnrnn / "model.safetensors").read_bytes()
    assert stale_stages(root) == {
        "dream": ["mdnrnn/model.json"],
        "train-controller": ["mdnrnn/model.json"],
        "evaluate": ["mdnrnn/model.json"],
    }
    assert main(["report", "--run-dir", str(root)]) == 0
    warning = next(x for x in (root / "report.md").read_text().splitlines() if "Out of date" in x)
    assert "`train-controller` (since: mdnrnn/model.json)" in warning
    capsys.readouterr()
    assert _run(root, "--controller.generations", "3") == 0
    err = capsys.readouterr().err
    assert err.count("its inputs changed since it ran: starting over") == 3
    assert "train-mdnrnn: already done, skipped" in err
    assert (layout.mdnrnn / "model.safetensors").read_bytes() == hand_made
    assert stale_stages(root) == {} and "Out of date" not in (root / "report.md").read_text()


@pytest.mark.parametrize(
    "stage, damaged",
    [("collect", "data/episodes/episode_000002.npz"), ("vae", "vae/model.safetensors")],
)
def test_a_finished_stage_whose_output_was_damaged_runs_again_and_heals_it(
    smoke_run, tmp_path, capsys, stage, damaged
):
    """run checks a finished stage's output before skipping it: a truncated episode is collected
    again and a corrupt V is written again from its checkpoint, the same bytes as before, so
    nothing downstream has to start over."""
    root = tmp_path / "copy"
    shutil.copytree(smoke_run, root)
    path = root / damaged
    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 2])
    capsys.readouterr()
    assert _run(root, "--controller.generations", "3") == 0
    err = capsys.readouterr().err
    assert err.count("its output is damaged") == 1
    assert f"{dict(collect='collect', vae='train-vae')[stage]}: its output is damaged" in err
    assert path.read_bytes() == original
    assert err.count("already done, skipped") == len(STAGES) - 2  # all but it and the report


def test_kill_9_mid_run_then_rerun_finishes_without_redoing_stages(tmp_path):
    env = dict(os.environ, WORLDMODELS_PROGRESS="0")
    cmd = [
        sys.executable,
        "-m",
        "worldmodels.cli",
        "run",
        "--preset",
        "smoke",
        "--run-dir",
        str(tmp_path),
    ]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    record = tmp_path / "run.json"
    deadline = time.time() + 120
    done: dict = {}
    while time.time() < deadline and proc.poll() is None:
        if record.exists():
            try:
                done = json.loads(record.read_text())["stages"]
            except (json.JSONDecodeError, KeyError):
                done = {}
            if len(done) >= 3:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= len(done) < len(STAGES), "the kill landed outside the run"
    before = _outputs(RunDir(tmp_path))
    finished = [k for k in before if k in done]
    assert _run(tmp_path) == 0
    after = _outputs(RunDir(tmp_path))
    assert all(after[k] == before[k] for k in finished)
    assert set(after) == set(STAGES) - {"report"}


def test_a_round_drives_the_runs_agent_and_trains_m_and_c_again_in_a_new_run_dir(
    smoke_run, tmp_path, capsys
):
    """`round`: the old run is only read; the new run dir holds the old episodes and the agent's
    new ones on the next tracks, the same V, an M and a C trained again with the old settings;
    a rerun redoes nothing, and `run` refuses the round's dir in one line."""
    files = sorted(p for p in smoke_run.rglob("*") if p.is_file())
    untouched = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in files}
    out = tmp_path / "round"
    argv = ["round", "--run-dir", str(smoke_run), "--out", str(out), "--episodes", "2"]
    assert main(argv) == 0
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in files} == untouched
    old, new = RunDir(smoke_run), RunDir(out)
    before, after = read_manifest(old.episodes), read_manifest(new.episodes)
    assert after[: len(before)] == before
    added = after[len(before) :]
    assert [(e.index, e.seed) for e in added] == [(6, 6), (7, 7)]  # episode i plays track seed+i
    driven = json.loads((out / "onpolicy" / "data" / "config.json").read_text())
    assert driven["policy"] == "agent" and driven["agent"] == str(smoke_run.resolve())
    assert [e.index for e in read_manifest(new.latents)] == [e.index for e in after]
    weights = "model.safetensors"
    assert (new.vae / weights).read_bytes() == (old.vae / weights).read_bytes()
    assert (new.mdnrnn / weights).read_bytes() != (old.mdnrnn / weights).read_bytes()
    kept = json.loads((old.controller / "config.json").read_text())
    assert json.loads((new.controller / "config.json").read_text()) == kept | {"run_dir": str(out)}
    assert (new.eval / "eval.json").exists()
    timed = json.loads((out / "run.json").read_text())["stages"]
    assert list(timed)[0] == "collect" and timed["collect"]["wall_s"] > 0
    assert "| collect |" in (out / "report.md").read_text()  # the round's stage table counts it
    assert (
        f"A round after `{smoke_run.resolve()}`: its 6 episodes and 2"
        in (out / "report.md").read_text()
    )
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().err.count("already done, skipped") == 5
    assert _run(out) == 2 and main(["round", "--run-dir", str(tmp_path / "none")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "is a round's run dir" in lines[0] and "no trained controller" in lines[1]


def test_run_seed_reaches_every_seeded_stage_but_never_the_evaluation_tracks():
    from worldmodels import pipeline
    from worldmodels.cli import _commands, build_parser

    parser = build_parser(_commands())
    args = parser.parse_args(["run", "--seed", "2", "--controller.seed", "7"])
    cfg = pipeline.RunConfig(preset="quick", seed=2)
    seeds = {
        stage.key: getattr(pipeline.stage_config(stage, cfg, args), "seed", None)
        for stage in pipeline.stages()
    }
    assert seeds["collect"] == 20_000  # run seed 2 collects on tracks 20000 + i
    assert seeds["vae"] == seeds["mdnrnn"] == seeds["dream"] == seeds["visualize"] == 2
    assert seeds["controller"] == 7  # a stage's own flag wins
    assert seeds["evaluate"] == 1_000_000  # the protocol's tracks never move
    other = {
        s.key: getattr(pipeline.stage_config(s, pipeline.RunConfig(seed=3), None), "seed", None)
        for s in pipeline.stages()
    }
    assert other["collect"] == 30_000 and other["controller"] == 3


def _budget_plan(controller_min: float):
    """The quick preset's stages with made-up configs: only the controller's budget matters."""
    from dataclasses import dataclass

    @dataclass
    class Timed:
        time_budget_min: float = 0.0

    return [(s, Timed(controller_min if s.key == "controller" else 9.0)) for s in stages()]


def test_a_run_budget_gives_the_controller_what_the_stages_before_it_left():
    from worldmodels.presets import presets
    from worldmodels.stage_plan import Budget

    expected = presets()["quick"].expected_min
    budget = Budget(57, elastic="controller", pace_stage="collect")
    plan = _budget_plan(29.5)
    k = 1 + [s.key for s, _ in plan].index("controller")
    walls = {"collect": 2, "vae": 9, "visualize": 0.3, "encode": 1.5, "mdnrnn": 1, "dream": 0.2}

    def fitted(collect_min: float, **changes) -> float:
        record = {"stages": {key: {"wall_s": m * 60} for key, m in walls.items()}}
        record["stages"]["collect"]["wall_s"] = collect_min * 60
        b = Budget(**{**budget.__dict__, **changes})
        return b.fit(plan[k - 1][1], k, plan, record, expected).time_budget_min

    after = expected["evaluate"] + expected["report"]
    assert fitted(2) == 29.5  # a machine at the expected pace keeps the preset's minutes
    spent = 6 + 9 + 0.3 + 1.5 + 1 + 0.2  # collect took 3x the expected: so will evaluate
    assert fitted(6) == pytest.approx(57 - spent - 3 * after, abs=0.01)
    assert fitted(8) == pytest.approx(57 - spent - 2 - 3 * after, abs=0.01)  # pace capped at 3
    assert fitted(30) == 5.0  # never below the floor: the run runs over instead
    assert fitted(6, minutes=0) == 29.5  # no run budget
    assert fitted(1) == 29.5  # a faster machine is never assumed
    other = plan[0][1]  # only the elastic stage is cut
    assert budget.fit(other, 1, plan, {"stages": {}}, expected) is other
    unlimited = _budget_plan(0.0)  # "no limit", set by the user, stays no limit
    cfg = unlimited[k - 1][1]
    assert budget.fit(cfg, k, unlimited, {"stages": {}}, expected) is cfg


def test_a_stage_the_budget_cut_is_recorded_with_its_preset_settings_and_shown(tmp_path):
    from worldmodels.report import stage_table
    from worldmodels.stage_plan import load_record, record_done

    record: dict = {}
    record_done(tmp_path, record, "collect", {"episodes": 200}, 120.0)
    record_done(tmp_path, record, "controller", {"time_budget_min": 29.5}, 1500.0, 25.1)
    saved = load_record(tmp_path / "run.json")["stages"]
    assert saved["controller"]["config"] == {"time_budget_min": 29.5}  # what a rerun compares
    assert saved["controller"]["budget_min"] == 25.1 and "budget_min" not in saved["collect"]
    table = stage_table(saved, {})
    assert "| controller | 25.0 min (the run's budget left it 25.1 min) |" in table
    assert "| collect | 2.0 min |" in table and "**27.0 min**" in table


def test_run_stages_cuts_the_elastic_stage_records_the_preset_settings_and_skips_it_after(
    tmp_path, monkeypatch
):
    from dataclasses import dataclass
    from pathlib import Path

    from worldmodels import report
    from worldmodels.stage_plan import Budget, Stage, load_record, run_stages

    @dataclass
    class Timed:
        run_dir: Path
        time_budget_min: float = 0.0

    ran: list[tuple[str, float]] = []

    def stage(key: str) -> Stage:
        def work(cfg: Timed) -> None:
            ran.append((key, cfg.time_budget_min))
            (cfg.run_dir / f"{key}.txt").write_text("done")

        return Stage(key, key, Timed, work, (), f"{key}.txt")

    monkeypatch.setattr(report, "run", lambda cfg: None)
    plan = [(stage(k), Timed(tmp_path, m)) for k, m in (("collect", 0), ("controller", 29.5))]
    plan.append((stage("evaluate"), Timed(tmp_path, 0)))
    expected = {"collect": 2, "controller": 30, "evaluate": 7}
    budget = Budget(13, elastic="controller", pace_stage="collect")
    run_stages(tmp_path, plan, {}, expected, budget)
    assert ran[1][0] == "controller" and ran[1][1] == pytest.approx(6.0, abs=0.05)  # 13 - 7
    saved = load_record(tmp_path / "run.json")["stages"]["controller"]
    assert saved["config"]["time_budget_min"] == 29.5 and saved["budget_min"] == ran[1][1]
    run_stages(tmp_path, plan, load_record(tmp_path / "run.json"), expected, budget)
    assert len(ran) == 3  # a rerun finds every stage done, the cut one included
