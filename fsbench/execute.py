"""The executor: fit a method on a prepared episode and score every evaluation set.

One of the runner's three parts (`fsbench.resolve` plans, this module executes, `fsbench.record`
records). It keeps the last backbone and the feature cache alive, so consecutive runs on the same
(backbone, dataset) pay for loading and encoding once; evaluation sets index into whole test splits,
so every protocol shares the cached test features. It reads datasets through the planner's loader
and writes nothing but caches.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from fsbench import identity
from fsbench.backbones import Backbone, BackboneSpec, build_backbone
from fsbench.config import BenchConfig
from fsbench.data import DatasetSplits
from fsbench.data.base import Item
from fsbench.device import amp_dtype, autocast, peak_memory, resolve_device
from fsbench.errors import DataError, RunFailed
from fsbench.features import FeatureCache
from fsbench.images import bad_images_error, image_loader, scan_images
from fsbench.method import Context, FeatureSource, FewShotData, Method, NotApplicable
from fsbench.metrics import accuracy
from fsbench.protocols import (
    MS_PER_IMAGE,
    SCORING_PEAK_MIB,
    ClassSet,
    Episode,
    EvalSet,
    Target,
    make_protocol,
    test_time_mode,
)
from fsbench.resolve import Prepared
from fsbench.results import Result
from fsbench.spec import RunSpec
from fsbench.splits import FewShotSplit
from fsbench.tta_views import view_seed

Track = Callable[[Iterable, int, str], Iterable]


def calibration_error(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Expected calibration error (15 bins, percent) of the softmax of `logits`."""
    from fsbench.metrics import ece

    if len(labels) == 0:
        return None
    conf, pred = logits.float().softmax(-1).max(-1)
    return float(ece(conf.numpy(), (pred == labels).numpy(), 15))


