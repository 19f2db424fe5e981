"""The `cascade` command. Each family of subcommands lives with the code it drives and registers
its parsers here; a `UserError` anywhere becomes one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import sys

from cascade.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cascade",
        description="Train and run a DALL-E 2 / Imagen-style text-to-image cascade on CPU or GPU.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from cascade.data import commands as data_commands

    data_commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"cascade: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cascade: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
