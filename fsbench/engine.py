"""The one evaluation loop every method shares.

`Runner.run(spec)`: build (or reuse) the backbone and dataset, draw (or reuse) the few-shot
split, fit the method, measure top-1 on the full test split, and write one result file. The
runner keeps the last backbone, dataset and feature cache alive, so consecutive runs on the same
(backbone, dataset) pay for loading and encoding once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from fsbench import adapters
from fsbench.backbones import Backbone, BackboneSpec, build_backbone
from fsbench.config import BenchConfig, method_config
from fsbench.data import DatasetSplits, load_dataset
from fsbench.errors import ConfigError, DataError, RunFailed
from fsbench.features import FeatureCache
from fsbench.images import BadImageError, bad_images_error, drop_bad_images, image_loader, scan_images
from fsbench.method import METHODS, Context, FewShotData, Method
from fsbench.results import Result, read_result, result_path, write_result
from fsbench.splits import FewShotSplit, SplitStore, read_splits_file, split_from_entry
from fsbench.versions import versions

# Bump when a change to the protocol (sampling, evaluation) invalidates earlier results.
PROTOCOL_VERSION = 1

Track = Callable[[Iterable, int, str], Iterable]


@dataclass(frozen=True)
class RunSpec:
    """One cell of a study: which method on which backbone, dataset, shot count and seed.

    `label` names a variant of `method` set by `overrides` (e.g. "lora@qv-r4-all-both"): its
    result is stored under the label, so variants of one method never overwrite each other.
    """

    method: str
    backbone: str
    dataset: str
    shots: int
    seed: int
    pretrained: str = ""
    checkpoint: str = ""
    label: str = ""
    overrides: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


def resolve_device(name: str) -> torch.device:
    """"auto" picks CUDA when available; an unavailable CUDA device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from fsbench.errors import ConfigError

        raise ConfigError("--device cuda was asked but CUDA is not available; use --device cpu or auto")
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


