"""Frozen image features, each image encoded once per (backbone, transform) and cached on disk.

A cache key's shards hold the rows of one split that runs have asked for so far: split
positions, features and labels. A request encodes only the positions not yet stored, so a
whole shots x seeds grid encodes the union of its few-shot subsets and the test split once,
never the whole train split (1.28 M images on ImageNet). The key holds everything that
changes the features: backbone weights identity, dataset, split content fingerprint,
transform, precision, cache version and a tag (e.g. Tip-Adapter's augmented views). Each row
stores the content digest of the image file it was encoded from and is used only while the file
has that content (git's index: the digest is re-computed whenever size, mtime, ctime, inode or
device changed), so other bytes behind a kept size and mtime are re-encoded, and a `touch` or an
identical copy is not. Key and checksum are checked on load; shards are written atomically, so a
crash or a concurrent writer never leaves a partial file, and a corrupt shard is re-encoded, never used.
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

from fsbench import identity
from fsbench.backbones import Backbone
from fsbench.data.base import DatasetSplits, Item
from fsbench.device import autocast, precision_name
from fsbench.images import image_loader
from fsbench.io import atomic_write

# 3: each row stores its image file's (size, mtime); 4: its content digest, and the weights are keyed by content
# (caches of version 3 are not read: their rows are encoded again)
CACHE_VERSION = 4
log = logging.getLogger(__name__)


@dataclass
class Features:
    """L2-normalised float32 image features (N, D) — or (N, views, D) — on CPU, labels (N,); a custom
    `encode`'s output (e.g. pre-projection features) is stored as it is, not normalised."""

    x: torch.Tensor
    y: torch.Tensor


@dataclass
class _Stored:
    """The cached rows of one key: split positions (M,), features (M, ...), labels (M,), and the content
    digest of the image file each row was encoded from (M,): a row whose file changed since is not used."""

    index: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    stamp: torch.Tensor


def file_stamps(root: Path, items: Sequence[Item]) -> torch.Tensor:
    """(N,) int64: each image file's content digest (its first 60 bits; -1 if it is missing), through the
    stat index of `fsbench.identity.content_digest` (a file is read only when its stat changed)."""
    out = []
    for it in items:
        d = identity.content_digest(Path(root) / it.path)
        out.append(-1 if d == "missing" else int(d[:15], 16))
    return torch.tensor(out, dtype=torch.long)


def _stats(paths: Iterable[Path]) -> dict[Path, os.stat_result]:
    """`os.stat` of each path that still exists (another process may delete a corrupt shard)."""
    out = {}
    for path in paths:
        try:
            out[path] = path.stat()
        except FileNotFoundError:
            pass
    return out


def _first_occurrence(stored: _Stored) -> torch.Tensor:
    """Rows to keep: the first of each (split position, content digest); a file replaced since keeps both
    versions apart (only the one matching the file now is ever used)."""
    seen: set[tuple[int, int]] = set()
    keep = []
    for r, key in enumerate(zip(stored.index.tolist(), stored.stamp.tolist(), strict=True)):
        if key not in seen:
            seen.add(key)
            keep.append(r)
    return torch.tensor(keep, dtype=torch.long)


