"""What a result's number depends on, so that a stored result is reused only when nothing changed.

A run's identity is a dict of named components, each a short digest:

- `protocol`: the protocol's name and version;
- `method`: the method name and its resolved config as requested (before `fit` fills placeholders), its
  `version` once bumped past 1 (fsbench's own methods), and a plug-in's source file digest;
- `weights`: the backbone, and its weights by content (a checkpoint file's SHA-256, or the
  pretrained tag, or the seed of random weights);
- `classes`: the class names and prompt templates of the fitted and evaluated class sets;
- `train_list` / `val_list`: the dataset's train and val lists (paths and labels), which the
  few-shot draw is taken from;
- `fewshot`: the draw itself (paths and labels of the chosen images) and each chosen file's content;
- `eval:<dataset>`: every evaluated test image's path, label and content;
- `flags`: the data flags (`allow_repeat`, `skip_bad_images`);
- `files`: how file contents are stamped ("sha256"; identities written before it stamped size and
  mtime and are verified that way: `legacy=True`);
- `sampler`: the few-shot sampler and its version (`fsbench.samplers`), absent for fsbench's own
  sampler so that results drawn before samplers had names keep their identity;
- `reference` (only for a method with `Method.reference_seed`): the draw its shared stage trains on;
- `train_images` / `val_images`: the images the episode fits and validates on (split, paths, labels, contents),
  absent when they are the draw's images of the fitted classes (which `fewshot` covers; every episode of the
  built-in protocols, and every result written before these components), present when a protocol takes them
  elsewhere (validation carved from the shots, the whole val split).

A file's content digest comes from a stat index, as git's index does: the SHA-256 is computed once per
(path, size, mtime_ns, ctime_ns, inode, device) and again whenever one of them differs, so other bytes
behind a kept size and mtime are seen (ctime cannot be set back), and a `touch` or an identical copy
keeps its digest.

`identity_hash` combines them. A stored result is reused only when its hash equals the new one;
`describe_change` names the components that differ, for the one-line message. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fsbench.data.base import DatasetSplits, Item

Stat = tuple[int, int, int, int, int]  # size, mtime_ns, ctime_ns, inode, device: what git's index compares
FILES = "sha256"  # the "files" component: file stamps are content digests (absent in older identities: size + mtime)
_INDEX: dict[str, tuple[Stat, str]] = {}  # absolute path -> (stat when hashed, SHA-256 prefix)
_INDEX_LOCK = threading.Lock()
_DIRTY: set[str] = set()  # index entries not yet written to a cache folder's index file
INDEX_FILE = "file_index.json"


def digest(obj: Any) -> str:
    """A short stable digest of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_stat(path: str | Path) -> Stat | None:
    """(size, mtime_ns, ctime_ns, inode, device) of a file, None if it cannot be stat-ed. A user can set
    size and mtime back (`cp -p`, `rsync -a`, tar, `touch -r`), never ctime: like git's index, a file whose
    five stat fields are unchanged is taken as unchanged, anything else is confirmed by its content."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def content_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (first 16 hex digits; "missing" if it cannot be read), computed once per
    (path, size, mtime_ns, ctime_ns, inode, device): re-hashed whenever any of them changed, so a `touch` or
    an identical copy costs one read and keeps its digest, and other bytes behind the old size and mtime
    are seen. The index is kept per process and, through `load_index`/`save_index`, per cache folder."""
    p = os.path.abspath(os.path.expanduser(str(path)))
    st = file_stat(p)
    if st is None:
        return "missing"
    with _INDEX_LOCK:
        known = _INDEX.get(p)
    if known is not None and known[0] == st:
        return known[1]
    try:
        value = _sha256(Path(p))
    except OSError:
        return "missing"
    if file_stat(p) == st:  # unchanged while it was read: safe to remember
        with _INDEX_LOCK:
            _INDEX[p] = (st, value)
            _DIRTY.add(p)
    return value


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (first 16 hex digits) through the stat index; OSError if it is missing."""
    p = Path(path).expanduser().resolve()
    p.stat()  # a missing file is the caller's error to report
    return content_digest(p)


def load_index(cache_dir: str | Path) -> None:
    """Merge the cache folder's persisted index into this process's (an unreadable file is ignored)."""
    try:
        saved = json.loads((Path(cache_dir) / INDEX_FILE).read_text(encoding="utf-8"))
        entries = {p: (tuple(st), d) for p, (st, d) in saved["files"].items() if len(st) == 5}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return
    with _INDEX_LOCK:
        for p, entry in entries.items():
            _INDEX.setdefault(p, entry)  # type: ignore[arg-type]


def save_index(cache_dir: str | Path) -> None:
    """Write the index to the cache folder when it learned new digests (atomically; merged with what another
    process wrote meanwhile). A failed write only costs re-hashing later, so it is not an error."""
    from fsbench.io import atomic_write_json

    with _INDEX_LOCK:
        if not _DIRTY:
            return
    load_index(cache_dir)
    with _INDEX_LOCK:
        files = {p: [list(st), d] for p, (st, d) in _INDEX.items()}
        _DIRTY.clear()
    try:
        atomic_write_json(Path(cache_dir) / INDEX_FILE, {"version": 1, "files": files})
    except OSError:
        pass


def weights_identity(backbone: str, pretrained: str, checkpoint: str) -> str:
    """The backbone name and what its weights are: a file by content, else the pretrained tag."""
    if checkpoint:
        try:
            return f"{backbone}|sha256:{file_digest(checkpoint)}"
        except OSError:
            return f"{backbone}|missing:{checkpoint}"  # the run itself reports the missing file
    return f"{backbone}|{pretrained or 'default'}"


def source_digest(cls: type) -> str | None:
    """SHA-256 of the file that defines a method not shipped with fsbench (a `--plugin` file, an entry
    point's module); None for fsbench's own methods, whose `version` says when their numbers change."""
    module = sys.modules.get(cls.__module__)
    if cls.__module__.startswith("fsbench.") or module is None or not getattr(module, "__file__", None):
        return None
    try:
        return file_digest(module.__file__)
    except OSError:
        return None


def _code_identity(cls: type) -> dict[str, Any]:
    """A method class's `version` when bumped past 1 and a plug-in's source digest (each only when present)."""
    extra: dict[str, Any] = {}
    if getattr(cls, "version", 1) != 1:
        extra["version"] = cls.version  # type: ignore[attr-defined]
    source = source_digest(cls)
    if source:
        extra["source"] = source
    return extra


def method_identity(cls: type, config: dict[str, Any]) -> str:
    """The method component: its name and resolved config, plus its `version` when bumped past 1 and a
    plug-in's source digest (both left out otherwise, so that results of unchanged methods keep their
    identity); a method with a transductive step (`fsbench.transduction`) adds those of its parts."""
    extra = _code_identity(cls)
    parts = {p.name: code for p in getattr(cls, "parts", ()) if (code := _code_identity(p))}
    if parts:
        extra["parts"] = parts
    return digest([cls.name, config] + ([extra] if extra else []))  # type: ignore[attr-defined]


def _legacy_stamp(root: Path, item: Item) -> tuple[int, int]:
    try:
        st = os.stat(root / item.path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def items_digest(root: Path, items: Iterable[Item], with_files: bool = True, legacy: bool = False) -> str:
    """Digest of items' paths and labels, and (with_files) each file's content digest (`legacy`: its size
    and modification time, as identities without a "files" component were computed; only to verify those)."""
    h = hashlib.sha256()
    for it in items:
        if not with_files:
            stamp: Any = ()
        elif legacy:
            stamp = _legacy_stamp(root, it)
        else:
            stamp = content_digest(Path(root) / it.path)
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


def selection_digest(data: DatasetSplits, split: str, positions: Iterable[int]) -> str:
    """Digest of the images at `positions` of `data`'s `split`, in order: the split's name, paths, labels and
    file contents (an episode's `train_images` / `val_images` component)."""
    items = data.split(split)
    return digest([split, items_digest(data.image_root, (items[i] for i in positions))])


def eval_digest(data: DatasetSplits, positions: tuple[int, ...], legacy: bool = False) -> str:
    """Digest of the evaluated test images (paths, labels, contents), memoised per position set for the
    runner's lifetime (files are stat-ed once per runner; a new process or runner looks again)."""
    memo = data.extra.setdefault("_eval_digest", {})
    key = (id(data.test), positions, legacy)
    if key not in memo:
        memo[key] = items_digest(data.image_root, (data.test[i] for i in positions), legacy=legacy)
    return memo[key]


def identity_hash(identity: dict[str, str]) -> str:
    return digest(identity)


LABELS = {
    "protocol": "protocol version", "method": "method config", "weights": "backbone weights",
    "classes": "class names or templates", "train_list": "train list of the split file",
    "val_list": "val list of the split file", "fewshot": "few-shot images (draw or files)",
    "flags": "data flags (--allow-repeat / --skip-bad-images)", "targets": "target datasets",
    "sampler": "few-shot sampler (--sampler)",
    "files": "file identity scheme",
    "reference": "the draw of the stage shared by all seeds (PLOT++'s stage 1)",
    "train_images": "the episode's training images", "val_images": "the episode's validation images",
    "order": "the order the test images are met in (seeded per run)",
}


def sampler_of(identity: dict[str, str] | None) -> str:
    """The sampler that drew a result's images ("fsbench/v1" for results without a sampler component:
    fsbench's own sampler, the only one before samplers had names)."""
    return (identity or {}).get("sampler", "fsbench/v1")


def describe_change(old: dict[str, str] | None, new: dict[str, str]) -> str:
    """"method config, test images of dtd": the components that differ, in words."""
    if not old:
        return "the stored result predates result identities (fsbench < 0.2) and cannot be verified"
    keys = [k for k in new if old.get(k) != new[k]] + [k for k in old if k not in new]
    words = [LABELS.get(k, f"test images of {k[5:]}" if k.startswith("eval:") else k) for k in keys]
    return ", ".join(dict.fromkeys(words)) or "nothing"
