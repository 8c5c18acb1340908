"""fedtune: federated DoRA fine-tuning of medical LLMs on Flower.

Start with `fedtune local up --profile tiny --supernodes 2 --rounds 1` (a CPU, a few minutes).
`fedtune <command> --help` describes each command; add --debug to any command to see the
traceback behind an error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

# Sub-command -> the module exposing `register(subparsers)` that adds it. Only the module of the
# command being run is imported (as pip does): `fedtune supernode` stays resident in every
# SuperNode container and should not carry the other commands' imports.
COMMANDS = {
    "local": "app.deploy.launcher",
    "run": "app.deploy.launcher",
    "supernode": "app.training.trainer_service",
    "trainer": "app.training.device_trainer",
    "certs": "app.deploy.certs",
    "eval": "app.evaluation.cli",
    "stack": "app.deploy.stack",
    "report": "app.results.report",
    "eval-run": "app.evaluation.run_eval",
}
# Commands the containers and the launcher run, not people: they work, but the help omits them.
HIDDEN = {"fedtune": {"supernode", "trainer", "eval-run"}, "fedtune stack": {"certs", "trainer-tokens", "register", "cache"}}
# Those print a traceback on an unexpected error: it goes to a service's log, for its operator.
IN_CONTAINER = {"supernode", "trainer", "eval-run"}
DEBUG_FLAG = "--debug"


class HelpFormatter(argparse.HelpFormatter):
    """Each option's default after its help, unless it has none worth showing or the help says it;
    descriptions wrapped paragraph by paragraph."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(super(HelpFormatter, self)._fill_text(p, width, indent) for p in text.strip().split("\n\n"))

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if (action.option_strings and action.default not in (None, False, "", argparse.SUPPRESS)
                and "default" not in help_text):
            help_text += " (default: %(default)s)"
        return help_text


class Parser(argparse.ArgumentParser):
    """One line per error, naming the flag (argparse's own message), not the whole usage."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def _hide_commands(parser: argparse.ArgumentParser) -> None:
    """Drop HIDDEN commands from the help of `parser` and the parsers below it (they still parse)."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        hidden = HIDDEN.get(parser.prog, set())
        action._choices_actions = [a for a in action._choices_actions if a.dest not in hidden]
        action.metavar = "{" + ",".join(name for name in action.choices if name not in hidden) + "}"
        for sub in action.choices.values():
            _hide_commands(sub)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for `command` alone, or for every command (help, unknown commands)."""
    parser = Parser(prog="fedtune", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True, title="commands")
    modules = [COMMANDS[command]] if command in COMMANDS else COMMANDS.values()
    for name in dict.fromkeys(modules):
        importlib.import_module(name).register(subparsers)
    parser.add_argument(DEBUG_FLAG, action="store_true", help="show the traceback behind an error (also after the command)")
    _hide_commands(parser)
    return parser


# Known-harmless output of the libraries, matched by message: bitsandbytes' CPU backend looks for
# the optional `kernels` package; transformers warns about its own use of a renamed attribute.
_HARMLESS_WARNINGS = [(FutureWarning, r"`is_gradient_checkpointing` is deprecated")]
_HARMLESS_LOG_LINES = {"bitsandbytes.backends.cpu.ops": "No module named 'kernels'"}


class _DropLine(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_known_noise() -> None:
    """Filter known-harmless warnings precisely, and draw progress bars only on a terminal
    (TQDM_DISABLE is tqdm's own default for `disable`; child processes inherit it)."""
    for category, message in _HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, text in _HARMLESS_LOG_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLine) and f.text == text for f in logger.filters):
            logger.addFilter(_DropLine(text))
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """--debug anywhere before a `--` (what follows `--` belongs to another program)."""
    end = argv.index("--") if "--" in argv else len(argv)
    debug = DEBUG_FLAG in argv[:end]
    return [a for i, a in enumerate(argv) if i >= end or a != DEBUG_FLAG], debug


def _one_line(exc: BaseException) -> str:
    """The error on one line; one a user did not cause names its type and where to look further."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, tuple(_user_error_types())):
        return text
    return f"{type(exc).__name__}: {text} (--debug shows the traceback)"


def _user_error_types() -> list[type]:
    """Errors whose message already says what is wrong (only from modules already imported)."""
    found = []
    for module, name in (("app.config", "ConfigError"), ("app.training.data", "DataError")):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return found


def main(argv: list[str] | None = None) -> int:
    argv, debug = _split_debug(sys.argv[1:] if argv is None else list(argv))
    quiet_known_noise()
    command = argv[0] if argv else None
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("fedtune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place every command's error is shown to a person
        if debug or command in IN_CONTAINER:
            raise
        print(f"fedtune: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
