"""The few-shot protocol: K shots per class from train, min(K, 4) per class from val.

Draws use a local `random.Random` seeded by (dataset, split, K, seed), never the global RNG,
and are persisted as JSON (paths and labels, so they are portable across machines) and reused,
so a (dataset, K, seed) triple means the same images for every method. CoOp's
`generate_fewshot_dataset` samples the same way (`random.sample` per class; with replacement
only when a class is too small and repetition is allowed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from fsbench.data.base import DatasetSplits, Item
from fsbench.errors import DataError
from fsbench.io import atomic_write_json

log = logging.getLogger(__name__)
MAX_VAL_SHOTS = 4  # CLIP-LoRA / CoOp: validation uses min(K, 4) shots per class


@dataclass(frozen=True)
class FewShotSplit:
    """Indices into `DatasetSplits.train` and `.val` for one (dataset, shots, seed)."""

    dataset: str
    shots: int
    seed: int
    train: tuple[int, ...]
    val: tuple[int, ...]

    def checksum(self, data: DatasetSplits) -> str:
        """Hash of the chosen files and labels: equal checksums mean the same images."""
        h = hashlib.sha256()
        for name, idx in (("train", self.train), ("val", self.val)):
            for i in idx:
                it = data.split(name)[i]
                h.update(f"{name}\t{it.path}\t{it.label}\n".encode())
        return h.hexdigest()[:16]


def _draw(items: list[Item], per_class: int, rng: random.Random, repeat: bool, what: str) -> list[int]:
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_class[it.label].append(i)
    chosen: list[int] = []
    for label in sorted(by_class):
        pool = by_class[label]
        if len(pool) >= per_class:
            chosen += rng.sample(pool, per_class)
        elif repeat:
            chosen += rng.choices(pool, k=per_class)
        else:
            raise DataError(
                f"{what}: class {label} has {len(pool)} images but {per_class} shots were asked; "
                "lower --shots or pass --allow-repeat (CoOp's fallback: sample with replacement)")
    return chosen


def draw_split(data: DatasetSplits, shots: int, seed: int, repeat: bool = False) -> FewShotSplit:
    """Draw K train shots and min(K, 4) val shots per class with a local seeded RNG."""
    if shots < 1:
        raise DataError(f"shots must be >= 1, got {shots}")
    picks = {}
    for split, k in (("train", shots), ("val", min(shots, MAX_VAL_SHOTS))):
        rng = random.Random(f"fsbench|{data.name}|{split}|K={shots}|seed={seed}")
        picks[split] = tuple(_draw(data.split(split), k, rng, repeat, f"{data.name} {split}"))
    return FewShotSplit(data.name, shots, seed, picks["train"], picks["val"])


def split_to_json(split: FewShotSplit, data: DatasetSplits) -> dict:
    """Portable form: file paths and labels, plus the checksum."""
    return {
        "dataset": split.dataset, "shots": split.shots, "seed": split.seed,
        "checksum": split.checksum(data),
        "train": [[data.train[i].path, data.train[i].label] for i in split.train],
        "val": [[data.val[i].path, data.val[i].label] for i in split.val],
    }


def split_from_json(obj: dict, data: DatasetSplits, source: str) -> FewShotSplit:
    """Map a portable split back to indices of `data`; every file must exist in its split."""
    try:
        out = {}
        for name in ("train", "val"):
            index = {(it.path, it.label): i for i, it in enumerate(data.split(name))}
            out[name] = tuple(index[(str(p), int(lbl))] for p, lbl in obj[name])
        return FewShotSplit(data.name, int(obj["shots"]), int(obj["seed"]), out["train"], out["val"])
    except KeyError as exc:
        raise DataError(f"{source}: split refers to {exc} which is not in {data.name}'s "
                        "train/val lists (different dataset version?)") from None
    except (TypeError, ValueError) as exc:
        raise DataError(f"{source}: malformed few-shot split file ({exc})") from None


class SplitStore:
    """Persisted few-shot splits under `<cache>/splits/<dataset>/shots<K>_seed<S>.json`."""

    def __init__(self, cache_dir: str | Path, repeat: bool = False):
        self.root = Path(cache_dir) / "splits"
        self.repeat = repeat

    def path(self, dataset: str, shots: int, seed: int) -> Path:
        return self.root / dataset / f"shots{shots}_seed{seed}.json"

    def get(self, data: DatasetSplits, shots: int, seed: int) -> FewShotSplit:
        """The persisted split if there is one, else a fresh draw that is then persisted."""
        path = self.path(data.name, shots, seed)
        if path.is_file():
            # A readable file is used as it is, even hand-edited: results record the checksum of the
            # files actually used. One that does not parse, or names files this dataset lacks, is
            # drawn again (same seed and data, same result), never used.
            try:
                return split_from_json(json.loads(path.read_text(encoding="utf-8")), data, str(path))
            except (OSError, ValueError, RecursionError, DataError):
                pass
            log.warning("few-shot split file %s is corrupt or stale; drawing the split again", path)
            path.unlink(missing_ok=True)
        split = draw_split(data, shots, seed, self.repeat)
        self.put(data, split)
        return split

    def put(self, data: DatasetSplits, split: FewShotSplit) -> None:
        """Persist `split` (atomically), replacing any earlier draw for its (dataset, K, seed)."""
        atomic_write_json(self.path(data.name, split.shots, split.seed), split_to_json(split, data))


SPLITS_FORMAT = "fsbench-splits/1"


def write_splits_file(path: str | Path, entries: list[dict]) -> Path:
    """Write `split_to_json` entries as one portable file (`fsbench data export-splits`)."""
    return atomic_write_json(path, {"format": SPLITS_FORMAT, "splits": entries})


def read_splits_file(path: str | Path) -> dict[tuple[str, int, int], dict]:
    """The entries of a splits file keyed by (dataset, shots, seed); a one-line DataError if malformed."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"cannot read splits file {path} ({exc.strerror or exc})") from None
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{path}: not a splits file: invalid JSON ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != SPLITS_FORMAT or not isinstance(obj.get("splits"), list):
        raise DataError(f'{path}: not a splits file (expected {{"format": "{SPLITS_FORMAT}", "splits": [...]}} '
                        "as written by `fsbench data export-splits`)")
    out: dict[tuple[str, int, int], dict] = {}
    for i, e in enumerate(obj["splits"]):
        if not (isinstance(e, dict) and isinstance(e.get("dataset"), str) and isinstance(e.get("checksum"), str)
                and all(type(e.get(k)) is int for k in ("shots", "seed"))
                and all(isinstance(e.get(k), list) for k in ("train", "val"))):
            raise DataError(f"{path}: splits[{i}] is not a split (needs dataset, shots, seed, checksum, train, val)")
        key = (e["dataset"], e["shots"], e["seed"])
        if key in out:
            raise DataError(f"{path}: splits[{i}] repeats dataset {key[0]} K={key[1]} seed={key[2]}")
        out[key] = e
    return out


def split_from_entry(entry: dict, data: DatasetSplits, source: str) -> FewShotSplit:
    """An imported split mapped onto the local `data`; its files and checksum must match."""
    split = split_from_json(entry, data, source)
    got = split.checksum(data)
    if got != entry["checksum"]:
        raise DataError(f"{source}: {data.name} K={split.shots} seed={split.seed} has checksum {got} here, "
                        f"not {entry['checksum']} as exported (the file was edited?)")
    return split
