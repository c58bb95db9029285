"""The runner: one run from its spec to its result files, in three parts with one job each.

1. plan (`fsbench.resolve.Resolver`): resolve the method config and the protocol, load and validate the
   datasets, take the few-shot draw, build the protocol's episode and the identity of every result, and
   decide: reuse the stored results, run, or refuse (`ResultConflict`) to replace a finished result of a
   different identity without `--force`. No model is built; the sweep planner uses this part alone;
2. execute (`fsbench.execute.Executor`): build the backbone, fit the method on the episode and score every
   evaluation set;
3. record (`fsbench.record.Recorder`): write one result file per target, never replacing a finished result
   by a failed one.

`Runner` only sequences them and turns failures into failed results; the parts never inherit from or
call into each other except through the values passed here.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable

import torch

from fsbench import adapters
from fsbench.config import BenchConfig
from fsbench.errors import FsbenchError, RunFailed
from fsbench.execute import Executor
from fsbench.images import BadImageError
from fsbench.io import remove_stale_temp
from fsbench.method import Method
from fsbench.record import Recorder, fail, now
from fsbench.resolve import Prepared, Resolver, ResultConflict
from fsbench.results import Result
from fsbench.spec import RunSpec

Track = Callable[[Iterable, int, str], Iterable]


class Runner:
    """Runs `RunSpec`s against one runtime configuration: `planner`, `executor` and `recorder` keep what runs
    can share (datasets and draws; the last backbone and the feature cache)."""

    def __init__(self, cfg: BenchConfig, track: Track | None = None, writable: bool = True):
        self.cfg = cfg
        self.planner = Resolver(cfg, track, writable)
        if writable:
            for folder in (cfg.runtime.results, cfg.runtime.cache_dir):  # temp files a killed writer left behind
                remove_stale_temp(folder)
        save = self._save_adapter if cfg.runtime.save_adapters else None
        self.executor = Executor(cfg, self.planner.track, self.planner.dataset, save)
        self.recorder = Recorder(cfg.runtime.results)

    def run(self, spec: RunSpec, force: bool = False, record_errors: bool = False) -> tuple[Result, bool]:
        """Run `spec` (or reuse its result); returns (its first result, reused). See `run_all`."""
        results, reused = self.run_all(spec, force, record_errors)
        return results[0], reused

    def run_all(self, spec: RunSpec, force: bool = False, record_errors: bool = False,
                retry_failed: bool = True) -> tuple[list[Result], bool]:
        """Run `spec` (or reuse its results); returns (one result per target, reused).

        `RunFailed` and out-of-memory are recorded as failed results; with `record_errors` (sweeps) so is
        any other error, a conflict excepted (it is raised: nothing may replace a finished result). A failed
        result never replaces a finished one on disk.
        """
        try:
            prep = self.planner.prepare(spec)
        except FsbenchError as exc:
            if not record_errors:
                raise
            return [self.recorder.failed_stub(spec, exc)], False
        decision = self.planner.decide(prep, force or spec.replace)
        if decision.action == "conflict":
            raise ResultConflict(decision.reason)
        if decision.action == "reuse" or (decision.action == "failed" and not retry_failed):
            return [r for r in decision.stored.values() if r is not None], True
        results = self._attempt(prep, record_errors)
        try:
            return [self.recorder.write(prep, r) for r in results], False
        except RunFailed as exc:  # the results could not be written (disk full): a failed run, not an abort
            if not record_errors:
                raise
            fail({r.dataset: r for r in results}, str(exc))
            return results, False

    def _attempt(self, prep: Prepared, record_errors: bool) -> list[Result]:
        checksum = prep.split.checksum(self.planner.dataset(prep.episode.source))
        results = {t.dataset: self.recorder.blank(prep, t, str(self.executor.device), checksum)
                   for t in prep.episode.results}
        try:
            self.executor.execute(prep, results)
        except BadImageError:
            error = self.executor.bad_images(prep)  # every unreadable file, not only the first
            if not record_errors:
                raise error from None
            fail(results, str(error))
        except (RunFailed, torch.OutOfMemoryError) as exc:
            fail(results, _failure_message(exc))
        except Exception as exc:
            if not record_errors:
                raise
            fail(results, _error_line(exc), traceback.format_exc())
        for r in results.values():
            r.created_at = now()
        return list(results.values())

    def _save_adapter(self, method: Method, prep: Prepared) -> None:
        adapters.save_adapter(method, self.planner.adapter_dir(prep), prep.spec,
                              prep.identity_hash(prep.episode.results[0].dataset))


def _error_line(exc: BaseException) -> str:
    """"Type: first line of the message" of an unexpected error."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _failure_message(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return ("out of memory: lower the batch size (e.g. --set <method>.batch_size=16) "
                "or use a smaller backbone")
    return str(exc)
