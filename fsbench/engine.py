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
import resource
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

from fsbench.backbones import Backbone, BackboneSpec, build_backbone
from fsbench.config import BenchConfig, method_config
from fsbench.data import DatasetSplits, load_dataset
from fsbench.errors import RunFailed
from fsbench.features import FeatureCache
from fsbench.images import image_loader
from fsbench.method import METHODS, Context, FewShotData, Method
from fsbench.results import Result, read_result, result_path, write_result
from fsbench.splits import FewShotSplit, SplitStore
from fsbench.versions import versions

# Bump when a change to the protocol (sampling, evaluation) invalidates earlier results.
PROTOCOL_VERSION = 1

Track = Callable[[Iterable, int, str], Iterable]


@dataclass(frozen=True)
class RunSpec:
    """One cell of a study: which method on which backbone, dataset, shot count and seed."""

    method: str
    backbone: str
    dataset: str
    shots: int
    seed: int
    pretrained: str = ""
    checkpoint: str = ""
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
    """Top-1 accuracy in percent."""
    if len(labels) == 0:
        return float("nan")
    return (logits.argmax(dim=-1).cpu() == labels.cpu()).float().mean().item() * 100.0


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
            self._datasets[name] = load_dataset(name, self.cfg.runtime.data_root)
        return self._datasets[name]

    def method_and_config(self, spec: RunSpec) -> tuple[type[Method], Any]:
        cls = METHODS.get(spec.method)
        overrides = {**self.cfg.methods.get(cls.name, {}), **spec.overrides}
        return cls, method_config(cls, overrides)

    def existing(self, spec: RunSpec) -> Result | None:
        """The finished result of `spec` with the same config, if there is one."""
        cls, config = self.method_and_config(spec)
        path = result_path(self.cfg.runtime.results, cls.name, spec.backbone, spec.dataset,
                           spec.shots, spec.seed)
        old = read_result(path) if path.is_file() else None
        if old and old.status == "ok" and old.config_hash == config_hash(cls.name, config, spec):
            return old
        return None

    def run(self, spec: RunSpec, force: bool = False) -> tuple[Result, bool]:
        """Run `spec` (or reuse its result); returns (result, reused)."""
        if not force and (old := self.existing(spec)) is not None:
            return old, True
        cls, config = self.method_and_config(spec)
        result = Result(method=cls.name, backbone=spec.backbone, dataset=spec.dataset,
                        shots=spec.shots, seed=spec.seed, pretrained=spec.pretrained or None,
                        config=dataclasses.asdict(config), config_hash=config_hash(cls.name, config, spec),
                        device=str(self.device), versions=versions())
        try:
            self._execute(cls, config, spec, result)
        except (RunFailed, torch.OutOfMemoryError) as exc:
            result.status = "failed"
            result.error = _failure_message(exc)
        result.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_result(self.cfg.runtime.results, result)
        return result, False

    def _execute(self, cls: type[Method], config: Any, spec: RunSpec, result: Result) -> None:
        data = self.dataset(spec.dataset)
        backbone = self.backbone(spec)
        split = self.splits.get(data, spec.shots, spec.seed)
        result.split_checksum = split.checksum(data)
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

    def fewshot(self, cls: type[Method], backbone: Backbone, data: DatasetSplits,
                split: FewShotSplit) -> tuple[FewShotData, FewShotData]:
        """The train and val sets of a split, with cached features for feature methods."""
        out = []
        for name, index in (("train", split.train), ("val", split.val)):
            items = [data.split(name)[i] for i in index]
            labels = torch.tensor([it.label for it in items], dtype=torch.long)
            feats = None
            if cls.input_kind == "features":
                feats = self.features.split(backbone, data, name, self._progress(f"encode {name}")).x
                feats = feats[torch.as_tensor(index, dtype=torch.long)]
            out.append(FewShotData(items, labels, data.image_root, feats))
        return out[0], out[1]

    @torch.no_grad()
    def test_logits(self, method: Method, backbone: Backbone,
                    data: DatasetSplits) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits on the full test split: cached features, or images through the method."""
        bs = self.cfg.runtime.eval_batch_size
        if method.input_kind == "features":
            feats = self.features.split(backbone, data, "test", self._progress("encode test"))
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


def _cat(chunks: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(chunks) if chunks else torch.zeros(0)


def _failure_message(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return ("out of memory: lower the batch size (e.g. --set <method>.batch_size=16) "
                "or use a smaller backbone")
    return str(exc)
