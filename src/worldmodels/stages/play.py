"""`worldmodels play`: a live window of the agent driving — the real frame, what V sees (its
reconstruction), and the return so far. Works headless (SDL dummy) to save a screenshot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worldmodels.artifacts import agent_root, load_acting_agent
from worldmodels.config import Config, option
from worldmodels.envs import BACKENDS, MAX_EPISODE_STEPS, make_env
from worldmodels.envs.gymnasium_backend import ensure_headless_display
from worldmodels.progress import log
from worldmodels.rollout import run_episodes
from worldmodels.seeds import first

PANEL = 288  # each picture is drawn 288×288 pixels (96×3, 64×4.5)


@dataclass
class PlayConfig(Config):
    run_dir: Path = option(Path("runs/default"), "run directory with a trained controller")
    seed: int = option(first("evaluate"), "track seed of the first episode")
    episodes: int = option(1, "episodes to play, one after another", low=1)
    env: str = option("gymnasium", "env backend", BACKENDS)
    max_steps: int = option(
        MAX_EPISODE_STEPS, "step limit per episode", low=1, high=MAX_EPISODE_STEPS
    )
    fps: int = option(50, "frames per second to show (0 = as fast as possible)", low=0)
    controller: str = option("mean", "which controller to drive with", ("mean", "best"))
    screenshot: Path | None = option(
        None, "save the last window picture to this PNG (e.g. for docs)"
    )
    agent: Path | None = option(None, "drive an exported agent folder (`worldmodels export`)")
    pretrained: bool = option(False, "drive the agent this repository ships (pretrained/)")

    def written_dir(self) -> None:
        """play writes nothing into a run dir (a screenshot goes where it is asked)."""
        return None


class Window:
    """Real frame | V's reconstruction, with the step and return underneath."""

    def __init__(self, fps: int):
        ensure_headless_display()
        import pygame

        self.pg = pygame
        pygame.display.init()  # not pygame.init(): its audio init prints ALSA errors where
        pygame.font.init()  # the machine has no sound device, and play makes no sound
        self.screen = pygame.display.set_mode((2 * PANEL, PANEL + 40))
        pygame.display.set_caption("worldmodels play")
        self.font = pygame.font.Font(None, 28)
        self.clock = pygame.time.Clock()
        self.fps = fps
        self.closed = False

    def _blit(self, image: np.ndarray, x: int) -> None:
        surface = self.pg.surfarray.make_surface(np.ascontiguousarray(image.transpose(1, 0, 2)))
        self.screen.blit(self.pg.transform.scale(surface, (PANEL, PANEL)), (x, 0))

    def draw(self, frame: np.ndarray, recon: np.ndarray, text: str) -> None:
        for event in self.pg.event.get():
            if event.type == self.pg.QUIT:
                self.closed = True
        self.screen.fill((20, 20, 20))
        self._blit(frame, 0)
        self._blit(recon, PANEL)
        label = self.font.render(text, True, (240, 240, 240))
        self.screen.blit(label, (10, PANEL + 10))
        self.pg.display.flip()
        if self.fps:
            self.clock.tick(self.fps)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.pg.image.save(self.screen, str(path))

    def close(self) -> None:
        self.pg.quit()


def run(cfg: PlayConfig) -> None:
    cfg.validate()
    source = agent_root(cfg.agent, cfg.pretrained) or cfg.run_dir
    agent, params, _ = load_acting_agent(source, cfg.controller)
    window = Window(cfg.fps)
    try:
        with make_env(cfg.env, 1, cfg.max_steps, workers=0) as env:
            for k in range(cfg.episodes):
                seed = cfg.seed + k
                total = [0.0]

                def show(got, seed=seed, total=total):
                    total[0] += float(got.reward[0])
                    with torch.inference_mode():
                        recon = agent.vae.decode(agent.encode(got.obs[:1]))[0]
                    recon = (recon.permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
                    text = f"seed {seed}  step {int(env.steps[0])}  return {total[0]:7.1f}"
                    window.draw(got.obs[0], recon, text)
                    if window.closed:
                        env.stop(np.ones(1, bool))

                result = run_episodes(env, agent, params[None], [seed], on_step=show)
                log(f"play: seed {seed}: return {result.returns[0]:.1f} in {result.steps[0]} steps")
                if window.closed:
                    break
        if cfg.screenshot is not None:
            window.save(cfg.screenshot)
    finally:
        window.close()
