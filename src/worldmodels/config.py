"""Typed configs and the glue that turns their fields into command-line flags.

Every stage has a dataclass whose fields carry their own help text (``metadata["help"]``), so
`--help` documents every flag from one place and the resolved config can be saved beside the
artifacts it produced.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

from worldmodels.errors import UserError
from worldmodels.io import atomic_write_text

T = TypeVar("T")


def option(
    default: Any,
    help: str,
    choices: tuple | None = None,
    *,
    low: float | None = None,
    high: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> Any:
    """A dataclass field with a help text for the CLI, and the values it takes: `choices`, or
    bounds (`low` <= value <= `high`, `above` < value < `below`). `Config.validate` checks both, for a
    config built in Python as for one built from flags."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    bounds = {"low": low, "high": high, "above": above, "below": below}
    meta.update({k: v for k, v in bounds.items() if v is not None})
    return dataclasses.field(default=default, metadata=meta)


def _bound_problem(field: dataclasses.Field, value: Any) -> str | None:
    """One line saying how `value` breaks the field's declared bounds, or None."""
    meta, flag = field.metadata, "--" + field.name.replace("_", "-")
    if "choices" in meta and value not in meta["choices"]:
        return f"unknown {flag} {value!r}: choose one of {', '.join(map(str, meta['choices']))}"
    low, high, above, below = (meta.get(k) for k in ("low", "high", "above", "below"))
    if low is not None and below is not None and not low <= value < below:
        return f"{flag} must be in [{low}, {below}), got {value}"
    if low is not None and high is not None and not low <= value <= high:
        return f"{flag} must be in {low}..{high}, got {value}"
    if low is not None and value < low:
        return f"{flag} must be >= {low}, got {value}"
    if high is not None and value > high:
        return f"{flag} must be <= {high}, got {value}"
    if above is not None and value <= above:
        return f"{flag} must be > {above}, got {value}"
    return None


class Config:
    """The base of every stage's config: `validate` checks each field's declared bounds, then
    the rules between fields (`check`), so a bad number stops before anything is written."""

    def validate(self) -> None:
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            problem = _bound_problem(field, getattr(self, field.name))
            if problem:
                raise UserError(problem)
        self.check()

    def check(self) -> None:
        """Rules between fields (a stage overrides it); none by default."""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _given_type(ftype: Any) -> Any:
    """The type a flag parses: `Path | None` (None = "not given") parses as a Path."""
    args = [a for a in typing.get_args(ftype) if a is not type(None)]
    return args[0] if len(args) == 1 and len(typing.get_args(ftype)) == 2 else ftype


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part)


_PARSERS: dict[Any, Any] = {
    int: int,
    float: float,
    str: str,
    bool: _parse_bool,
    Path: Path,
    tuple[int, ...]: _parse_int_tuple,
}


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type, prefix: str = "", skip: tuple[str, ...] = ()
) -> None:
    """Add one `--<prefix><field>` flag per dataclass field, defaulting to "not given"."""
    types = _field_types(cls)
    group = parser.add_argument_group(f"{prefix.rstrip('.')} settings") if prefix else parser
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        ftype = _given_type(types[field.name])
        parse = _PARSERS.get(ftype)
        if parse is None:  # a programming error: a field the CLI cannot set must not vanish
            raise TypeError(f"{cls.__name__}.{field.name}: no flag parser for {ftype}")
        flag = "--" + prefix + field.name.replace("_", "-")  # e.g. --vae.epochs
        default = field.default
        help_text = field.metadata.get("help", "")
        if default is not None:  # a None default is explained by the help text itself
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            help_text += f" (default: {shown})"
        kwargs: dict[str, Any] = {
            "dest": prefix + field.name,
            "type": parse,
            "default": argparse.SUPPRESS,
            "help": help_text,
        }
        if "choices" in field.metadata:
            kwargs["choices"] = field.metadata["choices"]
        if ftype is bool:  # `--flag` alone means true; `--flag false` turns it off
            kwargs.update(metavar="{true,false}", nargs="?", const=True)
        group.add_argument(flag, **kwargs)


def config_from_args(
    cls: type[T], args: argparse.Namespace | None, prefix: str = "", base: T | None = None
) -> T:
    """Build a config: fields given on the command line (if any) override `base` (or the
    defaults)."""
    given = {
        field.name: getattr(args, prefix + field.name)
        for field in dataclasses.fields(cls)
        if args is not None and hasattr(args, prefix + field.name)
    }
    start = base if base is not None else cls()
    return dataclasses.replace(start, **given)


def to_jsonable(cfg: Any) -> dict[str, Any]:
    def convert(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple):
            return list(value)
        if dataclasses.is_dataclass(value):
            return to_jsonable(value)
        return value

    return {f.name: convert(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def from_jsonable(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config saved by `save_config`; unknown keys are an error, missing keys default."""
    types = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise UserError(f"unknown config keys for {cls.__name__}: {sorted(unknown)}")
    values = {}
    for name, value in data.items():
        ftype = _given_type(types[name])
        if value is None:
            values[name] = None
        elif dataclasses.is_dataclass(ftype):
            values[name] = from_jsonable(ftype, value)
        elif ftype is Path:
            values[name] = Path(value)
        elif isinstance(value, list):
            values[name] = tuple(value)
        else:
            values[name] = value
    return cls(**values)


def save_config(cfg: Any, path: Path) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(cfg), indent=2) + "\n")


def load_config(cls: type[T], path: Path) -> T:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read config {path}: {err}") from None
    return from_jsonable(cls, data)


def require_same_settings(
    cfg: Any, config_path: Path, names: tuple[str, ...], what: str, hint: str
) -> None:
    """Refuse to resume work whose defining settings differ from the saved `config.json`.

    `what` says what the folder holds ("an M trained"), `hint` what to do instead.
    """
    if not Path(config_path).exists():
        return
    old = load_config(type(cfg), config_path)
    for name in names:
        if getattr(old, name) != getattr(cfg, name):
            raise UserError(
                f"{Path(config_path).parent} holds {what} with {name}={getattr(old, name)}, "
                f"not {getattr(cfg, name)}: {hint}"
            )
