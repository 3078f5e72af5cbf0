"""The `worldmodels` command: one thin sub-command per stage.

Each sub-command builds its stage's config dataclass from flags (every field is a flag with its
help text), calls the stage, and turns known errors into one line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from worldmodels.config import add_config_arguments, config_from_args
from worldmodels.errors import UserError
from worldmodels.layout import run_lock


@dataclass
class Command:
    name: str
    help: str
    config: type | None  # the stage's config dataclass: one flag per field
    run: Callable  # run(cfg); with config None, run(args) after add_arguments(parser)
    add_arguments: Callable | None = None


def _commands() -> list[Command]:
    """`run`, then every pipeline stage (the list lives once, in `pipeline.stages`), then the
    commands outside the pipeline."""
    from worldmodels import bench, check, pipeline, rounds
    from worldmodels.stages import export, play

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
        *(Command(s.command, s.help, s.config, s.execute) for s in pipeline.stages()),
        Command(
            "round",
            "one round of iterative training: the run's agent collects, then M and C train again "
            "in a new run dir",
            None,
            rounds.run_from_args,
            rounds.add_arguments,
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


def written_dir(cfg) -> Path | None:
    """The run dir a command writes, locked while it runs; None for commands that only read."""
    method = getattr(cfg, "written_dir", None)
    return method() if method else getattr(cfg, "run_dir", None)


def main(argv: list[str] | None = None) -> int:
    commands = _commands()
    args = build_parser(commands).parse_args(argv)
    command = next(c for c in commands if c.name == args.command)
    try:
        cfg = config_from_args(command.config, args) if command.config else args
        if hasattr(cfg, "validate"):
            cfg.validate()  # bad numbers stop here, before anything is created or locked
        target = written_dir(cfg) if command.config else None  # `run` locks its own
        with run_lock(target, command.name) if target else nullcontext():
            command.run(cfg)
    except UserError as err:
        print(f"worldmodels {command.name}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, read-only, permissions: what the OS said, and the way on
        where = f" ({err.filename})" if err.filename else ""
        print(
            f"worldmodels {command.name}: error: {err.strerror or err}{where}: free space or fix "
            "the permissions, then rerun: finished work is kept (every write is atomic)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(
            f"worldmodels {command.name}: interrupted; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
