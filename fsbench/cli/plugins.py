"""`--plugin FILE` for commands whose help lists registrations (`fsbench report`, `fsbench ls`).

A plug-in file registers protocols or methods when imported. Click answers `--help` while it parses
the arguments, before the command runs, so `PluginCommand` imports the `--plugin` files first: then
`fsbench report --plugin my_protocol.py --help` lists that plug-in's protocol too.
"""

from __future__ import annotations

import click
from rich.markup import escape
from typer.core import TyperCommand

from fsbench.registry import load_plugin


def plugin_paths(args: list[str]) -> list[str]:
    """The values of `--plugin X` / `--plugin=X` in a command's raw arguments."""
    paths = []
    for i, arg in enumerate(args):
        if arg == "--plugin" and i + 1 < len(args):
            paths.append(args[i + 1])
        elif arg.startswith("--plugin="):
            paths.append(arg.split("=", 1)[1])
    return paths


class PluginCommand(TyperCommand):
    """A command that imports its `--plugin` files before parsing, and whose help ends with every
    registered protocol and its metrics."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        for path in plugin_paths(args):
            load_plugin(path)
        return super().parse_args(ctx, args)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.epilog = protocols_epilog()
        super().format_help(ctx, formatter)


def protocols_epilog() -> str:
    """"Protocols (each has its section and tables in the report):" and one line per registered protocol."""
    from fsbench.protocols import PROTOCOLS, describe

    lines = [escape(describe(PROTOCOLS.get(name))) for name in PROTOCOLS.names()]
    return "Protocols (each gets its tables in the report; `fsbench ls protocols`):\n" + "\n".join(
        f"  {line}" for line in lines)