def tensor_checksum(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_images(backbone: Backbone, items: list[Item], root: Path, transform: Callable,
                  device: torch.device, batch_size: int = 256, workers: int | None = None,
                  progress: Callable | None = None, seeds: Sequence[int] | None = None,
                  encode: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None) -> Features:
    """Encode `items` with the frozen image tower; mixed precision on CUDA.

    A transform may return several views per image, (V, 3, H, W): the features are then
    (N, V, D). `seeds` (one per item) seed each item's random transform, so an augmented view
    is the same whichever batch or loader process it lands in. `encode(model, images)`, if
    given, replaces `model.encode_image` (e.g. ProLIP's features before the visual projection);
    its output is stored as float32 without L2 normalisation."""
    batch = max(1, batch_size // max(1, getattr(transform, "views", 1)))
    loader = image_loader(items, root, transform, batch, device, workers=workers, seeds=seeds)
    xs, ys = [], []
    for images, labels in (progress(loader, len(loader)) if progress else loader):
        shape = images.shape
        with autocast(device):  # the one mixed-precision policy (fsbench.device)
            x = images.to(device, non_blocking=True).flatten(0, images.dim() - 4)
            f = backbone.model.encode_image(x) if encode is None else encode(backbone.model, x)
        f = f.float() if encode is not None else F.normalize(f.float(), dim=-1)
        xs.append(f.view(*shape[:-3], -1).cpu())
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
            "precision": precision_name(self.device), "tag": tag,
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
        stored = _Stored(*(torch.cat([getattr(p, k) for p in parts]) for k in ("index", "x", "y", "stamp")))
        keep = _first_occurrence(stored)  # two writers may have encoded the same rows of the same files
        stored = _Stored(stored.index[keep], stored.x[keep], stored.y[keep], stored.stamp[keep])
        self._remember(folder, stamp, stored)
        return stored

    def _read(self, path: Path, key: dict) -> _Stored | None:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            part = _Stored(blob["index"], blob["x"], blob["y"], blob["stamp"])
            ok = blob["key"] == key and blob["checksum"] == tensor_checksum(part.index, part.x, part.y, part.stamp)
        except Exception:  # truncated/corrupt pickle: any exception means "rebuild"
            ok = False
        if not ok:
            log.warning("feature cache file %s is corrupt or stale; rebuilding it", path)
            path.unlink(missing_ok=True)
            return None
        return part

    def store(self, key: dict, new: _Stored, old: _Stored | None) -> _Stored:
        """Add `new` rows to `key` as one shard; returns all rows (`old` + `new`)."""
        blob = {"key": key, "index": new.index, "x": new.x, "y": new.y, "stamp": new.stamp,
                "checksum": tensor_checksum(new.index, new.x, new.y, new.stamp)}
        folder = self.path(key)
        before = self._memo[folder][0] if old is not None else frozenset()  # `load` remembered `old`
        path = atomic_write(folder / f"{uuid.uuid4().hex[:16]}.pt", lambda tmp: torch.save(blob, tmp))
        st = path.stat()
        stored = new if old is None else _Stored(*(torch.cat([getattr(old, k), getattr(new, k)])
                                                   for k in ("index", "x", "y", "stamp")))
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
              progress: Callable | None = None,
              encode: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None) -> Features:
        """Features of the split's `index` positions under `transform`, cached under `tag`;
        only positions not cached yet are encoded. `seed(item)` seeds a random transform per
        image, so a cached augmented view does not depend on which run encoded it. A custom
        `encode` (see `encode_images`) needs a `tag` of its own, which keys its features."""
        if encode is not None and not tag:
            raise ValueError("FeatureCache.items: a custom encode needs its own cache tag")
        items = data.split(split)
        index = list(range(len(items))) if index is None else [int(i) for i in index]
        key = self.key(backbone, data, split, transform, tag)
        stored = self.load(key)
        wanted = sorted(set(index))
        stamps_now = file_stamps(data.image_root, [items[p] for p in wanted]).tolist()
        identity.save_index(Path(self.root).parent)  # digests learned here are not computed again
        now = dict(zip(wanted, stamps_now, strict=True))
        row = {} if stored is None else _valid_rows(stored, now)
        missing = [p for p in wanted if p not in row]
        if missing:
            todo = [items[i] for i in missing]
            new = encode_images(backbone, todo, data.image_root, transform, self.device, self.batch_size,
                                self.workers, progress, seeds=[seed(it) for it in todo] if seed else None,
                                encode=encode)
            self.encodes += 1
            self.encoded_images += new.x.shape[0] * getattr(transform, "views", 1)
            stamps = torch.tensor([now[p] for p in missing], dtype=torch.long)
            offset = 0 if stored is None else len(stored.index)
            stored = self.store(key, _Stored(torch.tensor(missing, dtype=torch.long), new.x, new.y, stamps), stored)
            row.update({p: offset + j for j, p in enumerate(missing)})
        if stored is None:  # nothing asked for, nothing stored
            return Features(torch.zeros(0, backbone.embed_dim), torch.zeros(0, dtype=torch.long))
        rows = torch.tensor([row[i] for i in index], dtype=torch.long)
        return Features(stored.x[rows], stored.y[rows])


def _valid_rows(stored: _Stored, now: dict[int, int]) -> dict[int, int]:
    """Split position -> stored row, for the rows whose image file has the content it was encoded from
    (a file replaced in place gets a new row; the stale one is never used, --force or not)."""
    out: dict[int, int] = {}
    for r, (p, digest) in enumerate(zip(stored.index.tolist(), stored.stamp.tolist(), strict=True)):
        if p in now and p not in out and digest == now[p] and digest != -1:
            out[p] = r
    return out
