"""Errors that are the user's to fix: the CLI prints their message on one line and exits with 2."""
from __future__ import annotations

import argparse
import difflib
import sys
from typing import Callable


class UserError(Exception):
    """A mistake in the user's input (a path, an option, a config); the message says what and where."""


class ConfigError(UserError):
    """A config file that does not match its schema: names the key and the file."""


def run_cli(prog: str, command: Callable[[], int | None], *, interrupted: str = "interrupted") -> int:
    """Run a command-line entry point's body and return its exit code.

    A UserError (a ConfigError too) becomes `prog: error: <message>` on stderr and exit code 2, never a
    traceback; Ctrl-C becomes `prog: <interrupted>` and 130 (128 + SIGINT, as shells report it).
    """
    try:
        return int(command() or 0)
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130


# names people reach for that the commands spell otherwise (other tools', or this one's other commands')
OPTION_SYNONYMS = {"--bundle": "--model", "--checkpoint": "--model", "--ckpt": "--model", "--weights": "--model",
                   "--text": "--prompt", "--output": "--out", "--out-dir": "--out", "--output-dir": "--run-dir",
                   "--num-samples": "--num-images", "--input": "--image",
                   "--init-image": "--image", "--data-dir": "--data", "--dataset": "--data", "--steps": "--max-steps"}


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser (and its subcommands'), whose errors name the option that an unknown one on the
    command line was probably meant to be, also where another error comes first ("--dataset d" for a
    required --data): "... (did you mean --data, not --dataset?)"."""

    _command_line: list[str] = []  # of the outermost parse in progress; subcommands parse parts of it
    _depth = 0

    def parse_known_args(self, args=None, namespace=None):
        if ArgumentParser._depth == 0:
            ArgumentParser._command_line = list(sys.argv[1:] if args is None else args)
        ArgumentParser._depth += 1
        try:
            return super().parse_known_args(args, namespace)
        finally:
            ArgumentParser._depth -= 1

    def error(self, message: str):
        super().error(message + did_you_mean(self, ArgumentParser._command_line))


def did_you_mean(parser: argparse.ArgumentParser, command_line: list[str]) -> str:
    """' (did you mean --model, not --bundle?)' for the first option on `command_line` that `parser` does
    not have but that is a known synonym or a near spelling of one it has; '' when there is none. A
    prefix of an option is not unknown (argparse takes it for the option)."""
    options = {s for action in parser._actions for s in action.option_strings if s.startswith("--")}
    for arg in command_line:
        name = arg.split("=", 1)[0]
        if not name.startswith("--") or any(option.startswith(name) for option in options):
            continue
        guess = OPTION_SYNONYMS.get(name)
        if guess not in options:
            close = difflib.get_close_matches(name, sorted(options), n=1, cutoff=0.75)
            guess = close[0] if close else None
        if guess:
            return f" (did you mean {guess}, not {name}?)"
    return ""