def config_hash(method: str, config: Any, spec: RunSpec) -> str:
    """Identity of everything that makes a finished run reusable."""
    blob = {"method": method, "config": dataclasses.asdict(config), "pretrained": spec.pretrained,
            "checkpoint": spec.checkpoint, "protocol": PROTOCOL_VERSION}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def peak_memory(device: torch.device) -> int:
    """Peak GPU memory of the run on CUDA; the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


class Runner:
    """Runs `RunSpec`s against one runtime configuration, caching what runs can share."""

    def __init__(self, cfg: BenchConfig, track: Track | None = None):
        self.cfg = cfg
        rt = cfg.runtime
        ensure_writable(rt.results, "--results DIR")
        ensure_writable(rt.cache_dir, "--set runtime.cache_dir=DIR")
        if rt.save_adapters:
            ensure_writable(rt.save_adapters, "--save-adapter DIR")
        # (dataset, K, seed) -> an imported split (`fsbench run --splits FILE`), used instead of a local draw
        self.imported = read_splits_file(rt.splits) if rt.splits else {}
        self.device = resolve_device(rt.device)
        self.workers = None if rt.workers < 0 else rt.workers
        self.track: Track = track or (lambda it, total, desc: it)
        self.features = FeatureCache(rt.cache_dir, self.device, rt.eval_batch_size, self.workers)
        self.splits = SplitStore(rt.cache_dir, repeat=rt.allow_repeat)
        self._backbone: tuple[BackboneSpec, Backbone] | None = None
        self._datasets: dict[str, DatasetSplits] = {}

    def backbone(self, spec: RunSpec) -> Backbone:
        bspec = BackboneSpec(spec.backbone, spec.pretrained or None, spec.checkpoint or None)
        if self._backbone is None or self._backbone[0] != bspec:
            self._backbone = None  # free the previous model before building the next
            self._backbone = (bspec, build_backbone(bspec, self.device))
        return self._backbone[1]

    def dataset(self, name: str) -> DatasetSplits:
        if name not in self._datasets:
            data = load_dataset(name, self.cfg.runtime.data_root)
            if self.cfg.runtime.skip_bad_images:
                data = drop_bad_images(data, self.cfg.runtime.cache_dir, self.track)
            self._datasets[name] = data
        return self._datasets[name]

    def method_and_config(self, spec: RunSpec) -> tuple[type[Method], Any]:
        cls = METHODS.get(spec.method)
        overrides = {**self.cfg.methods.get(cls.name, {}), **spec.overrides}
        return cls, method_config(cls, overrides)

    def previous(self, spec: RunSpec) -> Result | None:
        """The stored result of `spec`, ok or failed, if it was run with the same config."""
        cls, config = self.method_and_config(spec)
        path = result_path(self.cfg.runtime.results, spec.label or cls.name, spec.backbone, spec.dataset,
                           spec.shots, spec.seed)
        old = read_result(path) if path.is_file() else None
        if old and old.config_hash == config_hash(cls.name, config, spec) and self._same_split(spec, old):
            return old
        return None

    def _same_split(self, spec: RunSpec, old: Result) -> bool:
        """With imported splits, a stored result counts only if it used the imported split."""
        if not self.imported:
            return True
        entry = self.imported.get((self.dataset(spec.dataset).name, spec.shots, spec.seed))
        return entry is None or old.split_checksum == entry["checksum"]

    def existing(self, spec: RunSpec) -> Result | None:
        """The finished result of `spec` with the same config, if there is one."""
        old = self.previous(spec)
        return old if old is not None and old.status == "ok" else None

    def run(self, spec: RunSpec, force: bool = False, record_errors: bool = False) -> tuple[Result, bool]:
        """Run `spec` (or reuse its result); returns (result, reused).

        `RunFailed` and out-of-memory are recorded as a failed result; with `record_errors` (sweeps)
        so is any other exception: its type and first line, the traceback in `extra["traceback"]`.
        `runtime.save_adapters` (a directory; `--save-adapter`) saves what the method learned after
        `fit` (`fsbench.adapters`); a stored result without its adapter is re-run.
        """
        save_adapter = self.cfg.runtime.save_adapters
        adapter = adapters.adapter_dir(save_adapter, spec) if save_adapter else None
        reusable = not force and (adapter is None or adapters.is_saved(adapter))  # re-run to save a missing adapter
        if reusable and (old := self.existing(spec)) is not None:
            return old, True
        cls, config = self.method_and_config(spec)
        result = Result(method=spec.label or cls.name, backbone=spec.backbone, dataset=spec.dataset,
                        shots=spec.shots, seed=spec.seed, pretrained=spec.pretrained or None,
                        config=dataclasses.asdict(config), config_hash=config_hash(cls.name, config, spec),
                        device=str(self.device), versions=versions())
        if spec.label:
            result.extra["base_method"] = cls.name
        try:
            self._execute(cls, config, spec, result, adapter)
        except BadImageError:
            error = self._bad_images(spec)  # every unreadable file, not only the first
            if not record_errors:
                raise error from None
            result.status, result.error = "failed", str(error)
        except (RunFailed, torch.OutOfMemoryError) as exc:
            result.status = "failed"
            result.error = _failure_message(exc)
        except Exception as exc:
            if not record_errors:
                raise
            result.status = "failed"
            result.error = _error_line(exc)
            result.extra["traceback"] = traceback.format_exc()
        result.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_result(self.cfg.runtime.results, result)
        return result, False

    def _execute(self, cls: type[Method], config: Any, spec: RunSpec, result: Result,
                 adapter: Path | None = None) -> None:
        data = self.dataset(spec.dataset)
        backbone = self.backbone(spec)
        split = self._split(data, spec)
        result.split_checksum = split.checksum(data)
        if "skipped_images" in data.extra:
            result.extra["skipped_images"] = len(data.extra["skipped_images"])
        torch.manual_seed(spec.seed)  # dropout and other module-level randomness
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        ctx = Context(backbone, data, self.device, spec.seed, spec.shots, amp_dtype(self.device),
                      self.workers, self.track, {"features": self.features})
        method = cls(config, ctx)
        train, val = self.fewshot(cls, backbone, data, split)
        start = time.perf_counter()
        method.fit(train, val)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        result.train_seconds = time.perf_counter() - start
        if adapter is not None:  # `--save-adapter`: what the method learned, before it sees test data
            adapters.save_adapter(method, adapter, spec)
        start = time.perf_counter()
        logits, labels = self.test_logits(method, backbone, data)
        result.eval_seconds = time.perf_counter() - start
        if not torch.isfinite(logits).all():
            raise RunFailed("non-finite logits on the test set")
        result.top1 = accuracy(logits, labels)
        result.n_test = len(labels)
        result.peak_memory_bytes = peak_memory(self.device)
        result.trainable_params = method.trainable_params()
        result.inference_overhead = method.inference_overhead()

    def _split(self, data: DatasetSplits, spec: RunSpec) -> FewShotSplit:
        """The imported split of (dataset, K, seed), persisted in the store, else the store's own."""
        entry = self.imported.get((data.name, spec.shots, spec.seed))
        if entry is None:
            return self.splits.get(data, spec.shots, spec.seed)
        split = split_from_entry(entry, data, self.cfg.runtime.splits)
        self.splits.put(data, split)
        return split

    def _bad_images(self, spec: RunSpec) -> DataError:
        """One error naming every unreadable file the run reads: its few-shot images and the test split."""
        data = self.dataset(spec.dataset)
        split = self._split(data, spec)
        items = [data.train[i] for i in split.train] + [data.val[i] for i in split.val] + data.test
        bad = scan_images(items, data.image_root, self.track, "find unreadable images")
        return bad_images_error(sorted({it.path for it in bad}), data.image_root)

    def fewshot(self, cls: type[Method], backbone: Backbone, data: DatasetSplits,
                split: FewShotSplit) -> tuple[FewShotData, FewShotData]:
        """The train and val sets of a split, with cached features for feature methods."""
        out = []
        for name, index in (("train", split.train), ("val", split.val)):
            items = [data.split(name)[i] for i in index]
            labels = torch.tensor([it.label for it in items], dtype=torch.long)
            feats = None
            if cls.input_kind == "features":
                feats = self.features.split(backbone, data, name, index, self._progress(f"encode {name}")).x
            out.append(FewShotData(items, labels, data.image_root, feats, tuple(index)))
        return out[0], out[1]

    @torch.no_grad()
    def test_logits(self, method: Method, backbone: Backbone,
                    data: DatasetSplits) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits on the full test split: cached features, or images through the method."""
        bs = self.cfg.runtime.eval_batch_size
        if method.input_kind == "features":
            feats = self.features.split(backbone, data, "test", progress=self._progress("encode test"))
            chunks = [method.logits(feats.x[i:i + bs].to(self.device)).float().cpu()
                      for i in range(0, len(feats.y), bs)]
            return _cat(chunks), feats.y
        loader = image_loader(data.test, data.image_root, backbone.preprocess, bs, self.device,
                              workers=self.workers)
        chunks, labels = [], []
        for images, y in self.track(loader, len(loader), "evaluate"):
            with torch.autocast(self.device.type, dtype=amp_dtype(self.device) or torch.bfloat16,
                                enabled=amp_dtype(self.device) is not None):
                chunks.append(method.logits(images.to(self.device, non_blocking=True)).float().cpu())
            labels.append(y)
        return _cat(chunks), _cat(labels)

    def _progress(self, desc: str) -> Callable:
        return lambda it, total: self.track(it, total, desc)


def ensure_writable(folder: str, flag: str) -> None:
    """Fail before any work when `folder` cannot take new files (a file in the way, no permission).

    Creates nothing: a missing folder is checked through its nearest existing parent, and made
    when the first file is written into it."""
    path = Path(folder).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{existing} is a file, not a folder; remove it or choose another folder with {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".fsbench-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"cannot write to {folder} ({exc.strerror or exc}); fix its permissions or "
                          f"choose another folder with {flag}") from None


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
