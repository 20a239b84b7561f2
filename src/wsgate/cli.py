"""The one ``wsgate`` command and its subcommands.

Each subcommand lives in the module that does its job; that module exposes
``add_arguments(parser)`` and ``run(args) -> int``. Mistakes a user can make end
here in one line on stderr and exit code 2, never in a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn, Protocol, cast

from wsgate.args import UsageError
from wsgate.config import ConfigError

__all__ = ["build_parser", "main"]


class _Command(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("wsgate.app.serve", "run the gateway"),
    "check": ("wsgate.app.check", "validate a config and print the effective one"),
    "backend": ("wsgate.testbed.backend", "run the demo WebSocket/HTTP backend"),
    "load": ("wsgate.testbed.load", "drive many real clients against a gateway"),
    "demo": ("wsgate.testbed.demo", "run the whole system locally and check it"),
    "state": ("wsgate.admission.inspect", "show the shared admission state in Redis"),
    "status": ("wsgate.admin.status", "show a running gateway's backends in the terminal"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="wsgate",
        description="A gateway for long-lived connections with exact per-backend caps.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (module_name, summary) in COMMANDS.items():
        module = cast(_Command, importlib.import_module(module_name))
        command = sub.add_parser(name, help=summary, description=summary)
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # What the user typed, so a command can start copies of itself (serve --workers).
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        return int(args.handler(args))
    except (ConfigError, UsageError) as error:
        print(f"wsgate {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
