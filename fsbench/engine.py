"""The one evaluation loop every method shares.

`Runner.run(spec)` does one run in small steps, each with one job:

1. `prepare`: resolve the method config and the protocol, load (and validate) the datasets, take the
   few-shot draw, build the protocol's episode and the identity of every result it will write
   (`fsbench.identity`) -- no model is built;
2. `decide`: reuse the stored results if their identity is the same; refuse (`ResultConflict`)
   to replace a finished result of a different identity without `--force`;
3. `execute`: build the backbone, fit the method on the episode's few-shot sets, and score every
   evaluation set (retargeting the method to unseen classes where the protocol asks for it);
4. `record`: write one result file per target, never replacing a finished result by a failed one.

The runner keeps the last backbone, datasets and the feature cache alive, so consecutive runs on
the same (backbone, dataset) pay for loading and encoding once; evaluation sets index into whole
test splits, so every protocol shares the cached test features.
"""

from __future__ import annotations

import dataclasses
import resource
import shutil
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path

import torch

from fsbench import adapters, identity
from fsbench.backbones import Backbone, BackboneSpec, build_backbone
from fsbench.config import BenchConfig
from fsbench.data import DatasetSplits
from fsbench.data.base import Item
from fsbench.errors import ConfigError, DataError, FsbenchError, RunFailed
from fsbench.features import FeatureCache
from fsbench.images import BadImageError, bad_images_error, image_loader, scan_images
from fsbench.io import ensure_writable, remove_stale_temp  # noqa: F401 (re-exported)
from fsbench.method import Context, FeatureSource, FewShotData, Method, NotApplicable
from fsbench.protocols import ClassSet, Episode, EvalSet, Target, make_protocol
from fsbench.resolve import Decision, Prepared, Resolver, ResultConflict  # noqa: F401 (re-exported)
from fsbench.results import Result, cell_lock, file_fingerprint, read_result, write_result
from fsbench.spec import PROTOCOL_VERSION, RunSpec, config_hash  # noqa: F401 (re-exported)
from fsbench.splits import (
    FewShotSplit,
)
from fsbench.versions import versions

Track = Callable[[Iterable, int, str], Iterable]


def resolve_device(name: str) -> torch.device:
    """"auto" picks CUDA when available; an unavailable CUDA device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked but CUDA is not available; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision: bf16 where supported, fp16 on older GPUs, none on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent, exact (integer count of hits over the number of samples)."""
    if len(labels) == 0:
        return float("nan")
    hits = int((logits.argmax(dim=-1).cpu() == labels.cpu()).sum())
    return 100.0 * hits / len(labels)


