"""World Models for CarRacing-v3. In a notebook: `from worldmodels import load_agent`; to train
any RL library inside a run's world model: `from worldmodels import make_dream_env`."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("worldmodels")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str):
    # lazy, so `worldmodels --help` does not wait for torch
    if name in ("load_agent", "export_agent"):
        from worldmodels import artifacts

        return getattr(artifacts, name)
    if name == "make_dream_env":
        from worldmodels import dream_gym

        return dream_gym.make_dream_env
    raise AttributeError(f"module 'worldmodels' has no attribute {name!r}")


__all__ = ["__version__", "export_agent", "load_agent", "make_dream_env"]
