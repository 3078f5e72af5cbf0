"""Trained models on disk: V, M and C of a run dir, or a whole agent exported to one folder.

Stages write their models into a run dir (`vae/`, `mdnrnn/`, `controller/`); everything that acts
(training C, evaluation, play, notebooks) loads them here, so no stage reaches into another.

An exported agent is one self-contained folder laid out like the run dir it came from, plus
`agent.json`, which records what acting needs besides the weights (the frame crop, the action
mapping, versions) and where the agent came from. Loading never runs code: weights are
safetensors with a checksum, everything else is JSON. An agent folder is a valid `--run-dir` for
`evaluate` and `play`.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import numpy as np
import torch

from worldmodels.agent import Agent
from worldmodels.checkpoint import load_model, read_model_meta, save_model
from worldmodels.errors import MissingStageError, UserError
from worldmodels.io import atomic_write_text
from worldmodels.layout import RunDir, writable_dir
from worldmodels.models import MDNRNN, ConvVAE, LinearController, controller_param_count
from worldmodels.runtime import pick_device

AGENT_META = "agent.json"
AGENT_FORMAT = 1
ACTION_MAPPING = "steer = tanh(a0); gas = (tanh(a1) + 1) / 2; brake = clip(tanh(a2), 0, 1)"
PRETRAINED = Path(__file__).resolve().parents[2] / "pretrained"  # the agent the repo ships
DEFAULT_RUN_DIR = Path("runs/default")  # what --run-dir means when not given


def load_vae(root: Path) -> ConvVAE:
    """V of a run dir or agent folder, on the CPU in eval mode."""
    return load_model(RunDir(root).vae, ConvVAE, "train-vae").eval()


def load_mdnrnn(root: Path) -> MDNRNN:
    """M of a run dir or agent folder, on the CPU in eval mode."""
    return load_model(RunDir(root).mdnrnn, MDNRNN, "train-mdnrnn").eval()


def controller_folder(root: Path, which: str = "mean") -> Path:
    """The kept CMA-ES mean (`controller/`) or the best single candidate (`controller/best/`)."""
    folder = RunDir(root).controller / ("best" if which == "best" else "")
    if not (folder / "model.json").exists():
        raise MissingStageError(
            f"trained controller in {RunDir(root).controller}", "train-controller"
        )
    return folder


def load_controller(root: Path, which: str = "mean") -> tuple[torch.Tensor, dict]:
    """C as one flat parameter vector, with its metadata (generation, z_only, ...)."""
    folder = controller_folder(root, which)
    meta = read_model_meta(folder, "train-controller")
    return load_model(folder, LinearController, "train-controller").flat(), meta


def save_controller(folder: Path, vector: np.ndarray, agent: Agent, extra: dict) -> None:
    """C as a model folder that rebuilds it: its input size and whether it sees h beside z."""
    controller = LinearController.from_flat(torch.as_tensor(vector, dtype=torch.float32))
    arch = {"input_dim": agent.input_dim, "action_dim": 3}
    save_model(folder, controller, arch, {"z_only": agent.z_only, **extra})


def frame_crop(root: Path) -> bool:
    """Whether V was trained on frames with the dashboard cropped off (collect's `--crop`)."""
    for path in (Path(root) / AGENT_META, RunDir(root).data / "config.json"):
        if path.exists():
            try:
                return bool(json.loads(path.read_text()).get("crop", True))
            except json.JSONDecodeError:
                raise UserError(f"{path} is corrupt: rerun the command that wrote it") from None
    return True


def load_world_model(
    root: Path, device: str = "cpu", z_only: bool = False, bf16: bool | None = None
) -> Agent:
    """V + M of a run dir or agent folder, ready to act; says which stage to run if one is missing."""
    return Agent(
        load_vae(root),
        load_mdnrnn(root),
        crop=frame_crop(root),
        z_only=z_only,
        device=pick_device(device),
        bf16=bf16,
    )


def world_model_sources(root: Path) -> dict[str, str]:
    """The checksums of the V and M weights in `root`: a controller records the pair it was
    trained with, and only acts with that pair."""
    layout = RunDir(root)
    return {
        "vae_sha256": read_model_meta(layout.vae, "train-vae")["sha256"],
        "mdnrnn_sha256": read_model_meta(layout.mdnrnn, "train-mdnrnn")["sha256"],
    }


def load_acting_agent(
    root: Path, which: str = "mean", device: str = "cpu"
) -> tuple[Agent, torch.Tensor, dict]:
    """V + M ready to act and C's flat parameters (with its metadata), from a run dir or agent
    folder; a controller trained on another V or M (its input size differs) is refused in one line."""
    params, meta = load_controller(root, which)
    current = world_model_sources(root)
    changed = [k.split("_")[0] for k, sha in current.items() if meta.get(k, sha) != sha]
    if changed:
        names = " and ".join({"vae": "V", "mdnrnn": "M"}[k] for k in changed)
        raise UserError(
            f"the controller in {RunDir(root).controller} was trained with another {names} than "
            f"the one in {root} now: retrain it (`worldmodels train-controller --force`)"
        )
    agent = load_world_model(root, device, z_only=bool(meta.get("z_only", False)))
    expected = controller_param_count(agent.input_dim)
    if params.numel() != expected:
        raise UserError(
            f"the controller in {RunDir(root).controller} has {params.numel()} parameters but V and "
            f"M there need {expected}: retrain it (`worldmodels train-controller --force`)"
        )
    return agent, params, meta


def _versions() -> dict[str, str]:
    import gymnasium

    from worldmodels import __version__

    return {
        "worldmodels": __version__,
        "torch": torch.__version__,
        "gymnasium": gymnasium.__version__,
        "python": platform.python_version(),
    }


def export_agent(root: Path, out: Path, which: str = "mean", half: bool = True) -> Path:
    """Write V, M and C of run dir `root` into the folder `out`, with everything acting needs.

    `half` stores V and M in float16 (half the size; they are cast back to float32 on load).
    The controller stays float32: it is tiny and its outputs go straight to the car.
    """
    agent, params, meta = load_acting_agent(root, which)
    out = writable_dir(out)
    dtype = torch.float16 if half else torch.float32
    layout = RunDir(out)
    vae_meta = read_model_meta(RunDir(root).vae, "train-vae")
    mdn_meta = read_model_meta(RunDir(root).mdnrnn, "train-mdnrnn")
    save_model(layout.vae, agent.vae.to(dtype), vae_meta["arch"], {"dtype": str(dtype)})
    save_model(layout.mdnrnn, agent.mdnrnn.to(dtype), mdn_meta["arch"], {"dtype": str(dtype)})
    controller = LinearController.from_flat(params)
    ctrl_meta = {k: v for k, v in meta.items() if k not in ("arch", "sha256")}
    ctrl_meta.update(world_model_sources(out))  # the copies it now acts with
    save_model(layout.controller, controller, meta["arch"], ctrl_meta)
    evaluation = RunDir(root).eval / "eval.json"
    if evaluation.exists():
        shutil.copyfile(evaluation, out / "source_eval.json")
    info = {
        "format": AGENT_FORMAT,
        "crop": agent.crop,
        "z_only": agent.z_only,
        "z_dim": agent.vae.z_dim,
        "hidden": agent.mdnrnn.hidden,
        "controller_input_dim": agent.input_dim,
        "action_mapping": ACTION_MAPPING,
        "weights_dtype": str(dtype),
        "controller": which,
        "controller_generation": meta.get("generation"),
        "source_run_dir": str(Path(root).resolve()),
        "versions": _versions(),
    }
    atomic_write_text(out / AGENT_META, json.dumps(info, indent=2) + "\n")
    return out


def agent_root(agent: Path | None, pretrained: bool) -> Path | None:
    """The folder models are read from when `--agent` or `--pretrained` is given, else None."""
    if pretrained:
        if not (PRETRAINED / AGENT_META).exists():
            raise UserError(
                f"no pretrained agent at {PRETRAINED}: this install does not ship one "
                "(install from a clone of the repository, or pass --agent PATH)"
            )
        return PRETRAINED
    if agent is None:
        return None
    if not (Path(agent) / AGENT_META).exists():
        raise UserError(
            f"{agent} is not an exported agent (no {AGENT_META}): write one with "
            "`worldmodels export --run-dir RUN --out PATH`"
        )
    info = json.loads((Path(agent) / AGENT_META).read_text())
    if info.get("format") != AGENT_FORMAT:
        raise UserError(
            f"{agent} is an agent of format {info.get('format')}, this version reads "
            f"{AGENT_FORMAT}: export it again with this version"
        )
    return Path(agent)


def results_dir(run_dir: Path, source: Path) -> Path:
    """Where an agent's results go: the run dir, or runs/<agent name> for an agent folder when
    no --run-dir was given (never into the agent folder itself, which may be the shipped one)."""
    if Path(source) == Path(run_dir) or Path(run_dir) != DEFAULT_RUN_DIR:
        return Path(run_dir)
    return Path("runs") / Path(source).resolve().name


class LoadedAgent:
    """A trained agent for notebooks: raw 96×96 frames in, CarRacing actions out.

    >>> agent = load_agent()       # the shipped agent, or load_agent("path/to/agent")
    >>> agent.reset(n)            # n cars, each with its own memory
    >>> actions = agent.act(frames)   # frames (n, 96, 96, 3) uint8 -> actions (n, 3)
    """

    def __init__(self, world_model: Agent, params: torch.Tensor, info: dict):
        self.world_model = world_model
        self.params = params
        self.info = info
        self.world_model.reset(1)

    def reset(self, num_envs: int = 1) -> None:
        self.world_model.reset(num_envs)

    def act(self, frames: np.ndarray) -> np.ndarray:
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.shape[1:] != (96, 96, 3) or len(frames) != len(self.world_model.h):
            raise ValueError(
                f"act() takes ({len(self.world_model.h)}, 96, 96, 3) frames (call reset(n) for "
                f"n cars); got {frames.shape}"
            )
        return self.world_model.act(frames, self.params.expand(len(frames), -1))


def load_agent(path: Path | str | None = None, device: str = "cpu") -> LoadedAgent:
    """An exported agent folder (or a run dir with a trained controller), ready to drive;
    with no path, the agent this repository ships."""
    root = Path(path) if path else agent_root(None, pretrained=True)
    world_model, params, _ = load_acting_agent(root, device=device)
    info_path = root / AGENT_META
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    return LoadedAgent(world_model, params, info)
