"""Frozen image features, each image encoded once per (backbone, transform) and cached on disk.

A cache key's shards hold the rows of one split that runs have asked for so far: split
positions, features and labels. A request encodes only the positions not yet stored, so a
whole shots x seeds grid encodes the union of its few-shot subsets and the test split once,
never the whole train split (1.28 M images on ImageNet). The key holds everything that
changes the features: backbone weights identity, dataset, split content fingerprint,
transform, precision, cache version and a tag (e.g. Tip-Adapter's augmented views). Key and
checksum are checked on load; shards are written atomically, so a crash or a concurrent
writer never leaves a partial file, and a corrupt shard is re-encoded, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fsbench.backbones import Backbone
from fsbench.data.base import DatasetSplits, Item
from fsbench.images import image_loader
from fsbench.io import atomic_write

CACHE_VERSION = 2
log = logging.getLogger(__name__)


@dataclass
class Features:
    """L2-normalised float32 image features (N, D) — or (N, views, D) — on CPU, labels (N,)."""

    x: torch.Tensor
    y: torch.Tensor


@dataclass
class _Stored:
    """The cached rows of one key: split positions (M,), features (M, ...), labels (M,)."""

    index: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor


def _stats(paths: Iterable[Path]) -> dict[Path, os.stat_result]:
    """`os.stat` of each path that still exists (another process may delete a corrupt shard)."""
    out = {}
    for path in paths:
        try:
            out[path] = path.stat()
        except FileNotFoundError:
            pass
    return out


def _first_occurrence(index: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of each value of `index`, in order."""
    seen: set[int] = set()
    keep = [i for i, v in enumerate(index.tolist()) if not (v in seen or seen.add(v))]
    return torch.tensor(keep, dtype=torch.long)


