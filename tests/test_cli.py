"""The command line as a newcomer meets it (issue 25): a mistake is one line naming the flag or file
and what was expected, never a traceback (--debug shows it); the help speaks to users (every option
described, defaults shown, in-container commands hidden); known-harmless library noise is filtered."""

import argparse
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from app import cli

QA_COLUMNS = '{"question": "q", "answer": "a"}\n'


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own exit
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "a-file").write_text("")
    (tmp_path / "qa.jsonl").write_text(QA_COLUMNS)
    (tmp_path / "broken.jsonl").write_text('{"input": "q", "output": \n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "rows.csv").write_text("input,output\nq,a\n")
    return {name.split(".")[0].replace("-", "_"): str(tmp_path / name)
            for name in ("a-file", "qa.jsonl", "broken.jsonl", "empty.jsonl", "rows.csv")}


# (extra arguments of `fedtune local up --profile tiny`, text the one line must contain)
LOCAL_UP_MISTAKES = [
    (["--supernodes", "0"], ["--supernodes", "positive integer", "'0'"]),
    (["--nodes", "-3"], ["--supernodes/--nodes", "positive integer"]),
    (["--rounds", "0"], ["--rounds", "positive integer"]),
    (["--rounds", "two"], ["--rounds", "'two'"]),
    (["--profile", "llama"], ["--profile", "'llama'", "tiny"]),
    (["--connect-timeout", "-1"], ["--connect-timeout", "positive number"]),
    (["--gpus", "first"], ["--gpus", "GPU ids"]),
    (["--bogus"], ["unrecognized arguments: --bogus"]),
    (["--results", "{a_file}/results"], ["--results", "a-file/results", "cannot write there"]),
    (["--data", "{tmp}/missing.jsonl"], ["--data", "missing.jsonl", "not found"]),
    (["--data", "{qa}"], ["--data", "qa.jsonl", "missing ['input', 'output']", "'question'"]),
    (["--data", "{broken}"], ["--data", "broken.jsonl", "cannot be read as jsonl"]),
    (["--data", "{empty}"], ["--data", "empty.jsonl", "empty file"]),
    (["--data", "{rows}"], ["--data", "rows.csv", "unsupported type '.csv'"]),
    (["--run-config", "dataset.path={tmp}/missing.jsonl"], ["--run-config dataset.path", "missing.jsonl"]),
    (["--run-config", "train.seq-lenght=8"], ["--run-config", "unknown config key(s) 'train.seq-lenght'"]),
    (["--run-config", "model.quantization=3"], ["--run-config", "model.quantization", "0, 4 or 8"]),
    (["--run-config", "rounds"], ["--run-config", "'rounds'", "key=value"]),
    (["--run-config", "privacy.noise-multiplier=1 dataset.path={qa}"], ["--run-config", "privacy.noise-multiplier=1", "set strategy.max-num-examples"]),
    (["--run-config", "privacy.noise-multiplier=1 strategy.update-norm-median-multiple=2"],
     ["--run-config", "strategy.update-norm-median-multiple (2.0) must be 0 when privacy.noise-multiplier (1.0) > 0"]),
    (["--resume-from", "{tmp}/no-checkpoint"], ["--resume-from", "no-checkpoint", "not a directory"]),
]


@pytest.mark.parametrize(("extra", "expected"), LOCAL_UP_MISTAKES, ids=[" ".join(e) for e, _ in LOCAL_UP_MISTAKES])
def test_a_mistake_is_one_line_naming_the_flag(extra, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    files = _files(tmp_path)
    fill = {"tmp": str(tmp_path), **files}
    extra = [arg.format(**fill) for arg in extra]
    results = tmp_path / "results"
    argv = ["local", "up", "--profile", "tiny", "--supernodes", "2", "--results", str(results), *extra]
    code, out, err = _run(argv, capsys)
    assert code == 2, (out, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for text in expected:
        assert text.format(**fill) in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (results / ".local").exists()  # refused before anything started


def test_other_commands_mistakes(capsys):
    for argv, expected in [
        ([], "the following arguments are required: {local,run,certs,eval,stack,report}"),
        (["lokal", "up"], "invalid choice: 'lokal'"),
        (["local"], "the following arguments are required: {up}"),
        (["run", "--profile", "tiny"], "required: --superlink"),
        (["run", "--superlink", "127.0.0.1:9093", "--supernodes", "0"], "--supernodes/--nodes: expected a positive integer"),
        (["run", "--superlink", "127.0.0.1:9093", "--insecure", "--run-config", "privacy.noise-multiplier=1 dataset.path=/data/own.jsonl"],
         "fedtune: privacy.noise-multiplier=1.0 needs a bound on each node's weight: set strategy.max-num-examples"),
    ]:
        code, out, err = _run(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, (argv, err)
        assert "Traceback" not in err


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    from app.deploy import launcher

    def broken(args):
        raise NotADirectoryError(20, "Not a directory", "/somewhere/file/results")

    monkeypatch.setattr(launcher, "local_up", broken)  # register() binds it when main() builds the parser
    argv = ["local", "up", "--profile", "tiny"]
    code, out, err = _run(argv, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "NotADirectoryError" in err and "/somewhere/file/results" in err and "--debug" in err
    assert "Traceback" not in err
    with pytest.raises(NotADirectoryError):
        cli.main([*argv, "--debug"])


def test_debug_after_a_double_dash_belongs_to_the_other_program():
    assert cli._split_debug(["local", "up", "--debug"]) == (["local", "up"], True)
    assert cli._split_debug(["--debug", "report", "x"]) == (["report", "x"], True)
    assert cli._split_debug(["supernode", "--", "--debug"]) == (["supernode", "--", "--debug"], False)


def test_the_real_entry_point_prints_no_traceback(tmp_path):
    """Through `python -m app.cli`, as `fedtune` runs: exit 2, one line, the flag, no traceback."""
    done = subprocess.run([sys.executable, "-m", "app.cli", "local", "up", "--profile", "tiny", "--supernodes", "0",
                           "--results", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "fedtune local up: argument --supernodes/--nodes: expected a positive integer, got '0' (see `fedtune local up --help`)"]
    qa = tmp_path / "qa.jsonl"
    qa.write_text(QA_COLUMNS)
    done = subprocess.run([sys.executable, "-m", "app.cli", "local", "up", "--profile", "tiny", "--data", str(qa),
                           "--results", str(tmp_path / "r")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"fedtune: --data: dataset file {qa}: has columns ['question', 'answer'], missing ['input', 'output'] "
        "(expected medalpaca's columns ['input', 'output'])"]


# ---- help written for users

def _parsers(parser: argparse.ArgumentParser, hidden_too: bool = False):
    """(prog, parser) of every command the help shows, depth first."""
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            shown = {a.dest for a in action._choices_actions}
            for name, sub in action.choices.items():
                if hidden_too or name in shown:
                    yield from _parsers(sub, hidden_too)


USER_COMMANDS = ("fedtune", "fedtune local", "fedtune local up", "fedtune run", "fedtune eval", "fedtune report", "fedtune stack")


def test_help_lists_no_in_container_command():
    parser = cli.build_parser()
    help_text = parser.format_help()
    for name in ("supernode", "eval-run"):
        assert not re.search(rf"(?<![-\w]){name}(?![-\w])", help_text), help_text
    stack = dict(_parsers(parser))["fedtune stack"].format_help()
    for name in ("certs", "register", "cache"):
        assert not re.search(rf"(?<![-\w]){name}(?![-\w])", stack), stack
    shown = {prog for prog, _ in _parsers(parser)}
    assert {"fedtune supernode", "fedtune eval-run", "fedtune stack cache"}.isdisjoint(shown)
    # hidden, not removed: the containers run them
    assert {"fedtune supernode", "fedtune eval-run", "fedtune stack cache"} <= {prog for prog, _ in _parsers(parser, True)}


def test_every_option_of_the_users_commands_is_described_with_its_default():
    parsers = dict(_parsers(cli.build_parser()))
    for prog in USER_COMMANDS:
        parser = parsers[prog]
        for action in parser._actions:
            if action.option_strings and action.help != argparse.SUPPRESS:
                assert action.help, f"{prog} {action.option_strings[0]} has no help"
        if prog == "fedtune stack":
            continue
        help_text = parser.format_help()
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, "", argparse.SUPPRESS):
                assert "default" in (action.help or "") or f"(default: {action.default})" in " ".join(help_text.split()), \
                    f"{prog} {action.option_strings[0]}: default {action.default!r} not shown"


def test_one_name_per_idea_with_the_old_names_kept():
    parsers = dict(_parsers(cli.build_parser()))
    up, run = parsers["fedtune local up"], parsers["fedtune run"]
    assert up.parse_args(["--nodes", "3"]).supernodes == up.parse_args(["--supernodes", "3"]).supernodes == 3
    assert run.parse_args(["--superlink", "x:1", "--nodes", "3"]).nodes == 3
    assert run.parse_args(["--superlink", "x:1", "--supernodes", "4"]).nodes == 4
    assert up.parse_args(["--eval-data-dir", "d"]).data_dir == up.parse_args(["--benchmarks-dir", "d"]).data_dir == Path("d")
    assert parsers["fedtune eval"].parse_args(["--base-model", "tiny", "--data-dir", "d"]).data_dir == Path("d")


# ---- quiet

def test_known_harmless_warnings_are_filtered_by_message_only(monkeypatch, capsys):
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    cli.quiet_known_noise()
    cli.quiet_known_noise()  # idempotent: main() may run twice in one process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        cli.quiet_known_noise()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("some other deprecation", FutureWarning)
    assert [str(w.message) for w in caught] == ["some other deprecation"]
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert sum(isinstance(f, cli._DropLine) for f in bnb.filters) == 1
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    keep = Keep()
    bnb.addHandler(keep)
    try:
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please ...")
        bnb.warning("something else went wrong")
    finally:
        bnb.removeHandler(keep)
    assert seen == ["something else went wrong"]


def test_progress_bars_only_on_a_terminal(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    cli.quiet_known_noise()
    assert "TQDM_DISABLE" not in os.environ
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    cli.quiet_known_noise()
    assert os.environ["TQDM_DISABLE"] == "1"
    code = "import io, tqdm; s = io.StringIO(); [None for _ in tqdm.tqdm(range(3), file=s)]; print(repr(s.getvalue()))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "''"  # tqdm itself honours it (a child inherits it)