class ScoringClock:
    """Wall-clock time inside a method's scoring calls (`logits`, `online_logits`, `transductive_logits`) and the
    inputs they scored, for a protocol that records the cost of scoring (`Protocol.scoring_cost`). A call is
    timed until its scores are on the CPU, so asynchronous GPU work counts; loading and decoding images and
    reading cached features fall outside."""

    def __init__(self) -> None:
        self.seconds, self.images = 0.0, 0

    def timed(self, score: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """`score` returning detached float32 CPU scores, its time and input count added to the clock."""
        def run(x: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            out = score(x).detach().float().cpu()
            self.seconds += time.perf_counter() - start
            self.images += len(x)
            return out
        return run

    def metrics(self, peak_bytes: int) -> dict[str, float | None]:
        """Milliseconds per scored image and the peak memory of scoring in MiB (None when nothing was scored)."""
        if not self.images:
            return {MS_PER_IMAGE: None, SCORING_PEAK_MIB: None}
        return {MS_PER_IMAGE: 1000.0 * self.seconds / self.images, SCORING_PEAK_MIB: peak_bytes / 2**20}


class Executor:
    """Fits and scores prepared runs on one device; `dataset(name)` is the planner's dataset loader."""

    def __init__(self, cfg: BenchConfig, track: Track, dataset: Callable[[str], DatasetSplits],
                 save_adapter: Callable[[Method, Prepared], None] | None = None):
        rt = cfg.runtime
        self.cfg, self.track, self._data = cfg, track, dataset
        self.save_adapter = save_adapter
        self.device = resolve_device(rt.device)
        self.workers = None if rt.workers < 0 else rt.workers
        self.features = FeatureCache(rt.cache_dir, self.device, rt.eval_batch_size, self.workers)
        self._backbone: tuple[BackboneSpec, Backbone] | None = None
        self._scored: dict[tuple, tuple[torch.Tensor, torch.Tensor] | None] = {}

    def backbone(self, spec: RunSpec) -> Backbone:
        bspec = BackboneSpec(spec.backbone, spec.pretrained or None, spec.checkpoint or None)
        if self._backbone is None or self._backbone[0] != bspec:
            self._backbone = None  # free the previous model before building the next
            self._backbone = (bspec, build_backbone(bspec, self.device))
        return self._backbone[1]

    # ---- fit once, score every evaluation set ---------------------------------------------------------
    def execute(self, prep: Prepared, results: dict[str, Result]) -> None:
        """Fit `prep`'s method on its episode and fill each target's result with its metrics and cost."""
        spec, episode = prep.spec, prep.episode
        source = self._data(episode.source)
        self.check_free_space()
        if (prep.cls.eval_input or prep.cls.input_kind) == "images":  # an unreadable test image: before training
            for name in dict.fromkeys(ev.dataset for t in episode.results for ev in t.evals):  # each under its root
                self.scan_once([it for t in episode.results for ev in t.evals if ev.dataset == name
                                for it in self._eval_items(ev)], self._data(name).image_root)
        backbone = self.backbone(spec)
        torch.manual_seed(spec.seed)  # dropout and other module-level randomness
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        features = FeatureSource(self.features, backbone, source, self._progress("encode"))
        ctx = Context(backbone, episode.classes, self.device, spec.seed, spec.shots, amp_dtype(self.device),
                      self.workers, self.track, features)
        method = prep.cls(prep.config, ctx)
        train, val = self.fewshot(prep.cls, backbone, source, episode)
        if prep.reference is not None:  # the draw of the stage shared by all seeds (PLOT++'s stage 1)
            ctx.reference = self.fewshot(prep.cls, backbone, source, prep.reference)[0]
        start = time.perf_counter()
        try:
            method.fit(train, val)
        finally:  # a diverged run keeps its curve too
            for r in results.values():
                r.curves = method.training_curves()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        train_seconds = time.perf_counter() - start
        fit_peak = peak_memory(self.device)  # scoring may reset the CUDA peak to measure its own
        if self.save_adapter is not None:  # what the method learned, before it sees test data
            self.save_adapter(method, prep)
        # an evaluation set shared by several results (ood: the ID test split) is scored once; no other is kept
        shared = Counter(_set_key(ev) for t in episode.results for ev in t.evals)
        self._scored = {key: None for key, count in shared.items() if count > 1}
        for target in episode.results:
            r = results[target.dataset]
            r.config = dataclasses.asdict(method.config)  # the values that ran (methods resolve placeholders)
            r.train_seconds = train_seconds
            self._evaluate(method, backbone, prep, target, r)
            r.peak_memory_bytes = max(fit_peak, peak_memory(self.device))
            r.trainable_params = method.trainable_params()
            r.inference_overhead = method.inference_overhead()
            if "skipped_images" in source.extra:
                r.extra["skipped_images"] = len(source.extra["skipped_images"])
        self._scored = {}

    def _evaluate(self, method: Method, backbone: Backbone, prep: Prepared, target: Target, result: Result) -> None:
        """Score every evaluation set of `target` and turn the accuracies into the protocol's metrics."""
        accs: dict[str, float | None] = {}
        ece_of: dict[str, float | None] = {}
        start = time.perf_counter()
        n = 0
        mode = test_time_mode(prep.protocol, method.test_time)
        if mode != "none":
            result.extra["unlabelled_test_data"] = mode
        clock = ScoringClock() if prep.protocol.scoring_cost else None
        if clock is not None and self.device.type == "cuda":  # the peak of this target's scoring alone
            torch.cuda.reset_peak_memory_stats(self.device)
        sets: dict[str, tuple] = {}  # metric -> (logits, labels or None) for `Protocol.logit_metrics`
        for ev in sorted(target.evals, key=lambda e: e.classes.rows_in(prep.episode.classes) is None):
            try:
                logits, labels = self._set_logits(method, backbone, prep, ev, mode, clock)
            except NotApplicable as exc:
                accs[ev.metric] = None
                result.not_applicable[ev.metric] = str(exc)
                continue
            if not torch.isfinite(logits).all():
                raise RunFailed(f"non-finite logits on the {ev.dataset} test set")
            sets[ev.metric] = (logits.numpy(), labels.numpy() if ev.labelled else None)
            if ev.labelled:  # an unlabelled (OOD) set has no labels among the classes: no accuracy
                accs[ev.metric] = accuracy(logits, labels)
                ece_of[ev.metric] = calibration_error(logits, labels)
            n += len(logits)
        result.eval_seconds = time.perf_counter() - start
        result.metrics = {**prep.protocol.metrics(accs), **prep.protocol.logit_metrics(sets, method.cosine_scale())}
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
        if clock is not None:
            result.metrics.update(clock.metrics(peak_memory(self.device)))

    def _set_logits(self, method: Method, backbone: Backbone, prep: Prepared, ev: EvalSet, mode: str,
                    clock: ScoringClock | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`eval_logits` of `ev`; a set several results share is computed once per run when the method does not
        adapt at test time (under a test-time mode each set is scored afresh). `clock` times the scoring."""
        key = _set_key(ev)
        if mode != "none" or key not in self._scored:
            return self.eval_logits(method, backbone, prep.episode.classes, ev, mode, prep.protocol.online_batch,
                                    clock)
        if self._scored[key] is None:
            self._scored[key] = self.eval_logits(method, backbone, prep.episode.classes, ev, mode, clock=clock)
        return self._scored[key]  # type: ignore[return-value]

    def _eval_items(self, ev: EvalSet) -> list[Item]:
        test = self._data(ev.dataset).test
        return [test[i] for i in ev.positions]

    def fewshot(self, cls: type[Method], backbone: Backbone, data: DatasetSplits,
                episode: Episode | FewShotSplit) -> tuple[FewShotData, FewShotData]:
        """The episode's train and val sets (labels = class indices in the fitted class set), with cached
        features for feature methods. A bare `FewShotSplit` means its few-shot episode (all classes)."""
        if isinstance(episode, FewShotSplit):
            episode = make_protocol("fewshot").episode(data, episode, {})
        out = []
        for name, index, targets in ((episode.train_split, episode.train, episode.train_targets),
                                     (episode.val_split, episode.val, episode.val_targets)):
            items = [Item(data.split(name)[i].path, t) for i, t in zip(index, targets, strict=True)]
            labels = torch.tensor(list(targets), dtype=torch.long)
            feats = None
            if cls.input_kind == "features":
                feats = self.features.split(backbone, data, name, index, self._progress(f"encode {name}")).x
            out.append(FewShotData(items, labels, data.image_root, feats, tuple(index), name))
        return out[0], out[1]

    def eval_logits(self, method: Method, backbone: Backbone, fitted: ClassSet, ev: EvalSet,
                    mode: str = "none", online_batch: int = 1,
                    clock: ScoringClock | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of `ev`'s test images over `ev.classes`: a subset of the fitted classes selects rows;
        other classes retarget the method (which may raise `NotApplicable`). Under a test-time `mode`
        ("online", "transductive") a fresh copy of the method scores the set (see `test_logits`); `clock`
        times the scoring calls."""
        rows = ev.classes.rows_in(fitted)
        want = fitted if rows is not None else ev.classes
        if method.ctx.classes != want:
            previous, method.ctx.classes = method.ctx.classes, want
            try:
                with torch.no_grad():
                    method.retarget()
            except NotApplicable:
                method.ctx.classes = previous
                raise
        scorer = method.fresh() if mode != "none" else method  # no adaptation leaks from one set to the next
        with torch.set_grad_enabled(mode != "none"):  # a test-time method may take gradient steps
            logits, _ = self.test_logits(scorer, backbone, self._data(ev.dataset), ev.positions, mode, online_batch,
                                         clock)
        if rows is not None and rows != list(range(len(fitted))):
            logits = logits[:, rows]
        return logits, torch.tensor(ev.targets, dtype=torch.long)

    def test_logits(self, method: Method, backbone: Backbone, data: DatasetSplits,
                    positions: tuple[int, ...] | None = None, mode: str = "none",
                    online_batch: int = 1, clock: ScoringClock | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits on test images (default: the whole split, in `positions` order): cached features, or images
        through the method. `mode` "online" hands the method one batch of `online_batch` unlabelled inputs at a
        time (`Method.online_logits`), "transductive" the whole set (`Method.transductive_logits`); the labels
        are returned to the runner only, never shown to the method. `clock` times the method's calls."""
        bs = online_batch if mode == "online" else self.cfg.runtime.eval_batch_size
        hook = {"online": method.online_logits, "transductive": method.transductive_logits}.get(mode, method.logits)
        score = (clock or ScoringClock()).timed(hook)
        transform = method.online_transform() if mode == "online" else None  # its own views of each raw image
        if transform is None and (method.eval_input or method.input_kind) == "features":
            tag, encode = method.eval_encoder or ("", None)
            with torch.no_grad():
                feats = self.features.items(backbone, data, "test", backbone.preprocess, positions, tag=tag,
                                            encode=encode, progress=self._progress("encode test"))
            if mode == "transductive":  # per batch `transductive_encode`, then the whole set at once
                rows = [method.transductive_encode(feats.x[i:i + bs].to(self.device))
                        for i in range(0, len(feats.y), bs)]
                return score(_cat(rows)), feats.y
            chunks = [score(feats.x[i:i + bs].to(self.device)) for i in range(0, len(feats.y), bs)]
            return _cat(chunks), feats.y
        items = data.test if positions is None else [data.test[i] for i in positions]
        seeds = None
        if transform is not None:  # a method's own view of each raw image (TPT's views), seeded per image
            index = range(len(data.test)) if positions is None else positions
            seeds = [view_seed(method.ctx.seed, data.name, i) for i in index]
        loader = image_loader(items, data.image_root, transform or backbone.preprocess, max(1, bs), self.device,
                              workers=self.workers, seeds=seeds)
        chunks, labels = [], []
        for images, y in self.track(loader, len(loader), "evaluate"):
            with autocast(self.device):
                if mode == "transductive":  # per batch `transductive_encode`, then the whole set at once
                    chunks.append(method.transductive_encode(images.to(self.device, non_blocking=True)).detach())
                else:
                    chunks.append(score(images.to(self.device, non_blocking=True)))
            labels.append(y)
        if mode == "transductive" and chunks:
            with autocast(self.device):
                chunks = [score(_cat(chunks))]
        return _cat(chunks), _cat(labels)

    # ---- failures ----------------------------------------------------------------------------------
    def scan_once(self, items: list[Item], root: Path) -> None:
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

    def check_free_space(self) -> None:
        """Fail before training when the results or cache disk is (nearly) full."""
        for folder, flag in ((self.cfg.runtime.results, "--results DIR"),
                             (self.cfg.runtime.cache_dir, "--set runtime.cache_dir=DIR")):
            path = Path(folder).absolute()
            existing = next(p for p in (path, *path.parents) if p.exists())
            free = shutil.disk_usage(existing).free
            if free < MIN_FREE_BYTES:
                raise RunFailed(f"only {free // 1024} KiB free under {existing}; free some space or choose "
                                f"another folder with {flag}")

    def bad_images(self, prep: Prepared) -> DataError:
        """One error naming every unreadable file the run reads: its few-shot images and its test sets."""
        data = self._data(prep.episode.source)
        ep = prep.episode
        items = [data.split(ep.train_split)[i] for i in ep.train] + [data.split(ep.val_split)[i] for i in ep.val]
        bad = scan_images(items, data.image_root, self.track, "find unreadable images")
        for t in prep.episode.results:
            for ev in t.evals:
                ev_data = self._data(ev.dataset)
                bad += scan_images(self._eval_items(ev), ev_data.image_root, self.track, "find unreadable images")
        return bad_images_error(sorted({it.path for it in bad}), data.image_root, self.cfg.runtime.skip_bad_images)

    def _progress(self, desc: str) -> Callable:
        return lambda it, total: self.track(it, total, desc)


MIN_FREE_BYTES = 16 * 1024 * 1024  # a result is KBs, a cache shard MBs: below this a run would fail to record


def _set_key(ev: EvalSet) -> tuple:
    """What makes two evaluation sets the same scoring: the images in order and the classes."""
    return ev.dataset, ev.positions, ev.classes


def _cat(chunks: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(chunks) if chunks else torch.zeros(0)
