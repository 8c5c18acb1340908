"""`fedtune` command line: each sub-command lives in the module that owns it."""

from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command -> the module exposing `register(subparsers)` that adds it. Only the module of the
# command being run is imported (as pip does): `fedtune supernode` stays resident in every
# SuperNode container and should not carry the other commands' imports.
COMMANDS = {
    "local": "app.deploy.launcher",
    "run": "app.deploy.launcher",
    "supernode": "app.training.trainer_service",
    "certs": "app.deploy.certs",
    "eval": "app.evaluation.cli",
    "stack": "app.deploy.stack",
    "report": "app.results.report",
    "eval-run": "app.evaluation.run_eval",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for `command` alone, or for every command (help, unknown commands)."""
    parser = argparse.ArgumentParser(prog="fedtune", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    modules = [COMMANDS[command]] if command in COMMANDS else COMMANDS.values()
    for name in dict.fromkeys(modules):
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
