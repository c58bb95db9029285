"""Frozen-feature methods over a shots x seeds grid: fsbench's Runner vs a naive loop, one run.

    PYTHONPATH=. python benchmarks/frozen_grid.py --device cpu
    PYTHONPATH=. python benchmarks/frozen_grid.py --device cuda --backbone ViT-B/16 --classes 47

The dataset is written in DTD's on-disk layout (CoOp's `dtd/images/<class>/...jpg` and
`split_zhou_DescribableTextures.json`) with DTD's images per class (60 train, 24 val, 36 test:
DTD has the smallest test split of the 11 datasets, so the naive loop's re-encoding is as
cheap as it gets) and 300-500 px JPEGs; `--classes` picks how many of its 47 classes (3 on
CPU, so that the naive loop takes about 20 minutes). `--data-root` runs on a prepared real dataset.

Runner: `fsbench.engine.Runner.run` for every (method, shots, seed), whose feature cache
encodes each image once: the grid's few-shot images, the test split and Tip-Adapter's
augmented views of every drawn image. Naive: the same methods on the same few-shot splits,
re-encoding the run's train, val and test images every run, with an empty feature cache per
run (so Tip-Adapter's views are encoded per run, as the official code does). The two loops
alternate run by run; every top-1 must agree. The last line is naive / Runner time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import device_arg, machine, speedup_line, write_images

from fsbench.config import BenchConfig, Runtime, Study
from fsbench.data.base import DatasetSplits, Item
from fsbench.dataprep.sources import SOURCES
from fsbench.device import amp_dtype
from fsbench.engine import Runner
from fsbench.features import FeatureCache, encode_images
from fsbench.method import METHODS, Context, FeatureSource, FewShotData
from fsbench.metrics import accuracy
from fsbench.spec import RunSpec
from fsbench.splits import draw_split

DTD_CLASSES = ("banded blotchy braided bubbly bumpy chequered cobwebbed cracked crosshatched crystalline dotted "
               "fibrous flecked freckled frilly gauzy grid grooved honeycombed interlaced knitted lacelike lined "
               "marbled matted meshed paisley perforated pitted pleated polka-dotted porous potholed scaly "
               "smeared spiralled sprinkled stained stratified striped studded swirly veined waffled woven "
               "wrinkled zigzagged").split()
DTD_PER_CLASS = {"train": 60, "val": 24, "test": 36}  # CoOp's DTD split: 2,820 / 1,128 / 1,692 images


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", help="default: ViT-B/16 on GPU, ViT-B/32 (the paper's cheapest) on CPU; "
                                      "random weights")
    p.add_argument("--classes", type=int, help="DTD classes to generate (default: 47 on GPU; 3 on CPU, so that "
                                               "the naive loop takes about 20 minutes on 2 cores)")
    p.add_argument("--dataset", default="dtd", help="with --data-root: any registered dataset")
    p.add_argument("--data-root", help="a prepared data root (default: generate DTD-shaped data in a temp folder)")
    p.add_argument("--device", default="auto")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--methods", nargs="+", help="default: every registered method with input_kind 'features'")
    p.add_argument("--batch", type=int, default=256, help="encoding batch size (both loops)")
    args = p.parse_args()
    cuda = device_arg(args.device).type == "cuda"
    args.backbone = args.backbone or ("ViT-B/16" if cuda else "ViT-B/32")
    args.classes = args.classes or (47 if cuda else 3)
    if not 1 <= args.classes <= len(DTD_CLASSES):
        p.error(f"--classes must be 1..{len(DTD_CLASSES)}")
    args.methods = args.methods or [n for n in METHODS.names() if METHODS.get(n).input_kind == "features"]
    return args


def write_dtd_like(root: Path, classes: int) -> None:
    """DTD's layout and images per class under `root/dtd`, with generated JPEGs."""
    folder, split = root / "dtd", {}
    for s, (name, per_class) in enumerate(DTD_PER_CLASS.items()):
        split[name] = []
        for label, cls in enumerate(DTD_CLASSES[:classes]):
            items = write_images(folder / "images" / cls / name, per_class, 1, seed=s * len(DTD_CLASSES) + label)
            split[name] += [[f"{cls}/{name}/{it.path}", label, cls] for it in items]
    (folder / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))


