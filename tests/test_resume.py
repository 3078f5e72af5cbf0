"""The resume contract, once for every stage that trains or collects: a stage stopped after part
of its work and run again ends with exactly the artifacts and metrics of a run never stopped.

(Stopping here means running with a smaller target, which leaves the same checkpoint a kill
after that unit of work leaves; the SIGKILL tests in test_reliability.py kill at random moments.)
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import tiny_search

from worldmodels.checkpoint import save_model
from worldmodels.data import read_manifest
from worldmodels.layout import RunDir
from worldmodels.metrics import read_metrics
from worldmodels.models import MDNRNN, ConvVAE
from worldmodels.stages import collect, encode, train_controller, train_mdnrnn, train_vae


@dataclass(frozen=True)
class Case:
    run: Callable[[Path, int], object]  # the stage with a target of n units of work
    part: int
    whole: int
    needs: tuple[str, ...]  # folders of the prepared run it reads
    weights: str  # the file whose bytes must match ("" if the stage has none)
    metrics: str  # its metrics rows must match, timings aside ("" if none)


def _collect(root: Path, n: int):
    collect.run(collect.CollectConfig(run_dir=root, episodes=n, max_steps=25, envs=3))


def _vae(root: Path, n: int):
    train_vae.run(
        train_vae.TrainVAEConfig(
            run_dir=root,
            epochs=n,
            channels=(8, 16, 16, 32),
            z_dim=8,
            batch_size=16,
            precision="fp32",
            channels_last="off",
        )
    )


def _mdnrnn(root: Path, n: int):
    train_mdnrnn.run(
        train_mdnrnn.TrainMDNRNNConfig(
            run_dir=root, epochs=n, batch_size=4, seq_len=8, hidden=16, n_gaussians=3, device="cpu"
        )
    )


def _controller(root: Path, n: int):
    train_controller.run(tiny_search(root, generations=n, deterministic=True))


CASES = {
    "collect": Case(_collect, 3, 6, (), "", ""),
    "train-vae": Case(_vae, 1, 2, ("data",), "vae/model.safetensors", "vae/metrics.jsonl"),
    "train-mdnrnn": Case(
        _mdnrnn,
        1,
        3,
        ("data", "vae", "latents"),
        "mdnrnn/model.safetensors",
        "mdnrnn/metrics.jsonl",
    ),
    "train-controller": Case(
        _controller,
        2,
        3,
        ("data", "vae", "latents", "mdnrnn"),
        "controller/model.safetensors",
        "controller/metrics.jsonl",
    ),
}


@pytest.fixture(scope="module")
def prepared(tiny_run, tmp_path_factory) -> Path:
    """Tiny real episodes with a small V and M, encoded: the inputs of every stage above."""
    root = tmp_path_factory.mktemp("prepared")
    shutil.copytree(RunDir(tiny_run).data, RunDir(root).data)
    torch.manual_seed(0)
    vae_arch = {"z_dim": 8, "channels": [4, 8, 8, 16]}
    save_model(RunDir(root).vae, ConvVAE(8, (4, 8, 8, 16)), vae_arch)
    mdn_arch = {"z_dim": 8, "action_dim": 3, "hidden": 16, "n_gaussians": 2}
    save_model(RunDir(root).mdnrnn, MDNRNN(**mdn_arch), mdn_arch)
    encode.run(encode.EncodeConfig(run_dir=root, batch_size=16, device="cpu"))
    return root


def _is_timing(key: str) -> bool:
    return key.endswith(("_s", "seconds", "elapsed"))  # img_per_s, epoch_s, seconds, ...


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not _is_timing(k)} for r in read_metrics(path)]


@pytest.mark.parametrize("stage", list(CASES))
def test_a_stopped_stage_resumes_to_exactly_an_uninterrupted_run(stage, prepared, tmp_path):
    case = CASES[stage]
    runs = {}
    for name in ("resumed", "straight"):
        root = tmp_path / name
        root.mkdir()
        for folder in case.needs:
            shutil.copytree(prepared / folder, root / folder)
        runs[name] = root
    case.run(runs["resumed"], case.part)
    case.run(runs["resumed"], case.whole)
    case.run(runs["straight"], case.whole)

    resumed, straight = runs["resumed"], runs["straight"]
    if stage == "collect":
        episodes = [RunDir(r).episodes for r in (resumed, straight)]
        got = [[(e.index, e.sha256) for e in read_manifest(f)] for f in episodes]
        assert got[0] == got[1] and len(got[0]) == case.whole
    else:
        assert (resumed / case.weights).read_bytes() == (straight / case.weights).read_bytes()
        rows = _rows(resumed / case.metrics)
        assert rows == _rows(straight / case.metrics) and len(rows) >= case.whole
    assert not list(resumed.rglob("*.tmp"))
