"""Command line: `fsbench run | ls | demo | report | sweep | data ...`.

Every user mistake surfaces as an `FsbenchError`, printed on one line with a documented exit
code (see README "Exit codes"); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

from fsbench.cli import commands  # noqa: F401  (registers the sub-commands)
from fsbench.cli.app import app, err_console
from fsbench.errors import FsbenchError


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fsbench` script."""
    try:
        app(args=argv, standalone_mode=False)
    except FsbenchError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted; finished runs are saved, re-run to resume")
        return 130
    except SystemExit as exc:
        return int(exc.code or 0)
    except Exception as exc:  # click's own usage errors arrive here
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            return 130
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