def views_of(method: str) -> int:
    """Augmented views per train image a method encodes (Tip-Adapter's `augment_views`), else 0."""
    return getattr(METHODS.get(method).Config(), "augment_views", 0)


def shaped_like(name: str) -> DatasetSplits:
    """A file-less dataset with the class count and split sizes of a real one (classes equal in
    size; ImageNet's val shots come from 10% of train, as fsbench's reader does)."""
    src = SOURCES[name]
    train, val, test = src.expected
    if val == 0:
        train, val = train - train // 10, train // 10
    split = {s: [Item(f"{s}/{i}", i % src.classes) for i in range(n)]
             for s, n in (("train", train), ("val", val), ("test", test))}
    return DatasetSplits(name, Path("."), [str(c) for c in range(src.classes)], ["{}"], **split)


def encode_counts(data: DatasetSplits, shots: list[int], seeds: list[int], methods: list[str]) -> tuple[int, int]:
    """(runner, naive) images encoded by the grid, counted from the real split draws: the runner
    encodes each drawn train and val image, each test image and each drawn image's views once;
    the naive loop encodes every run's train, val and test images and its views."""
    views = max(views_of(m) for m in methods)
    draws = [draw_split(data, k, s) for k in shots for s in seeds]
    train = set().union(*(d.train for d in draws))
    val = set().union(*(d.val for d in draws))
    runner = len(train) * (1 + views) + len(val) + len(data.test)
    naive = sum(len(d.train) * (1 + views_of(m)) + len(d.val) + len(data.test) for d in draws for m in methods)
    return runner, naive


def count_table(shots: list[int], seeds: list[int], methods: list[str]) -> list[str]:
    """The image-count ratio of this grid on each of the 11 datasets' real split sizes."""
    lines = [f"  {'dataset':<15}{'classes':>8}{'test':>8}{'runner':>10}{'naive':>11}{'ratio':>8}"]
    for name in SOURCES:
        data = shaped_like(name)
        runner, naive = encode_counts(data, shots, seeds, methods)
        lines.append(f"  {name:<15}{len(data.classnames):>8}{len(data.test):>8}{runner:>10,}{naive:>11,}"
                     f"{naive / runner:>7.1f}x")
    return lines


def runner_run(runner: Runner, spec: RunSpec) -> float:
    """Top-1 of one run through the Runner (`force`: never reuse a stored result)."""
    result, _ = runner.run(spec, force=True)
    if result.status != "ok":
        raise SystemExit(f"{spec}: {result.error}")
    return result.top1


def naive_run(runner: Runner, spec: RunSpec, cache_dir: Path) -> tuple[float, int]:
    """One run without cross-run caching: encode this run's images, fit, score.

    Returns the top-1 and the images the run encoded (each augmented view counts)."""
    data, backbone = runner.planner.dataset(spec.dataset), runner.executor.backbone(spec)
    device = runner.executor.device
    cls, config = runner.planner.method_and_config(spec)
    split = runner.planner.splits.get(data, spec.shots, spec.seed)
    batch = runner.cfg.runtime.eval_batch_size

    def encode(items: list) -> torch.Tensor:
        return encode_images(backbone, items, data.image_root, backbone.preprocess, device, batch, workers=0).x

    sets = []
    for name, index in (("train", split.train), ("val", split.val)):
        items = [data.split(name)[i] for i in index]
        sets.append(FewShotData(items, torch.tensor([it.label for it in items]), data.image_root, encode(items),
                                tuple(index), name))
    test = encode(data.test)
    torch.manual_seed(spec.seed)
    views = FeatureCache(cache_dir, device, batch, workers=0)  # empty: nothing reused across runs
    ctx = Context(backbone, data, device, spec.seed, spec.shots, amp_dtype(device), 0,
                  features=FeatureSource(views, backbone, data))
    method = cls(config, ctx)
    method.fit(*sets)
    with torch.no_grad():
        logits = torch.cat([method.logits(test[i:i + batch].to(device)).float().cpu()
                            for i in range(0, len(test), batch)])
    encoded = sum(len(d) for d in sets) + len(test) + views.encoded_images
    return accuracy(logits, torch.tensor([it.label for it in data.test])), encoded


