"""Errors that are the user's to fix: the CLI prints their message on one line and exits with 2."""
from __future__ import annotations

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
