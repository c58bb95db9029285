"""What the registries hold, as static data: a mistyped name is answered without importing torch.

`fsbench run -m tipadapter` used to import torch, open_clip and every method (7 to 16 s) before it
said "did you mean 'tip_adapter'?". The names of fsbench's own methods, datasets, protocols and
backbones (and open_clip's model names) are kept in `fsbench/catalog_index.py`, generated from the
live registries by `python -m fsbench.catalog`; a test compares the two, so the index cannot drift.
Methods that arrive at run time (a `--plugin` file, the `fsbench.methods` entry-point group) are not
in the index: when any may exist, or a method file was added to `methods/` since the index was
generated, method names are checked against the live registry instead.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable
from pathlib import Path
from pprint import pformat
from typing import Any

from fsbench.errors import UnknownNameError

INDEX_FILE = Path(__file__).with_name("catalog_index.py")


def index() -> dict[str, Any]:
    """The static index (`catalog_index.INDEX`)."""
    from fsbench.catalog_index import INDEX

    return INDEX


def method_modules() -> list[str]:
    """The module names of fsbench's own method files (a directory listing, nothing imported)."""
    import fsbench.methods

    return sorted({p.stem for folder in fsbench.methods.__path__ for p in Path(folder).glob("*.py")
                   if not p.stem.startswith("_")})


def extra_methods_possible() -> bool:
    """Whether methods outside the index may be registered: a loaded plug-in, an entry point, or a method
    file added since the index was generated (its name works before `python -m fsbench.catalog` is run)."""
    if any(name.startswith("fsbench_plugin_") for name in sys.modules):
        return True
    if method_modules() != index()["method_modules"]:
        return True
    from importlib.metadata import entry_points

    return bool(list(entry_points(group="fsbench.methods")))


def extra_protocols_possible() -> bool:
    """Whether an installed package adds protocols through the entry-point group `fsbench.protocols`."""
    from importlib.metadata import entry_points

    return bool(list(entry_points(group="fsbench.protocols")))


def _unknown(kind: str, name: str, known: Iterable[str], cutoff: float = 0.5) -> UnknownNameError:
    """The registry's own message: did-you-mean, else the known names."""
    known = sorted(set(known))
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=cutoff)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
    return UnknownNameError(f"unknown {kind} {name!r}{hint}")


def check_names(methods: Iterable[str] = (), backbones: Iterable[str] = (), datasets: Iterable[str] = (),
                protocols: Iterable[str] = ()) -> None:
    """Raise `UnknownNameError` (did-you-mean) for the first name the index does not know; method names
    are left to the live registry when a plug-in or entry point may add some, and every name when a
    `--plugin` file is loaded (it may register protocols, datasets or backbones too)."""
    if any(name.startswith("fsbench_plugin_") for name in sys.modules):
        return
    idx = index()
    if extra_methods_possible() or extra_protocols_possible():  # the live (torch-free) protocol registry
        from fsbench.protocols import PROTOCOLS

        for name in protocols:
            PROTOCOLS.get(name)
    else:
        for name in protocols:
            if name.lower() not in idx["protocols"]:
                raise _unknown("protocol", name, idx["protocols"])
    if not extra_methods_possible():
        for name in methods:
            if name.lower() not in idx["methods"]:
                raise _unknown("method", name, idx["methods"])
    names = {n for main, aliases in idx["datasets"].items() for n in (main, *aliases)}
    for name in datasets:
        if name.lower() in names:
            continue
        if not extra_methods_possible():
            raise _unknown("dataset", name, names)
        from fsbench.data import DATASETS  # a plug-in may register datasets: the live registry

        DATASETS.get(name)
    for name in backbones:
        if name.lower() not in idx["backbones"] and name not in idx["open_clip_models"]:
            close = difflib.get_close_matches(name, idx["backbone_names"] + idx["open_clip_models"], n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else "; see `fsbench ls backbones`"
            raise UnknownNameError(f"unknown backbone {name!r}{hint}")


def build() -> dict[str, Any]:
    """The index, from the live registries (imports torch, open_clip and every method)."""
    import open_clip

    from fsbench.backbones import _ALIAS_KEYS, ALIASES, BACKBONES, PAPER_BACKBONES, TINY_FAMILIES
    from fsbench.data import DATASETS
    from fsbench.method import METHODS
    from fsbench.protocols import PROTOCOLS

    own = [n for n in METHODS.names() if METHODS.get(n).__module__.startswith("fsbench.")]
    methods = {n: {"input": METHODS.get(n).input_kind, "unseen": METHODS.get(n).scores_unseen_classes(),
                   "summary": METHODS.get(n).summary, "paper": METHODS.get(n).paper} for n in own}
    builtin = [n for n in PROTOCOLS.names() if PROTOCOLS.get(n).__module__.startswith("fsbench.")]
    protocols = {n: {"version": PROTOCOLS.get(n).version, "metrics": list(PROTOCOLS.get(n).metric_names),
                     "summary": PROTOCOLS.get(n).summary} for n in builtin}
    shown = [k.upper().replace("VIT", "ViT") for k in PAPER_BACKBONES] + list(ALIASES) + BACKBONES.names()
    return {
        "methods": methods,
        "method_modules": method_modules(),
        "protocols": protocols,
        "datasets": {main: aliases for main, aliases in DATASETS.aliases().items()},
        "backbones": sorted(set(BACKBONES.names()) | set(PAPER_BACKBONES) | set(_ALIAS_KEYS)),
        "backbone_names": shown + [n for n in TINY_FAMILIES if n not in shown],
        "open_clip_models": sorted(open_clip.list_models()),
    }


def write_index(path: Path = INDEX_FILE) -> Path:
    """Regenerate `catalog_index.py` from the live registries."""
    text = ('"""Generated by `python -m fsbench.catalog` from the live registries; do not edit by hand\n'
            '(tests/test_keys_content.py checks that it matches them)."""\n\n'
            f"INDEX = {pformat(build(), width=116, sort_dicts=True)}\n")
    path.write_text(text, encoding="utf-8")
    return path


if __name__ == "__main__":
    print(f"wrote {write_index()}")
