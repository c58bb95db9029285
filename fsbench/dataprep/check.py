"""`fsbench data check`: is each dataset present, in which layout, complete and readable?

Each dataset is read with its fsbench reader; the split sizes are compared with the standard
split's (`sources.SOURCES`), every listed file is stat-ed (and, on request, decoded), and every
problem comes with the command or step that fixes it.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fsbench.data import (
    DATASETS,
    DatasetSplits,
    aircraft,
    coop,
    imagenet,
    imagenet_variants,
    load_dataset,
    ood_sets,
    synthetic,
)
from fsbench.dataprep.sources import SOURCES
from fsbench.errors import DataError
from fsbench.splits import validate_lists, validate_source

SPLITS = ("train", "val", "test")
MAX_SHOTS = 16  # the paper's largest K: classes with fewer train images need --allow-repeat
Track = Callable[[Iterable, int, str], Iterable]


@dataclass
class CheckReport:
    """What `check_dataset` found for one dataset; `problems` empty means it is ready."""

    name: str
    layout: str = "-"
    counts: dict[str, int] = field(default_factory=dict)
    classes: int = 0
    per_class: tuple[int, int] = (0, 0)  # fewest and most train images of a class
    missing: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def present(self) -> bool:
        return bool(self.counts)

    @property
    def ok(self) -> bool:
        return not self.problems


def canonical_name(name: str) -> str:
    """The registry's main name for `name` or an alias ("fgvc" -> "fgvc_aircraft")."""
    return DATASETS.get(name).__name__.removeprefix("read_")


def find_layout(name: str, root: Path) -> str:
    """Which accepted folder layout of dataset `name` exists under `root` ("-" if none)."""
    if name == "imagenet":
        for parent, who in zip(imagenet.SPLIT_PARENTS, ("CoOp", "CLIP-LoRA"), strict=True):
            if (root / "imagenet" / parent / "train").is_dir():
                return f"{Path('imagenet', parent)}/ ({who})"
        return "-"
    if name == aircraft.NAME:
        return next((f for f in aircraft.FOLDERS if (root / f / "variants.txt").is_file()), "-")
    if name in imagenet_variants.VARIANTS:  # test-only domain-generalisation targets
        v = imagenet_variants.VARIANTS[name]
        return next((f"{v.folder}/{d}/ (CoOp)" for d in v.image_dirs if (root / v.folder / d).is_dir()), "-")
    if name in ood_sets.OOD_SETS:  # test-only OOD sets of the `ood` protocol
        s = ood_sets.OOD_SETS[name]
        return next((f"{r}/ ({who})" for r, who in zip(s.roots, s.who, strict=True) if (root / r).is_dir()), "-")
    spec = next((s for s in (*coop.LAYOUTS, synthetic.LAYOUT) if s.name == name), None)
    if spec is None:
        return "-"
    for i, folder in enumerate(spec.folders):
        if (root / folder).is_dir():
            return f"{folder}/ ({'CoOp' if i == 0 else 'CLIP-LoRA'})"
    return "-"


def check_dataset(name: str, root: str | Path, verify_images: bool = False, track: Track | None = None) -> CheckReport:
    """Check dataset `name` under the data root `root`."""
    name, root = canonical_name(name), Path(root).expanduser()
    report = CheckReport(name, layout=find_layout(name, root))
    try:
        data = load_dataset(name, root)
    except DataError as exc:
        report.problems.append(str(exc))
        report.fixes.append(_fetch_fix(name, root))
        return report
    report.counts = {s: len(data.split(s)) for s in SPLITS}
    report.classes = len(data.classnames)
    _compare_counts(report, root)
    _check_files(report, data, root, verify_images, track)
    try:  # what `fsbench run` refuses (a file listed twice, a train image in the test list, ...)
        if data.train or data.val:
            validate_source(data)
        else:  # an evaluation-only dataset (ImageNet-V2, -Sketch, -A, -R): no draw is ever taken from it
            validate_lists(data)
    except DataError as exc:
        report.problems.append(str(exc))
    return report


def _fetch_fix(name: str, root: Path, force: bool = False) -> str:
    src = SOURCES.get(name)
    if src is None:
        return f"put the files in the layout above (docs/datasets.md, '{name}')"
    command = f"fsbench data prepare {name} --root {root}{' --force' if force else ''}"
    return command + (" and the manual step it prints" if src.manual else "")


def _compare_counts(report: CheckReport, root: Path) -> None:
    src = SOURCES.get(report.name)
    if src is None:
        return
    found = tuple(report.counts[s] for s in SPLITS)
    if report.name == "imagenet":  # our val is held out of the official train set
        found = (found[0] + found[1], 0, found[2])
    if found != src.expected or report.classes != src.classes:
        exp = "/".join(f"{n:,}" for n in src.expected)
        got = "/".join(f"{n:,}" for n in found)
        report.problems.append(f"split sizes {got} ({report.classes} classes) differ from the standard "
                               f"{exp} ({src.classes} classes)")
        report.fixes.append(_fetch_fix(report.name, root, force=True) + " (CoOp's split file and full images)")


def _check_files(report: CheckReport, data: DatasetSplits, root: Path, verify: bool, track: Track | None) -> None:
    """Stat (and with `verify` decode) every listed file; note classes too small for 16 shots."""
    items = data.train + data.val + data.test
    for it in items:
        try:
            st = os.stat(data.image_root / it.path)
        except FileNotFoundError:
            report.missing.append(it.path)
            continue
        except (OSError, ValueError):
            report.unreadable.append(it.path)
            continue
        if st.st_size == 0 or not os.access(data.image_root / it.path, os.R_OK):
            report.unreadable.append(it.path)
    if verify:
        from fsbench.images import scan_images  # lazy: imports torch

        seen = set(report.missing) | set(report.unreadable)
        todo = [it for it in items if it.path not in seen]
        report.unreadable += [it.path for it in scan_images(todo, data.image_root, track, f"decode {data.name}")]
    if report.missing:
        report.problems.append(f"{len(report.missing):,} listed files are missing (first: {report.missing[0]})")
        src = SOURCES.get(report.name)
        report.fixes.append(_fetch_fix(report.name, root, force=True) if src and not src.manual
                            else f"restore the missing files under {data.image_root}")
    if report.unreadable:
        report.problems.append(f"{len(report.unreadable):,} files are unreadable (first: {report.unreadable[0]})")
        report.fixes.append("replace or delete them, or run with --skip-bad-images")
    per_class = Counter(it.label for it in data.train)
    if not per_class:  # a test-only dataset (the domain-generalisation targets): no shots to draw
        return
    report.per_class = (min(per_class.values()), max(per_class.values()))
    small = [c for c, n in per_class.items() if n < MAX_SHOTS]
    if small:
        report.notes.append(f"{len(small)} classes have fewer than {MAX_SHOTS} train images: "
                            "16 shots need --allow-repeat")
