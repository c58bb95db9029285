"""What a sweep did: each run's outcome, running counts, and the plan and summary tables."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.markup import escape
from rich.table import Table

from fsbench.results import Result
from fsbench.spec import RunSpec
from fsbench.sweep.plan import Plan, group_key


@dataclass
class Outcome:
    """One run as the sweep saw it. `result` is None when the run was lost (its worker died)."""

    spec: RunSpec
    result: Result | None
    seconds: float  # wall time of the run on its worker, model and dataset loading included
    error: str | None = None  # why a run was lost

    @property
    def failed(self) -> bool:
        return self.result is None or self.result.status != "ok"

    @property
    def message(self) -> str:
        return self.error or (self.result.error if self.result else None) or ""


@dataclass
class Tally:
    """Running counts of a sweep; `stop` turns true once more than `max_failures` runs failed."""

    total: int
    max_failures: int = -1
    on_record: Callable[[Tally], None] = lambda tally: None
    outcomes: list[Outcome] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def record(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self.on_record(self)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.failed]

    @property
    def stop(self) -> bool:
        return self.max_failures >= 0 and len(self.failures) > self.max_failures

    def gpu_seconds(self) -> list[float]:
        """Wall times of the runs that ran on a GPU."""
        return [o.seconds for o in self.outcomes if o.result and (o.result.device or "").startswith("cuda")]


def _spec_cells(spec: RunSpec) -> list[str]:
    return [spec.label or spec.method, spec.backbone, spec.dataset, str(spec.shots), str(spec.seed)]


def plan_table(plan: Plan) -> Table:
    """The plan grouped by (protocol, backbone, dataset): methods, runs to do, done, failed earlier, changed."""
    table = Table(title="sweep plan")
    changed = [spec for spec, _ in plan.conflicts]
    groups = {"to do": plan.todo, "done": plan.done, "failed": plan.failed, "changed": changed}
    states = [s for s in groups if s in ("to do", "done") or groups[s]]  # failed / changed when there are some
    for col in ("protocol", "backbone", "dataset", "methods", *states):
        table.add_column(col, justify="right" if col in states else "left", overflow="fold")
    counts: dict[tuple[str, str, str], Counter] = {}
    methods: dict[tuple[str, str, str], dict[str, None]] = {}
    for state, specs in ((s, groups[s]) for s in states):
        for spec in specs:
            key = (spec.protocol, *group_key(spec))
            counts.setdefault(key, Counter())[state] += 1
            methods.setdefault(key, {})[spec.label or spec.method] = None
    for key, count in counts.items():
        names = list(methods[key])
        shown = ", ".join(names) if len(names) <= 4 else f"{len(names)} methods/variants"
        table.add_row(*key, shown, *(str(count[s]) for s in states))
    return table


def plan_line(plan: Plan) -> str:
    line = f"{len(plan.todo)} runs to do, {len(plan.done)} already done (skipped)"
    if plan.failed:
        line += f", {len(plan.failed)} failed earlier (skipped; rerun them with --retry failed)"
    if plan.conflicts:
        line += f", {len(plan.conflicts)} changed since their finished result (kept; rerun with --retry changed)"
    return line


def failures_table(tally: Tally) -> Table:
    """One row per failed or lost run with the first line of its error."""
    table = Table(title="failed runs", title_style="bold red")
    for col in ("method", "backbone", "dataset", "shots", "seed", "error"):
        table.add_column(col)
    for o in tally.failures:
        table.add_row(*map(escape, _spec_cells(o.spec)), escape((o.message.splitlines() or [""])[0]))
    return table


def summary_line(tally: Tally, plan: Plan) -> str:
    """Runs done, skipped, failed and not started; wall time; GPU-hours (or CPU-only)."""
    failed = len(tally.failures)
    wall = time.strftime("%H:%M:%S", time.gmtime(time.monotonic() - tally.started))
    gpu_seconds = tally.gpu_seconds()
    gpu = f"{sum(gpu_seconds) / 3600:.2f} GPU-hours" if gpu_seconds else "CPU-only"
    line = (f"{len(tally.outcomes) - failed} done, {len(plan.done)} skipped (already done), "
            f"{failed} failed")
    if left := tally.total - len(tally.outcomes):
        line += f", {left} not started"
    return f"{line} | wall {wall} | {gpu}"
