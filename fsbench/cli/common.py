"""Helpers shared by sub-commands: config assembly, progress bars, result tables."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from fsbench.cli.app import console
from fsbench.config import BenchConfig, apply_sets, load_bench
from fsbench.errors import ConfigError
from fsbench.results import Result

DEFAULT_CONFIG = Path("bench.toml")


def load_config(config: Path | None, sets: list[str] | None, **runtime) -> BenchConfig:
    """bench.toml (the given file, else ./bench.toml if present, else defaults) < --set <
    explicit runtime flags (those that are not None)."""
    if config is not None and not config.is_file():
        raise ConfigError(f"config file not found: {config}")
    path = config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    cfg = apply_sets(load_bench(path), list(sets or []))
    flags = [f"runtime.{k}={_toml(v)}" for k, v in runtime.items() if v is not None]
    return apply_sets(cfg, flags)


def sampler_set(sets: list[str] | None, sampler: str | None) -> list[str]:
    """`--set` overrides with `--sampler NAME` added as `study.sampler`."""
    return [*(sets or []), *([f"study.sampler={_toml(sampler)}"] if sampler is not None else [])]


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def split_list(values: list[str] | None) -> list[str]:
    """Accept repeated flags and comma-separated lists alike: --shots 1,2 --shots 4."""
    return [v.strip() for v in itertools.chain.from_iterable(x.split(",") for x in values or []) if v.strip()]


MAX_RANGE = 10_000  # items one "a-b" range may expand to


def int_list(values: list[str] | None, flag: str) -> list[int]:
    """Integers from repeated flags, comma lists and inclusive ranges: --seeds 1-10, --seeds 1-3,7.

    Duplicates are dropped (first occurrence kept); a malformed or descending range is a ConfigError.
    """
    out: dict[int, None] = {}  # an ordered set
    for item in split_list(values):
        lo, sep, hi = item.partition("-") if not item.startswith("-") else (item, "", "")
        try:
            ints = range(int(lo), int(hi) + 1) if sep else [int(item)]
        except ValueError:
            raise ConfigError(f"{flag} takes integers or ranges such as 1-10, got {item!r}") from None
        if sep and not 0 < len(ints) <= MAX_RANGE:
            raise ConfigError(f"{flag}: range {item!r} must run upwards over at most {MAX_RANGE} values, e.g. 1-10")
        out.update(dict.fromkeys(ints))
    return list(out)


def _headline(r: Result) -> str:
    """top1, or the protocol's metrics ("B 71.2 / N n/a / H n/a"); "n/a" where the method cannot produce one."""
    if r.protocol == "fewshot" or not r.metrics:
        return f"{r.top1:.2f}" if r.top1 is not None else "-"
    names = [k for k in r.metrics if not k.startswith("ece")]
    cells = [f"{k} {'n/a' if r.metrics[k] is None else format(r.metrics[k], '.2f')}" for k in names]
    return " / ".join(cells)


@contextlib.contextmanager
def progress_bars() -> Iterator[tuple[Progress, object]]:
    """A rich Progress and a `track(iterable, total, description)` that adds a bar per task."""
    bars = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=False)

    def track(iterable: Iterable, total: int, description: str) -> Iterator:
        task = bars.add_task(description, total=total)
        try:
            for item in iterable:
                yield item
                bars.advance(task)
        finally:
            bars.remove_task(task)

    with bars:
        yield bars, track


def results_table(results: list[Result], title: str = "results") -> Table:
    table = Table(title=title)
    for col in ("method", "backbone", "dataset", "shots", "seed", "top1", "train s", "params", "status"):
        table.add_column(col, justify="right" if col in ("shots", "seed", "top1", "train s", "params") else "left")
    for r in results:
        top1 = _headline(r)
        secs = f"{r.train_seconds:.1f}" if r.train_seconds is not None else "-"
        params = f"{r.trainable_params:,}" if r.trainable_params is not None else "-"
        status = r.status if r.status == "ok" else f"[red]{r.status}: {r.error}[/]"
        table.add_row(r.method, r.backbone, r.dataset, str(r.shots), str(r.seed), top1, secs, params, status)
    return table