def interleaved(runner: Runner, specs: list[RunSpec], root: Path) -> tuple[dict, int]:
    """{loop: {spec: (top-1, seconds)}}, the Runner's and the naive run of each spec back to back,
    so that load from other processes falls on both loops alike; and the naive images encoded."""
    out: dict[str, dict] = {"runner": {}, "naive": {}}
    naive_images = 0
    for i, spec in enumerate(specs):
        start = time.perf_counter()
        top1 = runner_run(runner, spec)
        out["runner"][spec] = (top1, time.perf_counter() - start)
        start = time.perf_counter()
        top1, encoded = naive_run(runner, spec, root / "naive" / str(i))
        out["naive"][spec] = (top1, time.perf_counter() - start)
        naive_images += encoded
        print(f"  [{i + 1}/{len(specs)}] {spec.method} K={spec.shots} seed={spec.seed}: runner "
              f"{out['runner'][spec][1]:.2f} s, naive {out['naive'][spec][1]:.2f} s", flush=True)
    return out, naive_images


def summary(methods: list[str], specs: list[RunSpec], out: dict) -> list[str]:
    """Per-method seconds of both loops."""
    lines = []
    for m in methods:
        f, n = (sum(out[loop][s][1] for s in specs if s.method == m) for loop in ("runner", "naive"))
        lines.append(f"  {m:<14} runner {f:8.1f} s  naive {n:8.1f} s  ({n / f:5.1f}x)")
    return lines


def main() -> None:
    args = parse_args()
    device = device_arg(args.device)
    print("images each loop encodes for this grid on the 11 datasets' split sizes "
          "(counted from the split draws; nothing encoded):")
    print("\n".join(count_table(args.shots, args.seeds, args.methods)), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.data_root is None:
            if args.dataset != "dtd":
                raise SystemExit("--dataset other than dtd needs --data-root")
            write_dtd_like(root / "data", args.classes)
        runtime = Runtime(data_root=args.data_root or str(root / "data"), results=str(root / "results"),
                          cache_dir=str(root / "cache"), device=str(device), workers=0, eval_batch_size=args.batch)
        runner = Runner(BenchConfig(study=Study(), runtime=runtime))
        specs = [RunSpec(m, args.backbone, args.dataset, k, s, pretrained="none")
                 for k in args.shots for s in args.seeds for m in args.methods]
        runner.executor.backbone(specs[0])  # built once, outside both clocks
        data = runner.planner.dataset(args.dataset)
        for spec in specs:  # draw the few-shot splits outside both clocks too
            runner.planner.splits.get(data, spec.shots, spec.seed)
        out, naive_images = interleaved(runner, specs, root)
    fast_s = sum(t for _, t in out["runner"].values())
    naive_s = sum(t for _, t in out["naive"].values())
    differ = [f"{s.method} K={s.shots} seed={s.seed}: {out['runner'][s][0]:.2f} vs {out['naive'][s][0]:.2f}"
              for s in specs if abs(out["runner"][s][0] - out["naive"][s][0]) > 1e-9]
    print(f"machine: {machine(device)}; {time.strftime('%Y-%m-%d')}")
    print(f"data: {args.dataset}, {len(data.classnames)} classes, {len(data.train)} train / {len(data.val)} val / "
          f"{len(data.test)} test images")
    print(f"grid: {args.backbone} (random weights), {len(args.methods)} methods ({', '.join(args.methods)}) "
          f"x shots {args.shots} x seeds {args.seeds} = {len(specs)} runs")
    print(f"runner (feature cache):      {fast_s:8.1f} s, {runner.executor.features.encoded_images} images encoded")
    print(f"naive (re-encode every run): {naive_s:8.1f} s, {naive_images} images encoded "
          f"({naive_images / max(1, runner.executor.features.encoded_images):.1f}x)")
    print("\n".join(summary(args.methods, specs, out)))
    detail = ": " + "; ".join(differ) if differ else ""
    print(f"top-1 equal in {len(specs) - len(differ)} of {len(specs)} runs{detail}")
    if differ:
        raise SystemExit("top-1 differs between the two loops")
    print(speedup_line(naive_s / fast_s))


if __name__ == "__main__":
    main()
