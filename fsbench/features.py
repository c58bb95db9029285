"""Frozen image features, computed once per (backbone, dataset, split) and cached on disk.

The cache key holds everything that changes the features: backbone weights identity, dataset,
split content fingerprint, transform, precision and the cache version. The key is stored beside
the tensors with a checksum, both checked on load; files are written atomically, so a crash or
a concurrent writer never leaves a partial file, and a corrupt file is rebuilt, never used.
Few-shot subsets index into the cached whole split.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fsbench.backbones import Backbone
from fsbench.data.base import DatasetSplits, Item
from fsbench.images import image_loader
from fsbench.io import atomic_write

CACHE_VERSION = 1
log = logging.getLogger(__name__)


@dataclass
class Features:
    """L2-normalised float32 image features (N, D) on CPU with their labels (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def subset(self, index: tuple[int, ...] | list[int]) -> Features:
        idx = torch.as_tensor(index, dtype=torch.long)
        return Features(self.x[idx], self.y[idx])


def tensor_checksum(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_images(backbone: Backbone, items: list[Item], root: Path, transform: Callable,
                  device: torch.device, batch_size: int = 256, workers: int | None = None,
                  progress: Callable | None = None) -> Features:
    """Encode `items` with the frozen image tower; mixed precision on CUDA."""
    loader = image_loader(items, root, transform, batch_size, device, workers=workers)
    xs, ys = [], []
    amp = device.type == "cuda"
    for images, labels in (progress(loader, len(loader)) if progress else loader):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            f = backbone.model.encode_image(images.to(device, non_blocking=True))
        xs.append(F.normalize(f.float(), dim=-1).cpu())
        ys.append(labels)
    if not xs:
        return Features(torch.zeros(0, backbone.embed_dim), torch.zeros(0, dtype=torch.long))
    return Features(torch.cat(xs), torch.cat(ys))


class FeatureCache:
    """On-disk cache of whole-split features under `<cache_dir>/features/`.

    `encodes` counts the splits actually encoded (not loaded), for tests and benchmarks.
    """

    def __init__(self, cache_dir: str | Path, device: torch.device, batch_size: int = 256,
                 workers: int | None = None):
        self.root = Path(cache_dir) / "features"
        self.device, self.batch_size, self.workers = device, batch_size, workers
        self.encodes = 0

    def key(self, backbone: Backbone, data: DatasetSplits, split: str, transform: Callable,
            tag: str = "") -> dict:
        return {
            "version": CACHE_VERSION, "backbone": backbone.key, "dataset": data.name,
            "image_root": str(Path(data.image_root).resolve()), "split": split,
            "fingerprint": data.fingerprint(split), "transform": repr(transform),
            "precision": "bf16-autocast" if self.device.type == "cuda" else "fp32", "tag": tag,
        }

    def path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.root / key["dataset"] / f"{key['split']}-{digest}.pt"

    def load(self, key: dict) -> Features | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            ok = blob["key"] == key and blob["checksum"] == tensor_checksum(blob["x"], blob["y"])
        except Exception:  # truncated/corrupt pickle: any exception means "rebuild"
            ok = False
        if not ok:
            log.warning("feature cache file %s is corrupt or stale; rebuilding it", path)
            path.unlink(missing_ok=True)
            return None
        return Features(blob["x"], blob["y"])

    def store(self, key: dict, feats: Features) -> None:
        blob = {"key": key, "x": feats.x, "y": feats.y, "checksum": tensor_checksum(feats.x, feats.y)}
        atomic_write(self.path(key), lambda tmp: torch.save(blob, tmp))

    def split(self, backbone: Backbone, data: DatasetSplits, split: str,
              progress: Callable | None = None) -> Features:
        """Features of a whole split with the backbone's eval transform (cached)."""
        return self.items(backbone, data, split, data.split(split), backbone.preprocess, progress=progress)

    def items(self, backbone: Backbone, data: DatasetSplits, split: str, items: list[Item],
              transform: Callable, tag: str = "", progress: Callable | None = None) -> Features:
        """Features of arbitrary `items` of a split under `transform`, cached under `tag`."""
        key = self.key(backbone, data, split, transform, tag)
        feats = self.load(key)
        if feats is None:
            feats = encode_images(backbone, items, data.image_root, transform, self.device,
                                  self.batch_size, self.workers, progress)
            self.encodes += 1
            self.store(key, feats)
        return feats
