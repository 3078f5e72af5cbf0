"""The `worldmodels` command: one thin sub-command per stage.

Each sub-command builds its stage's config dataclass from flags (every field is a flag with its
help text), calls the stage, and turns known errors into one line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from worldmodels.config import add_config_arguments, config_from_args
from worldmodels.errors import UserError


@dataclass
class Command:
    name: str
    help: str
    config: type | None  # the stage's config dataclass: one flag per field
    run: Callable  # run(cfg); with config None, run(args) after add_arguments(parser)
    add_arguments: Callable | None = None


def _commands() -> list[Command]:
    from worldmodels import bench, check, report
    from worldmodels.stages import (
        collect,
        dream,
        encode,
        evaluate,
        export,
        play,
        train_controller,
        train_mdnrnn,
        train_vae,
        visualize_vae,
    )
    from worldmodels.stages import run as pipeline

    return [
        Command(
            "run",
            "the whole pipeline, resumable: collect → V → M → dream → C → evaluate → report",
            None,
            pipeline.run_from_args,
            pipeline.add_arguments,
        ),
        Command(
            "check",
            "print versions and step each env backend (sanity check)",
            check.CheckConfig,
            check.run,
        ),
        Command(
            "collect",
            "collect exploration rollouts, one file per episode (resumable)",
            collect.CollectConfig,
            collect.run,
        ),
        Command(
            "train-vae",
            "train V, the conv VAE, on the collected frames (resumable)",
            train_vae.TrainVAEConfig,
            train_vae.run,
        ),
        Command(
            "visualize-vae",
            "write reconstruction and latent-traversal PNGs of the trained VAE",
            visualize_vae.VisualizeVAEConfig,
            visualize_vae.run,
        ),
        Command(
            "encode",
            "encode every episode into its VAE latents (mu, logvar) per frame (resumable)",
            encode.EncodeConfig,
            encode.run,
        ),
        Command(
            "train-mdnrnn",
            "train M, the MDN-RNN, on the latents with truncated BPTT (resumable)",
            train_mdnrnn.TrainMDNRNNConfig,
            train_mdnrnn.run,
        ),
        Command(
            "dream",
            "roll M forward from a real frame: real-vs-dream GIF and latent-error plot",
            dream.DreamConfig,
            dream.run,
        ),
        Command(
            "train-controller",
            "train the linear controller with CMA-ES, population batched in one env pool (resumable)",
            train_controller.TrainControllerConfig,
            train_controller.run,
        ),
        Command(
            "evaluate",
            "score the saved controller on N official CarRacing-v3 tracks (mean ± std, GIFs)",
            evaluate.EvaluateConfig,
            evaluate.run,
        ),
        Command(
            "play",
            "watch the agent drive live: real frame, V's reconstruction, return so far",
            play.PlayConfig,
            play.run,
        ),
        Command(
            "export",
            "write a trained agent (V, M, C, crop, versions) into one folder to share",
            export.ExportConfig,
            export.run,
        ),
        Command(
            "report",
            "rebuild report.md and report.html of a run dir",
            report.ReportConfig,
            report.run,
        ),
        Command(
            "bench", "measure env and pipeline throughput, print JSON", bench.BenchConfig, bench.run
        ),
    ]


class _OneLineParser(argparse.ArgumentParser):
    """Bad flags get one line (what is wrong, where to look), not a usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser(commands: list[Command]) -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="worldmodels",
        description="World Models (Ha & Schmidhuber, 2018) for Gymnasium CarRacing-v3.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands:
        child = sub.add_parser(
            command.name,
            help=command.help,
            description=command.help,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        if command.config is not None:
            add_config_arguments(child, command.config)
        elif command.add_arguments is not None:
            command.add_arguments(child)
    return parser


def main(argv: list[str] | None = None) -> int:
    commands = _commands()
    args = build_parser(commands).parse_args(argv)
    command = next(c for c in commands if c.name == args.command)
    try:
        cfg = config_from_args(command.config, args) if command.config else args
        command.run(cfg)
    except UserError as err:
        print(f"worldmodels {command.name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"worldmodels {command.name}: interrupted; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
