"""A small decorator registry with "did you mean" answers and entry-point plug-ins."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import pkgutil
import sys
import traceback
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Generic, TypeVar

from fsbench.errors import ConfigError, FsbenchError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps lowercase names to objects; duplicates are an error, typos get a suggestion.

    Args:
        kind: what is registered ("method", "dataset", ...), used in messages.
        entry_point_group: optional `importlib.metadata` group scanned on first lookup.
        base: optional class every registered object must subclass.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None, base: type | None = None):
        _REGISTRIES.append(self)
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.base = base
        self._items: dict[str, T] = {}
        self._loaders: list[Callable[[], None]] = []
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@REGISTRY.register("name")`."""
        if name != name.lower() or not name:
            raise ValueError(f"{self.kind} names are lowercase and non-empty, got {name!r}")

        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self._items[name]!r}")
            if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
                raise TypeError(f"{self.kind} {name!r} must subclass {self.base.__name__}")
            self._items[name] = obj
            if isinstance(obj, type):
                obj.name = name  # type: ignore[attr-defined]
            return obj

        return deco

    def forget_module(self, module: str) -> None:
        """Drop what `module` registered (a plug-in file loaded again after it was edited)."""
        self._items = {k: v for k, v in self._items.items() if getattr(v, "__module__", None) != module}

    def add_loader(self, loader: Callable[[], None]) -> None:
        """Run `loader` (which imports modules that register) before the first lookup."""
        self._loaders.append(loader)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for loader in self._loaders:
            loader()
        if self.entry_point_group:
            for ep in entry_points(group=self.entry_point_group):
                ep.load()

    def get(self, name: str) -> T:
        """Return the object registered as `name` or raise a did-you-mean error."""
        self._load()
        key = name.lower()
        if key in self._items:
            return self._items[key]
        raise UnknownNameError(self._unknown_message(name))

    def _unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name.lower(), list(self._items), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(self._items))}"
        return f"unknown {self.kind} {name!r}{hint}"

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def aliases(self) -> dict[str, list[str]]:
        """{first registered name: the other names of the same object}, sorted by name."""
        self._load()
        groups: dict[int, list[str]] = {}
        for name, obj in self._items.items():  # registration order: the first name is the main one
            groups.setdefault(id(obj), []).append(name)
        return dict(sorted((names[0], sorted(names[1:])) for names in groups.values()))

    def canonical(self, name: str) -> str:
        """The main name of what `name` registers ("pets" -> "oxford_pets"); did-you-mean if unknown."""
        obj = self.get(name)
        return next(n for n, o in self._items.items() if o is obj)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


_REGISTRIES: list[Registry] = []


def load_plugin(path: str | Path) -> None:
    """Import a user's Python file so that its `@register_method` decorators run. A file edited since it was
    loaded in this process is loaded again (its old registrations dropped); an error in it is one line,
    `file:line: message` (ConfigError, exit 2)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"plugin file {path} does not exist")
    source = path.read_bytes()
    name = f"fsbench_plugin_{path.stem}"
    loaded = sys.modules.get(name)
    if loaded is not None and Path(loaded.__file__ or "").resolve() == path.resolve() \
            and getattr(loaded, "__fsbench_source__", None) == source:
        return  # already loaded in this process: its methods are registered
    if loaded is not None:
        for registry in _REGISTRIES:
            registry.forget_module(name)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    module.__fsbench_source__ = source  # type: ignore[attr-defined]
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(spec.name, None)
        raise ConfigError(f"{exc.filename or path}:{exc.lineno}: {exc.msg}") from None
    except FsbenchError:
        sys.modules.pop(spec.name, None)
        raise
    except Exception as exc:  # an error while the plug-in's own code runs: its innermost line in the file
        sys.modules.pop(spec.name, None)
        line = next((f.lineno for f in reversed(traceback.extract_tb(exc.__traceback__))
                     if Path(f.filename).resolve() == path.resolve()), "?")
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"{path}:{line}: {type(exc).__name__}: {first}") from None


def import_all(package: str) -> None:
    """Import every module of `package` (each registers what it defines)."""
    pkg = importlib.import_module(package)
    names = {m.name for m in pkgutil.iter_modules(getattr(pkg, "__path__", []))}  # every folder of its path
    for name in sorted(names):
        if not name.startswith("_"):
            importlib.import_module(f"{package}.{name}")
