"""The typer application; each sub-command lives in its own module of `fsbench.cli`."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    name="fsbench",
    help="Benchmark harness for few-shot adaptation of CLIP (CLIP-LoRA and baselines).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
