"""The `offramp` command: a root parser; each subpackage registers its own subcommands."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from typing import Any, TypeVar

from offramp.shared.errors import OfframpError
from offramp.shared.version import __version__

# Each module exposes `register(subparsers)`; a subcommand sets `func(args) -> int` as its default.
SUBCOMMAND_MODULES = ("offramp.models.cli", "offramp.edge.cli", "offramp.cloud.cli")

C = TypeVar("C")


def config_from_args(cls: type[C], args: argparse.Namespace, **overrides: Any) -> C:
    """A config dataclass from parsed flags: every field a flag of the same name carries, then `overrides`.

    Flags whose meaning differs from the field (a unit, a negation, a path to read) go in `overrides`, so the
    mapping from command line to config is written once per difference, not once per field.
    """
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return cls(**(values | overrides))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offramp", description="Edge/cloud collaborative LLM inference.")
    parser.add_argument("--version", action="version", version=f"offramp {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that part is not built yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except OfframpError as exc:
        print(f"offramp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
