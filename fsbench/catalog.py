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

import contextlib
import contextvars
import copy
import dataclasses
import difflib
import functools
import sys
import typing
from collections.abc import Iterable, Iterator
from pathlib import Path
from pprint import pformat
from typing import Any

from fsbench.errors import UnknownNameError

INDEX_FILE = Path(__file__).with_name("catalog_index.py")
# within `static_methods()`: what it learned ("installed": whether methods outside the index may exist;
# "classes": method name -> stand-in class)
_STATIC: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("static_methods", default=None)


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


def _known_composition(name: str, idx: dict[str, Any]) -> bool:
    """METHOD+STEP (`fsbench.transduction`) with a known method and a known transductive step."""
    base, _, step = name.partition("+")
    return base in idx["methods"] and step in idx.get("transductive_steps", [])


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
            if "+" in name and not _known_composition(name.lower(), idx):  # the live registry says what is wrong
                from fsbench.method import METHODS

                METHODS.get(name)
            elif "+" not in name and name.lower() not in idx["methods"]:
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


# ---- the planner's view of a method, without its code ---------------------------------------------------------
@contextlib.contextmanager
def static_methods() -> Iterator[None]:
    """Within: `method_class` answers fsbench's own methods from the index (a stand-in class: name, version,
    validation request, input kind and a `Config` dataclass of the same fields, types and defaults), so a
    plan (`fsbench sweep --dry-run`) imports no torch. Keys and types of a method's settings are checked;
    the ranges its own `Config.__post_init__` checks are checked when it runs."""
    token = _STATIC.set({"classes": {}})
    try:
        yield
    finally:
        _STATIC.reset(token)


def method_class(name: str) -> type:
    """The method registered as `name`: within `static_methods()`, its stand-in from the index when the index
    describes it (`plan` set: an fsbench method whose planning needs no code of its own); else the live class
    (which imports torch and every method)."""
    known = _static_state()
    if known is not None:
        name = name.lower()
        record = index()["methods"].get(name, {}).get("plan")
        if record is not None:
            if name not in known["classes"]:
                known["classes"][name] = _stand_in(name, record)
            return known["classes"][name]
    from fsbench.method import METHODS

    return METHODS.get(name)


def _static_state() -> dict[str, Any] | None:
    """The state of the enclosing `static_methods()`, or None outside it or when methods outside the index may
    exist (a plug-in, an entry point, a new method file: then the live registry answers). Whether an installed
    extra exists is looked up once per context (a lookup costs about 20 ms; a study plans thousands of runs)."""
    state = _STATIC.get()
    if state is None or any(name.startswith("fsbench_plugin_") for name in sys.modules):
        return None
    if "installed" not in state:
        state["installed"] = extra_methods_possible()
    return None if state["installed"] else state


def method_names() -> list[str]:
    """Every registered method name: from the index within `static_methods()` (when no plug-in or entry point
    may add some), else the live registry's."""
    if _static_state() is not None:
        return sorted(index()["methods"])
    from fsbench.method import METHODS

    return METHODS.names()


_TYPES = {"typing": typing}  # what a field's type text (`_type_text`) is evaluated with


def _type_text(tp: Any) -> str | None:
    """A config field's type as text that evaluates back to it (`_TYPES`), or None if it does not."""
    text = tp.__name__ if isinstance(tp, type) and not typing.get_args(tp) else repr(tp)
    try:
        return text if eval(text, dict(_TYPES)) == tp else None  # noqa: S307 (our own generated text)
    except Exception:
        return None


def _plan_record(cls: type) -> dict[str, Any] | None:
    """What the planner needs of a method (`method_class`), or None when it needs the method's code: a method
    outside fsbench, one with a shared stage (`reference_seed` depends on its config), a field type or default
    the index cannot hold."""
    from fsbench.method import Method

    if not cls.__module__.startswith("fsbench.") or "reference_seed" in {
            k for c in cls.__mro__ if c is not Method for k in vars(c)}:
        return None
    hints, defaults = typing.get_type_hints(cls.Config), dataclasses.asdict(cls.Config())
    fields = [[f.name, _type_text(hints[f.name]), defaults[f.name]] for f in dataclasses.fields(cls.Config)]
    if any(text is None for _, text, _ in fields):
        return None
    return {"module": cls.__module__, "version": cls.version, "input": cls.input_kind,
            "val_request": cls.val_request, "config": fields}


def _stand_in(name: str, record: dict[str, Any]) -> type:
    """The planner's class for the method `name`: its name, module, version, validation request, input kind and
    a `Config` dataclass of the method's fields, types and defaults (without the method's range checks)."""
    fields = [(field, eval(text, dict(_TYPES)),  # noqa: S307 (our own generated text)
               dataclasses.field(default_factory=functools.partial(copy.deepcopy, default)))
              for field, text, default in record["config"]]
    config = dataclasses.make_dataclass(f"{name.title().replace('_', '')}Config", fields)
    return type(name, (), {"__module__": record["module"], "name": name, "Config": config, "static": True,
                           "version": record["version"], "input_kind": record["input"],
                           "val_request": record["val_request"],
                           "reference_seed": classmethod(lambda cls, config: None),
                           "user_overrides": classmethod(lambda cls, sections: dict(sections.get(cls.name, {})))})


def build() -> dict[str, Any]:
    """The index, from the live registries (imports torch, open_clip and every method)."""
    import open_clip

    from fsbench.backbones import _ALIAS_KEYS, ALIASES, BACKBONES, PAPER_BACKBONES, TINY_FAMILIES
    from fsbench.data import DATASETS
    from fsbench.method import METHODS
    from fsbench.protocols import PROTOCOLS
    from fsbench.transduction import steps

    own = [n for n in METHODS.names() if METHODS.get(n).__module__.startswith("fsbench.")]
    methods = {n: {"input": METHODS.get(n).input_kind, "unseen": METHODS.get(n).scores_unseen_classes(),
                   "summary": METHODS.get(n).summary, "paper": METHODS.get(n).paper,
                   "plan": _plan_record(METHODS.get(n))} for n in own}
    builtin = [n for n in PROTOCOLS.names() if PROTOCOLS.get(n).__module__.startswith("fsbench.")]
    protocols = {n: {"version": PROTOCOLS.get(n).version, "metrics": list(PROTOCOLS.get(n).metric_names),
                     "summary": PROTOCOLS.get(n).summary} for n in builtin}
    shown = [k.upper().replace("VIT", "ViT") for k in PAPER_BACKBONES] + list(ALIASES) + BACKBONES.names()
    return {
        "methods": methods,
        "transductive_steps": [n for n in steps() if n in own],  # what may follow METHOD+ (fsbench.transduction)
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
