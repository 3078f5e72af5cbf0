"""World Models for CarRacing-v3. In a notebook: `from worldmodels import load_agent`."""

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
    raise AttributeError(f"module 'worldmodels' has no attribute {name!r}")


__all__ = ["__version__", "export_agent", "load_agent"]
