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
# offramp.bench.cli is imported by name only: it loads its tools (torch, the cloud) when one runs.
SUBCOMMAND_MODULES = ("offramp.models.cli", "offramp.edge.cli", "offramp.cloud.cli", "offramp.bench.cli")
# The parts an edge-only install (`pip install offramp`, no torch) lacks, and the subcommands each would add.
CLOUD_EXTRA_MODULES = frozenset({"torch", "transformers", "safetensors", "gguf", "accelerate", "onnx", "onnxscript", "matplotlib"})
NEEDS_CLOUD_EXTRA = {"offramp.models.cli": ("export", "train-exits", "calibrate", "eval", "ship-heads"), "offramp.cloud.cli": ("cloud",)}

C = TypeVar("C")


def config_from_args(cls: type[C], args: argparse.Namespace, **overrides: Any) -> C:
    """A config dataclass from parsed flags: every field a flag of the same name carries, then `overrides`.

    Flags whose meaning differs from the field (a unit, a negation, a path to read) go in `overrides`, so the
    mapping from command line to config is written once per difference, not once per field.
    """
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return cls(**(values | overrides))


def add_exit_layers_flag(p: argparse.ArgumentParser, required: bool, help: str) -> None:
    """`--exit-layer K`, or several exits `--exit-layers 8 15` (two spellings of one flag, into `args.exit_layers`):
    export, generate and the daemon take it alike."""
    p.add_argument("--exit-layers", "--exit-layer", dest="exit_layers", type=int, nargs="+", required=required, default=None,
                   metavar="K", help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offramp", description="Edge/cloud collaborative LLM inference.")
    parser.add_argument("--version", action="version", version=f"offramp {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            if name not in NEEDS_CLOUD_EXTRA:
                raise
            _register_missing(subparsers, name, exc)  # an edge-only install: say what to install, do not crash
            continue
        module.register(subparsers)
    return parser


def _register_missing(subparsers: argparse._SubParsersAction, module: str, exc: ImportError) -> None:
    """Subcommands of a part this install lacks (torch, transformers: the cloud extra), each failing clearly."""
    missing = exc.name or "the cloud packages"

    def refuse(args: argparse.Namespace) -> int:
        raise OfframpError(f"`offramp {args.command}` needs {missing}, which this install lacks: pip install 'offramp[cloud]' "
                           "(an edge device runs `offramp edge serve --edge DIR` without it)")

    for command in NEEDS_CLOUD_EXTRA[module]:
        p = subparsers.add_parser(command, help=f"(needs the cloud extra: {missing} is not installed)", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=refuse)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except OfframpError as exc:
        print(f"offramp: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in CLOUD_EXTRA_MODULES:
            print(f"offramp: error: `offramp {args.command}` needs {exc.name}, which this install lacks: "
                  "pip install 'offramp[cloud]'", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