def calibration_error(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Expected calibration error (15 bins, percent) of the softmax of `logits`."""
    from fsbench.metrics import ece

    if len(labels) == 0:
        return None
    conf, pred = logits.float().softmax(-1).max(-1)
    return float(ece(conf.numpy(), (pred == labels).numpy(), 15))


def peak_memory(device: torch.device) -> int:
    """Peak GPU memory of the run on CUDA; the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


class Runner(Resolver):
    """Runs `RunSpec`s against one runtime configuration, caching what runs can share: the resolver's
    datasets and draws, the last backbone, and the feature cache."""

    def __init__(self, cfg: BenchConfig, track: Track | None = None, writable: bool = True):
        super().__init__(cfg, track, writable)
        rt = cfg.runtime
        if writable:
            for folder in (rt.results, rt.cache_dir):  # temp files a killed writer left behind
                remove_stale_temp(folder)
        self.device = resolve_device(rt.device)
        self.workers = None if rt.workers < 0 else rt.workers
        self.features = FeatureCache(rt.cache_dir, self.device, rt.eval_batch_size, self.workers)
        self._backbone: tuple[BackboneSpec, Backbone] | None = None

    def backbone(self, spec: RunSpec) -> Backbone:
        bspec = BackboneSpec(spec.backbone, spec.pretrained or None, spec.checkpoint or None)
        if self._backbone is None or self._backbone[0] != bspec:
            self._backbone = None  # free the previous model before building the next
            self._backbone = (bspec, build_backbone(bspec, self.device))
        return self._backbone[1]

    # ---- the run ----------------------------------------------------------------------------------
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
            prep = self.prepare(spec)
        except FsbenchError as exc:
            if not record_errors:
                raise
            return [self._failed_stub(spec, exc)], False
        force = force or spec.replace
        decision = self.decide(prep, force)
        if decision.action == "conflict":
            raise ResultConflict(decision.reason)
        if decision.action == "reuse" or (decision.action == "failed" and not retry_failed):
            return [r for r in decision.stored.values() if r is not None], True
        results = self._attempt(prep, record_errors)
        try:
            return [self._record(prep, r) for r in results], False
        except RunFailed as exc:  # the results could not be written (disk full): a failed run, not an abort
            if not record_errors:
                raise
            _fail({r.dataset: r for r in results}, str(exc))
            return results, False

    def _failed_stub(self, spec: RunSpec, exc: BaseException) -> Result:
        """A failed result for a run that could not even be prepared (not written: nothing to compare)."""
        return Result(method=spec.label or spec.method, backbone=spec.backbone, dataset=spec.dataset,
                      shots=spec.shots, seed=spec.seed, status="failed", error=str(exc),
                      protocol=spec.protocol, versions=versions(), created_at=_now())

    def _record(self, prep: Prepared, result: Result) -> Result:
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
                write_result(self.cfg.runtime.results, result)
        except OSError as exc:
            raise RunFailed(f"cannot write the result to {path} ({exc.strerror or exc}); free space or choose "
                            "another folder with --results DIR") from None
        return result

    def _attempt(self, prep: Prepared, record_errors: bool) -> list[Result]:
        results = {t.dataset: self._blank(prep, t) for t in prep.episode.results}
        try:
            self._execute(prep, results)
        except BadImageError:
            error = self._bad_images(prep)  # every unreadable file, not only the first
            if not record_errors:
                raise error from None
            _fail(results, str(error))
        except (RunFailed, torch.OutOfMemoryError) as exc:
            _fail(results, _failure_message(exc))
        except Exception as exc:
            if not record_errors:
                raise
            _fail(results, _error_line(exc), traceback.format_exc())
        for r in results.values():
            r.created_at = _now()
        return list(results.values())

    def _blank(self, prep: Prepared, target: Target) -> Result:
        spec, cls, protocol = prep.spec, prep.cls, prep.protocol
        result = Result(method=spec.label or cls.name, backbone=spec.backbone, dataset=target.dataset,
                        shots=spec.shots, seed=spec.seed, pretrained=spec.pretrained or None,
                        config=dataclasses.asdict(prep.config), config_hash=config_hash(cls.name, prep.config, spec),
                        device=str(self.device), versions=versions(), protocol=protocol.name,
                        protocol_version=protocol.version,
                        source_dataset=prep.episode.source if protocol.source_result else None,
                        identity=prep.identities[target.dataset], identity_hash=prep.identity_hash(target.dataset))
        result.split_checksum = prep.split.checksum(self._data(prep.episode.source))
        source = identity.source_digest(cls)
        if source:  # a plug-in: which code made the number
            result.extra["method_source"] = f"sha256:{source}"
        if spec.label:
            result.extra["base_method"] = cls.name
        return result

    # ---- 3. execute: fit once, score every evaluation set ------------------------------------------
    def _execute(self, prep: Prepared, results: dict[str, Result]) -> None:
        spec, episode = prep.spec, prep.episode
        source = self._data(episode.source)
        self._check_free_space()
        if (prep.cls.eval_input or prep.cls.input_kind) == "images":  # an unreadable test image: before training
            self._scan_once([it for t in episode.results for ev in t.evals
                             for it in self._eval_items(ev)], source.image_root)
        backbone = self.backbone(spec)
        torch.manual_seed(spec.seed)  # dropout and other module-level randomness
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        features = FeatureSource(self.features, backbone, source, self._progress("encode"))
        ctx = Context(backbone, episode.classes, self.device, spec.seed, spec.shots, amp_dtype(self.device),
                      self.workers, self.track, features)
        method = prep.cls(prep.config, ctx)
        train, val = self.fewshot(prep.cls, backbone, source, episode)
        start = time.perf_counter()
        method.fit(train, val)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        train_seconds = time.perf_counter() - start
        if self.cfg.runtime.save_adapters:  # what the method learned, before it sees test data
            adapters.save_adapter(method, self.adapter_dir(prep), spec,
                                  prep.identity_hash(episode.results[0].dataset))
        for target in episode.results:
            r = results[target.dataset]
            r.config = dataclasses.asdict(method.config)  # the values that ran (methods resolve placeholders)
            r.train_seconds = train_seconds
            self._evaluate(method, backbone, prep, target, r)
            r.peak_memory_bytes = peak_memory(self.device)
            r.trainable_params = method.trainable_params()
            r.inference_overhead = method.inference_overhead()
            if "skipped_images" in source.extra:
                r.extra["skipped_images"] = len(source.extra["skipped_images"])

    def _evaluate(self, method: Method, backbone: Backbone, prep: Prepared, target: Target, result: Result) -> None:
        """Score every evaluation set of `target` and turn the accuracies into the protocol's metrics."""
        accs: dict[str, float | None] = {}
        ece_of: dict[str, float | None] = {}
        start = time.perf_counter()
        n = 0
        for ev in sorted(target.evals, key=lambda e: e.classes.rows_in(prep.episode.classes) is None):
            try:
                logits, labels = self.eval_logits(method, backbone, prep.episode.classes, ev)
            except NotApplicable as exc:
                accs[ev.metric] = None
                result.not_applicable[ev.metric] = str(exc)
                continue
            if not torch.isfinite(logits).all():
                raise RunFailed(f"non-finite logits on the {ev.dataset} test set")
            accs[ev.metric] = accuracy(logits, labels)
            ece_of[ev.metric] = calibration_error(logits, labels)
            n += len(labels)
        result.eval_seconds = time.perf_counter() - start
        result.metrics = prep.protocol.metrics(accs)
        for name in prep.protocol.metric_names:
            if result.metrics.get(name) is None and name not in result.not_applicable and result.not_applicable:
                result.not_applicable[name] = "needs " + ", ".join(sorted(result.not_applicable))
        headline = prep.protocol.headline
        # ECE of the headline set, else of the first set scored (base2new: base); per set when several
        result.metrics["ece"] = ece_of.get(headline, next(iter(ece_of.values()), None))
        if len(target.evals) > 1:
            result.metrics.update({f"ece_{k}": v for k, v in ece_of.items()})
        result.top1 = result.metrics.get(headline)
        result.n_test = n

    def _eval_items(self, ev: EvalSet) -> list[Item]:
        test = self._data(ev.dataset).test
        return [test[i] for i in ev.positions]

    def fewshot(self, cls: type[Method], backbone: Backbone, data: DatasetSplits,
                episode: Episode | FewShotSplit) -> tuple[FewShotData, FewShotData]:
        """The episode's train and val sets (labels = class indices in the fitted class set), with cached
        features for feature methods. A bare `FewShotSplit` means its few-shot episode (all classes)."""
        if isinstance(episode, FewShotSplit):
            episode = make_protocol("fewshot").episode(data, episode.train, episode.val, {})
        out = []
        for name, index, targets in (("train", episode.train, episode.train_targets),
                                     ("val", episode.val, episode.val_targets)):
            items = [Item(data.split(name)[i].path, t) for i, t in zip(index, targets, strict=True)]
            labels = torch.tensor(list(targets), dtype=torch.long)
            feats = None
            if cls.input_kind == "features":
                feats = self.features.split(backbone, data, name, index, self._progress(f"encode {name}")).x
            out.append(FewShotData(items, labels, data.image_root, feats, tuple(index), name))
        return out[0], out[1]

    @torch.no_grad()
    def eval_logits(self, method: Method, backbone: Backbone, fitted: ClassSet,
                    ev: EvalSet) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of `ev`'s test images over `ev.classes`: a subset of the fitted classes selects rows;
        other classes retarget the method (which may raise `NotApplicable`)."""
        rows = ev.classes.rows_in(fitted)
        want = fitted if rows is not None else ev.classes
        if method.ctx.classes != want:
            previous, method.ctx.classes = method.ctx.classes, want
            try:
                method.retarget()
            except NotApplicable:
                method.ctx.classes = previous
                raise
        logits, _ = self.test_logits(method, backbone, self._data(ev.dataset), ev.positions)
        if rows is not None and rows != list(range(len(fitted))):
            logits = logits[:, rows]
        return logits, torch.tensor(ev.targets, dtype=torch.long)

    @torch.no_grad()
    def test_logits(self, method: Method, backbone: Backbone, data: DatasetSplits,
                    positions: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits on test images (default: the whole split): cached features, or images through the method."""
        bs = self.cfg.runtime.eval_batch_size
        if (method.eval_input or method.input_kind) == "features":
            tag, encode = method.eval_encoder or ("", None)
            feats = self.features.items(backbone, data, "test", backbone.preprocess, positions, tag=tag,
                                        encode=encode, progress=self._progress("encode test"))
            chunks = [method.logits(feats.x[i:i + bs].to(self.device)).float().cpu()
                      for i in range(0, len(feats.y), bs)]
            return _cat(chunks), feats.y
        items = data.test if positions is None else [data.test[i] for i in positions]
        loader = image_loader(items, data.image_root, backbone.preprocess, bs, self.device, workers=self.workers)
        chunks, labels = [], []
        for images, y in self.track(loader, len(loader), "evaluate"):
            with torch.autocast(self.device.type, dtype=amp_dtype(self.device) or torch.bfloat16,
                                enabled=amp_dtype(self.device) is not None):
                chunks.append(method.logits(images.to(self.device, non_blocking=True)).float().cpu())
            labels.append(y)
        return _cat(chunks), _cat(labels)

    # ---- failures ----------------------------------------------------------------------------------
    def _scan_once(self, items: list[Item], root: Path) -> None:
        """Decode `items` once per content (the scan is cached by their digest) and name every bad file."""
        key = identity.items_digest(root, items)
        mark = Path(self.cfg.runtime.cache_dir) / "image_scan" / f"ok-{key}"
        if mark.is_file():
            return
        bad = scan_images(items, root, self.track, "check test images")
        if bad:
            raise bad_images_error(sorted({it.path for it in bad}), root, self.cfg.runtime.skip_bad_images)
        try:
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.touch()
        except OSError:
            pass

    def _check_free_space(self) -> None:
        """Fail before training when the results or cache disk is (nearly) full."""
        for folder, flag in ((self.cfg.runtime.results, "--results DIR"),
                             (self.cfg.runtime.cache_dir, "--set runtime.cache_dir=DIR")):
            path = Path(folder).absolute()
            existing = next(p for p in (path, *path.parents) if p.exists())
            free = shutil.disk_usage(existing).free
            if free < MIN_FREE_BYTES:
                raise RunFailed(f"only {free // 1024} KiB free under {existing}; free some space or choose "
                                f"another folder with {flag}")

    def _bad_images(self, prep: Prepared) -> DataError:
        """One error naming every unreadable file the run reads: its few-shot images and its test sets."""
        data = self._data(prep.episode.source)
        items = [data.train[i] for i in prep.episode.train] + [data.val[i] for i in prep.episode.val]
        bad = scan_images(items, data.image_root, self.track, "find unreadable images")
        for t in prep.episode.results:
            for ev in t.evals:
                ev_data = self._data(ev.dataset)
                bad += scan_images(self._eval_items(ev), ev_data.image_root, self.track, "find unreadable images")
        return bad_images_error(sorted({it.path for it in bad}), data.image_root, self.cfg.runtime.skip_bad_images)

    def _progress(self, desc: str) -> Callable:
        return lambda it, total: self.track(it, total, desc)


MIN_FREE_BYTES = 16 * 1024 * 1024  # a result is KBs, a cache shard MBs: below this a run would fail to record


def _check_meanwhile(prep: Prepared, result: Result, path: Path, old: Result | None) -> None:
    """Refuse to replace a finished result another run wrote after this one decided to run (two runs of one
    cell started together): one line, the other run's result kept."""
    if file_fingerprint(path) == prep.seen.get(result.dataset, file_fingerprint(path)):
        return  # what this run saw when it decided (or nothing was recorded: a direct call)
    if old is None or old.status != "ok" or old.identity_hash == result.identity_hash:
        return  # nothing finished in the way, or the same run
    what = identity.describe_change(old.identity or None, result.identity)
    raise ResultConflict(f"{path} was written by another run meanwhile (its {what} is not this run's); this run's "
                         f"result (top1 {_fmt(result.top1)}) was not written: run it again with --results DIR to keep "
                         "both, or with --force to replace that one")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _fail(results: dict[str, Result], error: str, trace: str | None = None) -> None:
    for r in results.values():
        r.status, r.error = "failed", error
        r.top1, r.metrics = None, {}
        if trace:
            r.extra["traceback"] = trace


def _cat(chunks: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(chunks) if chunks else torch.zeros(0)


def _error_line(exc: BaseException) -> str:
    """"Type: first line of the message" of an unexpected error."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _failure_message(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return ("out of memory: lower the batch size (e.g. --set <method>.batch_size=16) "
                "or use a smaller backbone")
    return str(exc)
