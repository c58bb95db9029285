"""Few-shot draws: K shots per class for training and a few per class for validation.

`draw_split` is fsbench's own sampler (`fsbench.samplers`, name `fsbench`): a local `random.Random`
seeded by (dataset, split, K, seed), never the global RNG, classes in label order. The reference codes
draw differently (CLIP-LoRA and CoOp/Dassl seed the global `random` once and walk classes in file
order): their draws are the samplers `clip_lora` and `coop` (`fsbench.samplers_ref`). Every draw is
persisted as JSON (paths and labels, so they are portable across machines) and reused, so a
(dataset, K, seed, sampler) means the same images for every method.
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
from fsbench.errors import ConfigError, DataError, RunFailed
from fsbench.io import atomic_write_json

log = logging.getLogger(__name__)
SPLIT_NAMES = ("train", "val", "train+val")  # what a draw may index (`DatasetSplits.split`)
MAX_VAL_SHOTS = 4  # CLIP-LoRA / CoOp: validation uses min(K, 4) shots per class


@dataclass(frozen=True)
class FewShotSplit:
    """One (dataset, shots, seed) draw: `train` are positions in `data.split(train_split)`, `val` in
    `data.split(val_split)` ("train", "val" or "train+val"; validation carved from the train split is
    `val_split="train"` with positions disjoint from `train`). `sampler` names the sampler that drew it."""

    dataset: str
    shots: int
    seed: int
    train: tuple[int, ...]
    val: tuple[int, ...]
    sampler: str = "fsbench"
    train_split: str = "train"
    val_split: str = "val"

    def items(self, data: DatasetSplits, role: str) -> list[Item]:
        """The drawn items of `role` ("train" or "val"), in draw order."""
        split = data.split(self.train_split if role == "train" else self.val_split)
        return [split[i] for i in (self.train if role == "train" else self.val)]

    def checksum(self, data: DatasetSplits) -> str:
        """Hash of the chosen files and labels: equal checksums mean the same images."""
        h = hashlib.sha256()
        for role, split in (("train", self.train_split), ("val", self.val_split)):
            name = role if split == role else f"{role}:{split}"  # default layout: the checksums of old draws
            for it in self.items(data, role):
                h.update(f"{name}\t{it.path}\t{it.label}\n".encode())
        return h.hexdigest()[:16]


def _draw(items: list[Item], per_class: int, rng: random.Random, repeat: bool, what: str,
          classnames: list[str] | None = None, cap: bool = False) -> list[int]:
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_class[it.label].append(i)
    chosen: list[int] = []
    for label in sorted(by_class):
        pool = by_class[label]
        if len(pool) >= per_class or cap:  # cap: a class with fewer images gives all of them
            chosen += rng.sample(pool, min(per_class, len(pool)))
        elif repeat:
            chosen += rng.choices(pool, k=per_class)
        else:
            raise DataError(
                f"{what}: class {_class_name(label, classnames)} has {len(pool)} images but {per_class} shots "
                "were asked; "
                "lower --shots, pass --allow-repeat (sample with replacement, as the official CLIP-LoRA code "
                "does) or use a sampler with its own small-class rule (--sampler clip_lora|coop)")
    return chosen


def _class_name(label: int, classnames: list[str] | None) -> str:
    return f"{classnames[label]!r} (label {label})" if classnames and 0 <= label < len(classnames) else str(label)


def draw_split(data: DatasetSplits, shots: int, seed: int, repeat: bool = False,
               val_shots: int | None = None) -> FewShotSplit:
    """Draw K train shots and `val_shots` (default min(K, 4)) val shots per class with a local seeded RNG.
    The val draw for K shots per class is the same whatever `val_shots` a method asks for, up to its size."""
    if shots < 1:
        raise ConfigError(f"shots must be >= 1, got {shots}")
    picks = {}
    val_k = min(shots, MAX_VAL_SHOTS) if val_shots is None else val_shots
    for split, k in (("train", shots), ("val", val_k)):
        rng = random.Random(f"fsbench|{data.name}|{split}|K={shots}|seed={seed}" + (
            f"|val={val_k}" if split == "val" and val_k != min(shots, MAX_VAL_SHOTS) else ""))
        cap = split == "val" and val_k > MAX_VAL_SHOTS  # K validation shots (LP++): all of a smaller class
        picks[split] = tuple(_draw(data.split(split), k, rng, repeat, f"{data.name} {split}", data.classnames, cap))
    return FewShotSplit(data.name, shots, seed, picks["train"], picks["val"])


def validate_source(data: DatasetSplits) -> None:
    """A dataset a few-shot draw is taken from: at least two classes, no file listed twice, no train or val
    image in the test list, and train images for every class. One-line DataError otherwise."""
    if len(data.classnames) < 2:
        raise DataError(f"{data.name}: {len(data.classnames)} class(es); a classification benchmark needs "
                        "at least two (check the folder layout / split file)")
    validate_lists(data)
    seen = {it.path for it in data.test}
    for name in ("train", "val"):
        overlap = sorted({it.path for it in data.split(name)} & seen)
        if overlap:
            raise DataError(f"{data.name}: {len(overlap)} {name} image(s) are also in the test list "
                            f"(e.g. {overlap[0]}); fix the split file")
    have = {it.label for it in data.train}
    empty = [c for i, c in enumerate(data.classnames) if i not in have]
    if empty:
        raise DataError(f"{data.name}: {len(empty)} class(es) have no train images (e.g. {empty[0]!r}); "
                        "fix the split file or the image folders")


def validate_lists(data: DatasetSplits) -> None:
    """No image listed twice within a split (a "2-shot" draw could otherwise be one image twice)."""
    for name in ("train", "val", "test"):
        paths = [it.path for it in data.split(name)]
        seen: set[str] = set()
        dup = next((p for p in paths if p in seen or seen.add(p)), None)
        if dup is not None:
            raise DataError(f"{data.name}: {dup} is listed more than once in the {name} split; "
                            "remove the duplicate from the split file")


def split_to_json(split: FewShotSplit, data: DatasetSplits) -> dict:
    """Portable form: file paths and labels, plus the checksum (and the sampler and splits drawn from,
    when they are not fsbench's default ones)."""
    out = {
        "dataset": split.dataset, "shots": split.shots, "seed": split.seed,
        "checksum": split.checksum(data),
        "train": [[it.path, it.label] for it in split.items(data, "train")],
        "val": [[it.path, it.label] for it in split.items(data, "val")],
    }
    if (split.sampler, split.train_split, split.val_split) != ("fsbench", "train", "val"):
        out.update(sampler=split.sampler, train_split=split.train_split, val_split=split.val_split)
    return out


def split_from_json(obj: dict, data: DatasetSplits, source: str) -> FewShotSplit:
    """Map a portable split back to indices of `data`; every file must exist in its split."""
    if not isinstance(obj, dict):
        raise DataError(f"{source}: malformed few-shot split file (not a JSON object)")
    try:
        out = {}
        names = {"train": str(obj.get("train_split", "train")), "val": str(obj.get("val_split", "val"))}
        for role, name in names.items():
            if name not in SPLIT_NAMES:
                raise ValueError(f"unknown split {name!r}")
            index = {(it.path, it.label): i for i, it in enumerate(data.split(name))}
            out[role] = tuple(index[(str(p), int(lbl))] for p, lbl in obj[role])
        return FewShotSplit(data.name, int(obj["shots"]), int(obj["seed"]), out["train"], out["val"],
                            str(obj.get("sampler", "fsbench")), names["train"], names["val"])
    except KeyError as exc:
        raise DataError(f"{source}: split refers to {exc} which is not in {data.name}'s "
                        "train/val lists (different dataset version?)") from None
    except (TypeError, ValueError) as exc:
        raise DataError(f"{source}: malformed few-shot split file ({exc})") from None


class SplitStore:
    """Persisted few-shot draws under `<cache>/splits/<dataset>/[<sampler>/]shots<K>_seed<S>[_val<V>][_repeat].json`
    (fsbench's own sampler keeps the folder it always had).

    A stored draw is used only if it is still the draw its (dataset lists, K, seed, val shots, sampler, repeat
    flag) give: it records the digests of the train and val lists it was drawn from and its own checksum, so
    an edited split file or a hand-edited draw is drawn again (with a warning), never used silently.
    Imported splits (`--splits`) are never written here: they cannot replace a local draw.
    """

    def __init__(self, cache_dir: str | Path, repeat: bool = False, persist: bool = True):
        self.root = Path(cache_dir) / "splits"
        self.repeat = repeat
        self.persist = persist  # False: a planner (`sweep --dry-run`) draws but writes nothing

    def path(self, dataset: str, shots: int, seed: int, val_shots: int | None = None,
             sampler: str = "fsbench") -> Path:
        val = "" if val_shots in (None, min(shots, MAX_VAL_SHOTS)) else f"_val{val_shots}"
        folder = self.root / dataset if sampler == "fsbench" else self.root / dataset / sampler
        return folder / f"shots{shots}_seed{seed}{val}{'_repeat' if self._repeat(sampler) else ''}.json"

    def _repeat(self, sampler: str) -> bool:
        from fsbench.samplers import get_sampler

        return self.repeat and get_sampler(sampler).honours_repeat

    def get(self, data: DatasetSplits, shots: int, seed: int, val_shots: int | None = None,
            sampler: str = "fsbench") -> FewShotSplit:
        """The draw of (dataset, K, seed) by `sampler`, persisted. A persisted draw is compared with a fresh one
        (drawing is cheap): another seed's draw copied in place, with a valid checksum of its own, is drawn again."""
        from fsbench.samplers import get_sampler

        path = self.path(data.name, shots, seed, val_shots, sampler)
        fresh = get_sampler(sampler).draw(data, shots, seed, val_shots, self.repeat)
        if path.is_file():
            split = self._load(path, data, sampler)
            if split is not None and (split.train, split.val, split.train_split, split.val_split) == (
                    fresh.train, fresh.val, fresh.train_split, fresh.val_split):
                return split
            log.warning("few-shot split file %s is corrupt, edited, stale or another draw's; drawing the split "
                        "again", path)
        if self.persist:
            try:
                atomic_write_json(path, {**split_to_json(fresh, data), "lists": _lists(data),
                                         "repeat": self._repeat(sampler)})
            except OSError as exc:
                raise RunFailed(f"cannot write the few-shot draw to {path} ({exc.strerror or exc}); free space or "
                                "choose another cache folder with --set runtime.cache_dir=DIR") from None
        return fresh

    def _load(self, path: Path, data: DatasetSplits, sampler: str = "fsbench") -> FewShotSplit | None:
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
            split = split_from_json(obj, data, str(path))
        except (OSError, ValueError, RecursionError, DataError):
            return None
        valid = (isinstance(obj, dict) and obj.get("lists") == _lists(data)
                 and obj.get("repeat") == self._repeat(sampler) and split.sampler == sampler
                 and obj.get("checksum") == split.checksum(data))
        return split if valid else None


def _lists(data: DatasetSplits) -> dict[str, str]:
    from fsbench.identity import list_digest

    return {name: list_digest(data, name) for name in ("train", "val")}


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
