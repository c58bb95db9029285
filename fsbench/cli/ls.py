"""`fsbench ls [methods|datasets|backbones]`: what is registered."""

from __future__ import annotations

import typer
from rich.table import Table

from fsbench.cli.app import app, console
from fsbench.errors import UnknownNameError

WHAT = ("methods", "datasets", "backbones")


@app.command()
def ls(what: str = typer.Argument("methods", help="methods | datasets | backbones")) -> None:
    """List registered methods (with their paper), datasets or backbones."""
    if what not in WHAT:
        raise UnknownNameError(f"unknown list {what!r}; choose one of {', '.join(WHAT)}")
    console.print({"methods": _methods, "datasets": _datasets, "backbones": _backbones}[what]())


def _methods() -> Table:
    from fsbench.method import METHODS

    table = Table(title="methods")
    for col in ("name", "input", "summary", "paper"):
        table.add_column(col, overflow="fold")
    for name in METHODS.names():
        cls = METHODS.get(name)
        table.add_row(name, cls.input_kind, cls.summary, cls.paper)
    return table


def _datasets() -> Table:
    from fsbench.data import DATASETS

    table = Table(title="datasets (folder names: see README 'Datasets')")
    table.add_column("name")
    table.add_column("also accepted as")
    for name, aliases in DATASETS.aliases().items():
        table.add_row(name, ", ".join(aliases))
    return table


def _backbones() -> Table:
    from fsbench.backbones import BACKBONES, PAPER_BACKBONES

    table = Table(title="backbones (any open_clip model name also works, with --pretrained TAG)")
    table.add_column("name")
    table.add_column("open_clip model")
    table.add_column("default weights")
    for key, (model, tag) in PAPER_BACKBONES.items():
        table.add_row(key.upper().replace("VIT", "ViT"), model, tag)
    for name in BACKBONES.names():
        table.add_row(name, "CLIP (tiny config)", "random, seeded")
    return table
