"""CoOp's few-shot split files, read and written without Dassl.

CoOp (KaiyangZhou/CoOp datasets/*.py, e.g. oxford_pets.py:34-50) and the prompt-learning codes built on it
cache each draw as `split_fewshot/shot_{K}-seed_{S}.pkl`: a pickled `{"train": [Datum, ...], "val": [...]}`
(ImageNet: train only, datasets/imagenet.py:42-56) of Dassl's `Datum`
(dassl/data/datasets/base_dataset.py:12-45: `_impath`, `_label`, `_domain`, `_classname`), with absolute
paths of the machine that drew it. A pickle is a program: `read_coop_pickle` resolves the one global such a
file holds, `dassl.data.datasets.base_dataset.Datum`, to a plain record and refuses any other global before
it is called. `coop_pickle_bytes` writes the same format (Dassl's `Datum`, pickle protocol 2) for the
official code to load, so it can run on a draw made here.
"""

from __future__ import annotations

import io
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from fsbench.data.base import DatasetSplits
from fsbench.errors import DataError
from fsbench.splits import MAX_VAL_SHOTS, FewShotSplit

DATUM_MODULE, DATUM_NAME = "dassl.data.datasets.base_dataset", "Datum"
FILE_NAME = re.compile(r"shot_(\d+)-seed_(\d+)\.pkl")


@dataclass(frozen=True)
class Datum:
    """One entry of a CoOp split file (the fields of Dassl's `Datum`)."""

    impath: str
    label: int
    domain: int = 0
    classname: str = ""


class _DatumState:
    """What the restricted unpickler builds for Dassl's `Datum`: its pickled state, nothing called."""

    __slots__ = ("state",)

    def __setstate__(self, state: object) -> None:
        self.state = state


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> type:
        if (module, name) == (DATUM_MODULE, DATUM_NAME):
            return _DatumState
        raise DataError(f"{self.source}: refused: the pickle references the global {module}.{name} (a CoOp split "
                        f"file holds only {DATUM_MODULE}.{DATUM_NAME}); nothing was unpickled")

    def persistent_load(self, pid: object) -> object:
        raise DataError(f"{self.source}: refused: the pickle holds a persistent id (not a CoOp split file)")


def shots_seed(path: Path) -> tuple[int, int]:
    """(K, seed) from CoOp's file name `shot_{K}-seed_{S}.pkl`."""
    m = FILE_NAME.fullmatch(path.name)
    if m is None:
        raise DataError(f"{path}: not named shot_<K>-seed_<S>.pkl as CoOp names its split files "
                        "(the name says which K and seed it holds)")
    return int(m[1]), int(m[2])


