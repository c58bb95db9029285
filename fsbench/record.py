"""The recorder: a run's result files, and the rule that a failed run never destroys a number.

One of the runner's three parts (`fsbench.resolve` plans, `fsbench.execute` fits and scores, this module
records). It turns a prepared run into blank results (spec, config, identity, versions), marks them
failed with one line when the run breaks, and writes them atomically, keeping a finished result on
disk when the new one failed. Torch-free.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from pathlib import Path

from fsbench import identity
from fsbench.errors import RunFailed
from fsbench.protocols import Target
from fsbench.resolve import Prepared, ResultConflict
from fsbench.results import Result, cell_lock, file_fingerprint, read_result, write_result
from fsbench.spec import RunSpec, config_hash
from fsbench.versions import versions


class Recorder:
    """Writes the results of runs into `results_dir`."""

    def __init__(self, results_dir: str | Path):
        self.results_dir = results_dir

    def blank(self, prep: Prepared, target: Target, device: str, split_checksum: str) -> Result:
        """The result of `target` before the run: everything but the numbers."""
        spec, cls, protocol = prep.spec, prep.cls, prep.protocol
        result = Result(method=spec.label or cls.name, backbone=spec.backbone, dataset=target.dataset,
                        shots=spec.shots, seed=spec.seed, pretrained=spec.pretrained or None,
                        config=dataclasses.asdict(prep.config), config_hash=config_hash(cls.name, prep.config, spec),
                        device=device, versions=versions(), protocol=protocol.name,
                        protocol_version=protocol.version,
                        source_dataset=prep.episode.source if protocol.source_result else None,
                        identity=prep.identities[target.dataset], identity_hash=prep.identity_hash(target.dataset))
        result.split_checksum = split_checksum
        source = identity.source_digest(cls)
        if source:  # a plug-in: which code made the number
            result.extra["method_source"] = f"sha256:{source}"
        if spec.label:
            result.extra["base_method"] = cls.name
        return result

    def failed_stub(self, spec: RunSpec, exc: BaseException) -> Result:
        """A failed result for a run that could not even be prepared (not written: nothing to compare)."""
        return Result(method=spec.label or spec.method, backbone=spec.backbone, dataset=spec.dataset,
                      shots=spec.shots, seed=spec.seed, status="failed", error=str(exc),
                      protocol=spec.protocol, versions=versions(), created_at=now())

    def write(self, prep: Prepared, result: Result) -> Result:
        """Write `result`, unless it failed and a finished result is stored there: a failed run never
        destroys a number, not even under --force (the failure is reported, the old result kept)."""
        path = prep.paths[result.dataset]
        try:
            with cell_lock(path):  # another run of this cell checks and renames after us, never in between
                old = read_result(path) if path.is_file() else None
                if result.status != "ok" and old is not None and old.status == "ok":
                    result.extra["not_written"] = f"a finished result is kept at {path}"
                    return result
                _check_meanwhile(prep, result, path, old)
                write_result(self.results_dir, result)
        except OSError as exc:
            raise RunFailed(f"cannot write the result to {path} ({exc.strerror or exc}); free space or choose "
                            "another folder with --results DIR") from None
        return result


def _check_meanwhile(prep: Prepared, result: Result, path: Path, old: Result | None) -> None:
    """Refuse to replace a finished result another run wrote after this one decided to run (two runs of one
    cell started together): one line, the other run's result kept."""
    if file_fingerprint(path) == prep.seen.get(result.dataset, file_fingerprint(path)):
        return  # what this run saw when it decided (or nothing was recorded: a direct call)
    if old is None or old.status != "ok" or old.identity_hash == result.identity_hash:
        return  # nothing finished in the way, or the same run
    what = identity.describe_change(old.identity or None, result.identity)
    top1 = "-" if result.top1 is None else f"{result.top1:.2f}"
    raise ResultConflict(f"{path} was written by another run meanwhile (its {what} is not this run's); this run's "
                         f"result (top1 {top1}) was not written: run it again with --results DIR to keep "
                         "both, or with --force to replace that one")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def fail(results: dict[str, Result], error: str, trace: str | None = None) -> None:
    """Mark every result of a run failed with `error` (one line) and no numbers."""
    for r in results.values():
        r.status, r.error = "failed", error
        r.top1, r.metrics = None, {}
        if trace:
            r.extra["traceback"] = trace
