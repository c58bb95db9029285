"""The `local` executor: every run in this process, on one device, with one `Runner`."""

from __future__ import annotations

import time

from fsbench.config import BenchConfig
from fsbench.engine import Runner, Track
from fsbench.spec import RunSpec
from fsbench.sweep.summary import Outcome, Tally


def run_one(runner: Runner, spec: RunSpec, force: bool) -> Outcome:
    """Run `spec` (or take the result that a concurrent sweep wrote meanwhile); any exception
    inside the run becomes a failed result and never stops the sweep."""
    start = time.perf_counter()
    result, _ = runner.run(spec, force=force, record_errors=True)
    return Outcome(spec, result, time.perf_counter() - start)


def run_local(cfg: BenchConfig, specs: list[RunSpec], force: bool, tally: Tally,
              track: Track | None = None) -> None:
    """Run `specs` in order (grouped by backbone and dataset, so the Runner's model and caches
    are reused), until done or `tally.stop`."""
    runner = Runner(cfg, track)
    for spec in specs:
        if tally.stop:
            return
        tally.record(run_one(runner, spec, force))