def read_coop_pickle(path: Path) -> dict[str, list[Datum]]:
    """The roles ("train", and "val" when present) of a CoOp split file; a one-line DataError when the file
    is unreadable, refers to any global but Dassl's `Datum`, or is not a dict of `Datum` lists."""
    try:
        with open(path, "rb") as f:
            obj = _Unpickler(f, str(path)).load()
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror or exc})") from None
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed pickle (truncated, a wrong opcode, a bad BUILD)
        raise DataError(f"{path}: not a CoOp split file ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("train"), list):
        raise DataError(f'{path}: not a CoOp split file (expected a dict {{"train": [Datum, ...], "val": [...]}})')
    return {role: _data(obj[role], path, role) for role in ("train", "val") if role in obj}


def _data(entries: object, path: Path, role: str) -> list[Datum]:
    if not isinstance(entries, list):
        raise DataError(f"{path}: {role!r} is not a list of Datum")
    out = []
    for i, e in enumerate(entries):
        state = getattr(e, "state", None) if isinstance(e, _DatumState) else None
        if not (isinstance(state, dict) and isinstance(state.get("_impath"), str)
                and type(state.get("_label")) is int):
            raise DataError(f"{path}: {role}[{i}] is not a Datum with an image path and an int label")
        domain, classname = state.get("_domain", 0), state.get("_classname", "")
        out.append(Datum(state["_impath"], state["_label"], domain if type(domain) is int else 0,
                         classname if isinstance(classname, str) else ""))
    return out


# --- writing: protocol 2 opcodes, emitted directly so that Dassl need not be importable ---------------

def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b  # BINUNICODE


def _int(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)  # BININT


def _datum(d: Datum) -> bytes:
    # the class (memo 0), NEWOBJ with no args, then BUILD with the instance dict Dassl's Datum has
    state = (_str("_impath") + _str(d.impath) + _str("_label") + _int(d.label) + _str("_domain") + _int(d.domain)
             + _str("_classname") + _str(d.classname))
    return b"h\x00" + b")" + b"\x81" + b"}(" + state + b"u" + b"b"


def coop_pickle_bytes(roles: dict[str, list[Datum]]) -> bytes:
    """A pickle of `{role: [Datum, ...]}` that loads as Dassl `Datum` objects in the official code (and
    through `read_coop_pickle`)."""
    out = [b"\x80\x02", b"c", f"{DATUM_MODULE}\n{DATUM_NAME}\n".encode(), b"q\x00", b"0"]  # class to memo 0, pop
    out.append(b"}")
    for role, data in roles.items():
        out += [_str(role), b"]"]
        for d in data:
            out += [_datum(d), b"a"]
        out.append(b"s")
    out.append(b".")
    return b"".join(out)


# --- mapping onto the local dataset -----------------------------------------------------------------

def import_coop_split(path: Path, data: DatasetSplits) -> FewShotSplit:
    """A CoOp split file as a draw of the local `data` (sampler "coop"): each author's path is mapped by its
    part under the dataset's image folder; every file must exist and every label match the local split.
    ImageNet's files hold only train (CoOp validates on the test set): validation is then the coop sampler's,
    min(K, 4) per class from the train-folder images not drawn for training."""
    from fsbench.samplers_ref import TRAIN_FOLDER_DATASETS, coop_train_folder_val

    shots, seed = shots_seed(path)
    roles = read_coop_pickle(path)
    folder = data.name in TRAIN_FOLDER_DATASETS
    train_split, val_split = ("train+val", "train+val") if folder else ("train", "val")
    train = _positions(roles["train"], data, train_split, path, "train")
    _check_shots(train, data.split(train_split), shots, path)
    if folder:
        val = coop_train_folder_val(data, train, shots, seed, min(shots, MAX_VAL_SHOTS))
    elif "val" in roles:
        val = _positions(roles["val"], data, val_split, path, "val")
    else:
        raise DataError(f"{path}: has no 'val' list ({data.name}'s CoOp split files hold train and val)")
    return FewShotSplit(data.name, shots, seed, tuple(train), tuple(val), "coop", train_split, val_split)


def _positions(entries: list[Datum], data: DatasetSplits, split: str, path: Path, role: str) -> list[int]:
    items = data.split(split)
    index = {it.path: i for i, it in enumerate(items)}
    prefix = _author_prefix(entries, index, data, split, path)
    out = []
    for d in entries:
        impath = d.impath.replace("\\", "/")
        if not impath.startswith(prefix):
            raise DataError(f"{path}: {d.impath} is not under {prefix}, the image folder of its other entries")
        rel = impath[len(prefix):]
        if not (data.image_root / rel).is_file():
            raise DataError(f"{path}: {d.impath} is missing here: no file {data.image_root / rel}")
        if rel not in index:
            raise DataError(f"{path}: {d.impath} ({rel}) is not in {data.name}'s {split} list")
        local = items[index[rel]].label
        if local != d.label:
            raise DataError(f"{path}: {rel} has label {d.label} in the {role} list but {local} "
                            f"({data.classnames[local]!r}) in {data.name}'s {split} list (another class order?)")
        out.append(index[rel])
    return out


def _author_prefix(entries: list[Datum], index: dict[str, int], data: DatasetSplits, split: str,
                   path: Path) -> str:
    """The author's image folder (with its trailing "/"): the part of the first path whose rest is a
    local path of the split."""
    for d in entries:
        parts = d.impath.replace("\\", "/").split("/")
        for k in range(1, len(parts)):
            rel = "/".join(parts[-k:])
            if rel in index:
                return "/".join(parts[:-k]) + "/"
    example = entries[0].impath if entries else "(no entries)"
    raise DataError(f"{path}: none of its {len(entries)} paths (e.g. {example}) ends in a file of {data.name}'s "
                    f"{split} list under {data.image_root}; is it a {data.name} split file?")


def _check_shots(train: list[int], items: list, shots: int, path: Path) -> None:
    counts: dict[int, int] = {}
    for i in train:
        counts[items[i].label] = counts.get(items[i].label, 0) + 1
    over = next((label for label, n in counts.items() if n > shots), None)
    if over is not None:
        raise DataError(f"{path}: class {over} has {counts[over]} train images, more than the K={shots} "
                        "of its file name")


def coop_roles(split: FewShotSplit, data: DatasetSplits) -> dict[str, list[Datum]]:
    """A draw as CoOp's split-file content: absolute local paths; ImageNet train only (as CoOp writes it)."""
    from fsbench.samplers_ref import TRAIN_FOLDER_DATASETS

    root = data.image_root.resolve()
    roles = ("train",) if data.name in TRAIN_FOLDER_DATASETS else ("train", "val")
    return {role: [Datum(str(root / it.path), it.label, 0, data.classnames[it.label])
                   for it in split.items(data, role)] for role in roles}


def coop_folder(dataset: str) -> str:
    """The dataset's folder in CoOp's data root (DATASETS.md), where CoOp looks for `split_fewshot/`."""
    from fsbench.data.coop import LAYOUTS

    return {spec.name: spec.folders[0] for spec in LAYOUTS}.get(dataset, dataset)
