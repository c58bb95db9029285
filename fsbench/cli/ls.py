"""`fsbench ls [methods|datasets|backbones|protocols]`: what is registered."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from fsbench.cli.app import app, console
from fsbench.cli.plugins import PluginCommand
from fsbench.errors import UnknownNameError
from fsbench.registry import load_plugin

WHAT = ("methods", "datasets", "backbones", "protocols", "samplers")


@app.command(cls=PluginCommand)
def ls(what: str = typer.Argument("methods", help="methods | datasets | backbones | protocols | samplers"),
       plugin: list[Path] = typer.Option(None, "--plugin", help="Python file registering methods or protocols.")
       ) -> None:
    """List registered methods (with their paper), datasets, backbones, protocols or few-shot samplers."""
    for path in plugin or []:
        load_plugin(path)
    if what not in WHAT:
        raise UnknownNameError(f"unknown list {what!r}; choose one of {', '.join(WHAT)}")
    tables = {"methods": _methods, "datasets": _datasets, "backbones": _backbones, "protocols": _protocols,
              "samplers": _samplers}
    console.print(tables[what]())


def _methods() -> Table:
    """From the static index (fsbench.catalog), unless an entry point may add methods: no torch import."""
    from fsbench.catalog import extra_methods_possible, index

    table = Table(title="methods")
    for col in ("name", "input", "unseen classes", "summary", "paper"):
        table.add_column(col, overflow="fold")
    rows = index()["methods"]
    if extra_methods_possible():
        from fsbench.method import METHODS

        rows = {n: {"input": c.input_kind, "unseen": c.scores_unseen_classes(), "summary": c.summary,
                    "paper": c.paper} for n in METHODS.names() for c in [METHODS.get(n)]}
    for name, m in sorted(rows.items()):
        table.add_row(name, m["input"], "yes" if m["unseen"] else "n/a", m["summary"], m["paper"])
    steps = index().get("transductive_steps", [])
    if steps:
        table.caption = (f"Any method can take a transductive step on top: METHOD+{' / METHOD+'.join(steps)} "
                         f"(e.g. lora+{steps[0]}; the whole unlabelled test set under --protocol transductive; "
                         "docs/methods.md).")
    return table


def _protocols() -> Table:
    from fsbench.protocols import PROTOCOLS, metric_infos

    table = Table(title="protocols (fsbench run --protocol NAME; docs/protocols.md)")
    table.add_column("name", no_wrap=True)  # a name is what users type: never folded
    for col in ("version", "metrics", "report table", "what"):
        table.add_column(col, overflow="fold")  # long words fold rather than lose letters
    for name in PROTOCOLS.names():
        cls = PROTOCOLS.get(name)
        metrics = ", ".join(f"{m.name} ({m.label})" for m in metric_infos(cls))
        shape = f"{cls.title or name}: " + ("dataset x method, a column per metric" if cls.table.columns == "metrics"
                                            else "method x dataset") + (f" ({cls.table.reference})"
                                                                        if cls.table.reference else "")
        table.add_row(name, str(cls.version), metrics, shape, cls.summary)
    return table


def _samplers() -> Table:
    from fsbench.samplers import DEFAULT_SAMPLER, SAMPLERS, _load_reference_samplers

    _load_reference_samplers()
    table = Table(title=f"few-shot samplers (--sampler NAME; default {DEFAULT_SAMPLER}; docs/protocols.md)")
    for col in ("name", "version", "draws"):
        table.add_column(col, overflow="fold")
    for name in SAMPLERS.names():
        cls = SAMPLERS.get(name)
        table.add_row(name, str(cls.version), cls.summary)
    return table


def _datasets() -> Table:
    from fsbench.catalog import index

    table = Table(title="datasets (folder names: see README 'Datasets')")
    table.add_column("name")
    table.add_column("also accepted as")
    for name, aliases in index()["datasets"].items():
        table.add_row(name, ", ".join(aliases))
    return table


def _backbones() -> Table:
    from fsbench.backbones import ALIASES, BACKBONES, PAPER_BACKBONES, TINY_FAMILIES, describe
    from fsbench.method import METHODS

    table = Table(title="backbones (any open_clip model name also works, with --pretrained TAG)")
    for col in ("name", "open_clip model", "default weights", "family", "text pooling", "methods"):
        table.add_column(col, overflow="fold")
    names = [k.upper().replace("VIT", "ViT") for k in PAPER_BACKBONES] + list(ALIASES)
    for name in names + BACKBONES.names() + list(TINY_FAMILIES):
        info = describe(name)
        weights = "random, seeded" if info.tag == "none" else info.tag
        table.add_row(name, info.model, weights, info.family, _pooling(info), _support(info, METHODS))
    return table


def _pooling(info) -> str:
    """How the text tower pools, and whether fsbench may cut prompts after the pooled token."""
    if info.text.pool == "hf":
        return "Hugging Face text model"
    mask = "causal" if info.text.causal else "bidirectional"
    cut = "prompts truncated (exact)" if info.text.truncatable else "full length"
    return f"{mask}, {info.text.pool}; {cut}"


def _support(info, methods) -> str:
    """"all", or the methods that do not apply in full, each with its one-line reason."""
    limits = [f"{n}: {r}" for n in methods.names() if (r := methods.get(n).supports(info))]
    return "all" if not limits else "all but\n" + "\n".join(limits)
