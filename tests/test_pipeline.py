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
