"""Command line: `fsbench run | ls | demo | report | sweep | data ...`.

Every user mistake surfaces as an `FsbenchError`, printed on one line with a documented exit
code (see README "Exit codes"); usage errors are click's (exit 2); anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import sys

from rich.markup import escape

from fsbench.cli import commands  # noqa: F401  (registers the sub-commands)
from fsbench.cli.app import app, err_console
from fsbench.errors import FsbenchError


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fsbench` script; returns the exit code."""
    try:
        app(args=argv, prog_name="fsbench", standalone_mode=True)
    except FsbenchError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted: finished runs are kept; run the same command again to resume")
        return 130
    except SystemExit as exc:  # standalone mode always ends here, usage errors included
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code == 130:  # click turns Ctrl-C into exit 130 ("Aborted!")
            err_console.print("interrupted: finished runs are kept; run the same command again to resume")
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
