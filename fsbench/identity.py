"""What a result's number depends on, so that a stored result is reused only when nothing changed.

A run's identity is a dict of named components, each a short digest:

- `protocol`: the protocol's name and version;
- `method`: the method name and its resolved config as requested (before `fit` fills placeholders);
- `weights`: the backbone, and its weights by content (a checkpoint file's SHA-256, or the
  pretrained tag, or the seed of random weights);
- `classes`: the class names and prompt templates of the fitted and evaluated class sets;
- `train_list` / `val_list`: the dataset's train and val lists (paths and labels), which the
  few-shot draw is taken from;
- `fewshot`: the draw itself (paths and labels of the chosen images) and each chosen file's size
  and modification time;
- `eval:<dataset>`: every evaluated test image's path, label, size and modification time;
- `flags`: the data flags (`allow_repeat`, `skip_bad_images`);
- `reference` (only for a method with `Method.reference_seed`): the draw its shared stage trains on.

`identity_hash` combines them. A stored result is reused only when its hash equals the new one;
`describe_change` names the components that differ, for the one-line message. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fsbench.data.base import DatasetSplits, Item

_DIGESTS: dict[tuple[str, int, int], str] = {}


def digest(obj: Any) -> str:
    """A short stable digest of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (first 16 hex digits), memoised by (path, size, mtime)."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()[:16]
    return _DIGESTS[key]


def weights_identity(backbone: str, pretrained: str, checkpoint: str) -> str:
    """The backbone name and what its weights are: a file by content, else the pretrained tag."""
    if checkpoint:
        try:
            return f"{backbone}|sha256:{file_digest(checkpoint)}"
        except OSError:
            return f"{backbone}|missing:{checkpoint}"  # the run itself reports the missing file
    return f"{backbone}|{pretrained or 'default'}"


def _stat(root: Path, item: Item) -> tuple[int, int]:
    try:
        st = os.stat(root / item.path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def items_digest(root: Path, items: Iterable[Item], with_files: bool = True) -> str:
    """Digest of items' paths and labels, and (with_files) each file's size and modification time."""
    h = hashlib.sha256()
    for it in items:
        stamp = _stat(root, it) if with_files else ()
        h.update(f"{it.path}\t{it.label}\t{stamp}\n".encode())
    return h.hexdigest()[:16]


def list_digest(data: DatasetSplits, split: str) -> str:
    """Digest of a whole split's list (paths and labels, not file contents), memoised per list object
    (a filtered copy of the dataset, `--skip-bad-images`, has new lists and gets its own digest)."""
    memo = data.extra.setdefault("_list_digest", {})
    items = data.split(split)
    key = (split, id(items), len(items))
    if key not in memo:
        memo[key] = items_digest(data.image_root, items, with_files=False)
    return memo[key]


def eval_digest(data: DatasetSplits, positions: tuple[int, ...]) -> str:
    """Digest of the evaluated test images (paths, labels, sizes, mtimes), memoised per position set for the
    runner's lifetime (file stamps are read once per run of a process; a new process reads them again)."""
    memo = data.extra.setdefault("_eval_digest", {})
    key = (id(data.test), positions)
    if key not in memo:
        memo[key] = items_digest(data.image_root, (data.test[i] for i in positions))
    return memo[key]


def identity_hash(identity: dict[str, str]) -> str:
    return digest(identity)


LABELS = {
    "protocol": "protocol version", "method": "method config", "weights": "backbone weights",
    "classes": "class names or templates", "train_list": "train list of the split file",
    "val_list": "val list of the split file", "fewshot": "few-shot images (draw or files)",
    "flags": "data flags (--allow-repeat / --skip-bad-images)", "targets": "target datasets",
    "reference": "the draw of the stage shared by all seeds (PLOT++'s stage 1)",
}


def describe_change(old: dict[str, str] | None, new: dict[str, str]) -> str:
    """"method config, test images of dtd": the components that differ, in words."""
    if not old:
        return "the stored result predates result identities (fsbench < 0.2) and cannot be verified"
    keys = [k for k in new if old.get(k) != new[k]] + [k for k in old if k not in new]
    words = [LABELS.get(k, f"test images of {k[5:]}" if k.startswith("eval:") else k) for k in keys]
    return ", ".join(dict.fromkeys(words)) or "nothing"