def tensor_checksum(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_images(backbone: Backbone, items: list[Item], root: Path, transform: Callable,
                  device: torch.device, batch_size: int = 256, workers: int | None = None,
                  progress: Callable | None = None, seeds: Sequence[int] | None = None) -> Features:
    """Encode `items` with the frozen image tower; mixed precision on CUDA.

    A transform may return several views per image, (V, 3, H, W): the features are then
    (N, V, D). `seeds` (one per item) seed each item's random transform, so an augmented view
    is the same whichever batch or loader process it lands in."""
    batch = max(1, batch_size // max(1, getattr(transform, "views", 1)))
    loader = image_loader(items, root, transform, batch, device, workers=workers, seeds=seeds)
    xs, ys = [], []
    amp = device.type == "cuda"
    for images, labels in (progress(loader, len(loader)) if progress else loader):
        shape = images.shape
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            f = backbone.model.encode_image(images.to(device, non_blocking=True).flatten(0, images.dim() - 4))
        xs.append(F.normalize(f.float(), dim=-1).view(*shape[:-3], -1).cpu())
        ys.append(labels)
    if not xs:
        return Features(torch.zeros(0, backbone.embed_dim), torch.zeros(0, dtype=torch.long))
    return Features(torch.cat(xs), torch.cat(ys))


class FeatureCache:
    """On-disk cache of per-image features under `<cache_dir>/features/`.

    Each key is a folder of shards; an encoding pass adds one shard with the rows it encoded,
    so nothing is rewritten and concurrent writers (Ray workers) never lose each other's rows.
    `encodes` counts encoding passes and `encoded_images` the images that went through the
    image tower (each view counts), for tests and benchmarks.
    """

    MEMO = 8  # keys whose rows stay in memory between runs

    def __init__(self, cache_dir: str | Path, device: torch.device, batch_size: int = 256,
                 workers: int | None = None):
        self.root = Path(cache_dir) / "features"
        self.device, self.batch_size, self.workers = device, batch_size, workers
        self.encodes = self.encoded_images = 0
        self._memo: dict[Path, tuple[frozenset, _Stored]] = {}

    def key(self, backbone: Backbone, data: DatasetSplits, split: str, transform: Callable,
            tag: str = "") -> dict:
        return {
            "version": CACHE_VERSION, "backbone": backbone.key, "dataset": data.name,
            "image_root": str(Path(data.image_root).resolve()), "split": split,
            "fingerprint": data.fingerprint(split), "transform": repr(transform),
            "precision": "bf16-autocast" if self.device.type == "cuda" else "fp32", "tag": tag,
        }

    def path(self, key: dict) -> Path:
        """The folder of the key's shards."""
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.root / key["dataset"] / f"{key['split']}-{digest}"

    def load(self, key: dict) -> _Stored | None:
        """The stored rows of `key`, or None; a corrupt or stale shard is deleted, never used."""
        folder = self.path(key)
        shards = _stats(folder.glob("*.pt")) if folder.is_dir() else {}
        stamp = frozenset((f.name, st.st_mtime_ns, st.st_size) for f, st in shards.items())
        if folder in self._memo and self._memo[folder][0] == stamp:
            return self._memo[folder][1]
        parts = [part for f in sorted(shards) if (part := self._read(f, key)) is not None]
        if not parts:
            return None
        index = torch.cat([p.index for p in parts])
        first = _first_occurrence(index)  # two writers may have encoded the same rows
        stored = _Stored(index[first], torch.cat([p.x for p in parts])[first], torch.cat([p.y for p in parts])[first])
        self._remember(folder, stamp, stored)
        return stored

    def _read(self, path: Path, key: dict) -> _Stored | None:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            part = _Stored(blob["index"], blob["x"], blob["y"])
            ok = blob["key"] == key and blob["checksum"] == tensor_checksum(part.index, part.x, part.y)
        except Exception:  # truncated/corrupt pickle: any exception means "rebuild"
            ok = False
        if not ok:
            log.warning("feature cache file %s is corrupt or stale; rebuilding it", path)
            path.unlink(missing_ok=True)
            return None
        return part

    def store(self, key: dict, new: _Stored, old: _Stored | None) -> _Stored:
        """Add `new` rows to `key` as one shard; returns all rows (`old` + `new`)."""
        blob = {"key": key, "index": new.index, "x": new.x, "y": new.y,
                "checksum": tensor_checksum(new.index, new.x, new.y)}
        folder = self.path(key)
        before = self._memo[folder][0] if old is not None else frozenset()  # `load` remembered `old`
        path = atomic_write(folder / f"{uuid.uuid4().hex[:16]}.pt", lambda tmp: torch.save(blob, tmp))
        st = path.stat()
        stored = new if old is None else _Stored(torch.cat([old.index, new.index]), torch.cat([old.x, new.x]),
                                                 torch.cat([old.y, new.y]))
        self._remember(folder, before | {(path.name, st.st_mtime_ns, st.st_size)}, stored)
        return stored

    def _remember(self, folder: Path, stamp: frozenset, stored: _Stored) -> None:
        self._memo.pop(folder, None)
        self._memo[folder] = (stamp, stored)
        while len(self._memo) > self.MEMO:
            self._memo.pop(next(iter(self._memo)))

    def split(self, backbone: Backbone, data: DatasetSplits, split: str, index: Sequence[int] | None = None,
              progress: Callable | None = None) -> Features:
        """Features of the split's `index` positions (default: all) with the eval transform."""
        return self.items(backbone, data, split, backbone.preprocess, index, progress=progress)

    def items(self, backbone: Backbone, data: DatasetSplits, split: str, transform: Callable,
              index: Sequence[int] | None = None, tag: str = "", seed: Callable[[Item], int] | None = None,
              progress: Callable | None = None) -> Features:
        """Features of the split's `index` positions under `transform`, cached under `tag`;
        only positions not cached yet are encoded. `seed(item)` seeds a random transform per
        image, so a cached augmented view does not depend on which run encoded it."""
        items = data.split(split)
        index = list(range(len(items))) if index is None else [int(i) for i in index]
        key = self.key(backbone, data, split, transform, tag)
        stored = self.load(key)
        row = {} if stored is None else {int(p): r for r, p in enumerate(stored.index.tolist())}
        missing = sorted(set(index) - row.keys())
        if missing:
            todo = [items[i] for i in missing]
            new = encode_images(backbone, todo, data.image_root, transform, self.device, self.batch_size,
                                self.workers, progress, seeds=[seed(it) for it in todo] if seed else None)
            self.encodes += 1
            self.encoded_images += new.x.shape[0] * getattr(transform, "views", 1)
            stored = self.store(key, _Stored(torch.tensor(missing, dtype=torch.long), new.x, new.y), stored)
            row.update({p: len(row) + j for j, p in enumerate(missing)})
        if stored is None:  # nothing asked for, nothing stored
            return Features(torch.zeros(0, backbone.embed_dim), torch.zeros(0, dtype=torch.long))
        rows = torch.tensor([row[i] for i in index], dtype=torch.long)
        return Features(stored.x[rows], stored.y[rows])
