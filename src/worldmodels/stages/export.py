"""`worldmodels export`: a trained agent as one self-contained folder to share or ship.

V, M and C as safetensors with their JSON configs, plus `agent.json` (frame crop, action
mapping, versions, where it came from) and the source run's `eval.json`. The folder is all that
`evaluate --agent`, `play --agent` and `load_agent()` need; loading it never runs code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from worldmodels.artifacts import export_agent
from worldmodels.config import option
from worldmodels.errors import UserError
from worldmodels.progress import log


@dataclass
class ExportConfig:
    run_dir: Path = option(Path("runs/default"), "run directory with trained V, M and C")
    out: Path | None = option(None, "folder to write the agent into (created if missing)")
    controller: str = option(
        "mean", "which controller: the kept CMA-ES mean or the best candidate", ("mean", "best")
    )
    half: bool = option(True, "store V and M in float16 (half the size; cast back on load)")

    def written_dir(self) -> Path | None:
        return self.out


def run(cfg: ExportConfig) -> Path:
    if cfg.out is None:
        raise UserError("--out is required: the folder to write the agent into")
    out = export_agent(cfg.run_dir, cfg.out, cfg.controller, cfg.half)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"export: wrote {out} ({size / 1e6:.1f} MB)")
    return out
