"""Frozen-feature methods over a shots x seeds grid: fsbench's Runner vs a naive loop, one run.

    PYTHONPATH=. python benchmarks/frozen_grid.py --device cpu
    PYTHONPATH=. python benchmarks/frozen_grid.py --device cuda --backbone ViT-B/16

Runner: `fsbench.engine.Runner.run` for every (method, shots, seed), which encodes each whole
split once (`FeatureCache`) and indexes the few-shot subsets into it. Naive: the same methods on
the same few-shot splits, re-encoding the run's train, val and test images for every run, with
an empty feature cache per run (so what a method encodes itself, e.g. Tip-Adapter's augmented
views, is encoded per run too). Every top-1 must agree. The last line is naive / Runner time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import device_arg, machine, speedup_line

from fsbench.config import BenchConfig, Runtime, Study
from fsbench.engine import Runner, RunSpec, accuracy, amp_dtype
from fsbench.features import FeatureCache, encode_images
from fsbench.method import METHODS, Context, FewShotData


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", help="default: ViT-B/16 on GPU; on CPU open_clip's smallest ViT, ViT-S-32 "
                                      "(random weights), so that the naive loop ends in minutes, not hours")
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--data-root", help="default: a temporary folder (synthetic is generated there)")
    p.add_argument("--device", default="auto")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--methods", nargs="+", help="default: every registered method with input_kind 'features'")
    p.add_argument("--batch", type=int, default=256, help="encoding batch size (both loops)")
    args = p.parse_args()
    args.backbone = args.backbone or ("ViT-B/16" if device_arg(args.device).type == "cuda" else "ViT-S-32")
    args.methods = args.methods or [n for n in METHODS.names() if METHODS.get(n).input_kind == "features"]
    return args


def runner_run(runner: Runner, spec: RunSpec) -> float:
    """Top-1 of one run through the Runner (`force`: never reuse a stored result)."""
    result, _ = runner.run(spec, force=True)
    if result.status != "ok":
        raise SystemExit(f"{spec}: {result.error}")
    return result.top1


def encoded_images(cache_dir: Path) -> int:
    """Images encoded into a feature cache folder (rows of every cached tensor)."""
    return sum(torch.load(f, weights_only=True)["x"].shape[0] for f in cache_dir.rglob("*.pt"))


def naive_run(runner: Runner, spec: RunSpec, cache_dir: Path) -> tuple[float, int]:
    """One run without the whole-split cache: encode this run's images, fit, score.

    Returns the top-1 and the images it encoded itself (more may go through `cache_dir`)."""
    data, backbone, device = runner.dataset(spec.dataset), runner.backbone(spec), runner.device
    cls, config = runner.method_and_config(spec)
    split = runner.splits.get(data, spec.shots, spec.seed)
    batch = runner.cfg.runtime.eval_batch_size

    def encode(items: list) -> torch.Tensor:
        return encode_images(backbone, items, data.image_root, backbone.preprocess, device, batch, workers=0).x

    sets = []
    for name, index in (("train", split.train), ("val", split.val)):
        items = [data.split(name)[i] for i in index]
        sets.append(FewShotData(items, torch.tensor([it.label for it in items]), data.image_root, encode(items)))
    test = encode(data.test)
    torch.manual_seed(spec.seed)
    services = {"features": FeatureCache(cache_dir, device, batch, workers=0)}  # empty: nothing reused
    ctx = Context(backbone, data, device, spec.seed, spec.shots, amp_dtype(device), 0, services=services)
    method = cls(config, ctx)
    method.fit(*sets)
    with torch.no_grad():
        logits = torch.cat([method.logits(test[i:i + batch].to(device)).float().cpu()
                            for i in range(0, len(test), batch)])
    encoded = sum(len(d) for d in sets) + len(test)
    return accuracy(logits, torch.tensor([it.label for it in data.test])), encoded


def encoding_pass(runner: Runner, spec: RunSpec) -> float:
    """Seconds to encode the whole train, val and test splits once (the Runner's shared cost)."""
    start = time.perf_counter()
    for split in ("train", "val", "test"):
        runner.features.split(runner.backbone(spec), runner.dataset(spec.dataset), split)
    return time.perf_counter() - start


def interleaved(runner: Runner, specs: list[RunSpec], root: Path) -> tuple[dict, dict]:
    """{loop: {spec: (top-1, seconds)}}, the Runner's and the naive run of each spec back to back,
    so that load from other processes falls on both loops alike; and the images each encoded."""
    out: dict[str, dict] = {"runner": {}, "naive": {}}
    direct = 0
    for i, spec in enumerate(specs):
        start = time.perf_counter()
        top1 = runner_run(runner, spec)
        out["runner"][spec] = (top1, time.perf_counter() - start)
        start = time.perf_counter()
        top1, encoded = naive_run(runner, spec, root / "naive" / str(i))
        out["naive"][spec] = (top1, time.perf_counter() - start)
        direct += encoded
    return out, {"runner": encoded_images(root / "cache"), "naive": direct + encoded_images(root / "naive")}


def summary(methods: list[str], specs: list[RunSpec], out: dict, shared: float) -> list[str]:
    """Per-method seconds of both loops."""
    lines = []
    for m in methods:
        f, n = (sum(out[loop][s][1] for s in specs if s.method == m) for loop in ("runner", "naive"))
        lines.append(f"  {m:<14} runner {f:8.1f} s  naive {n:8.1f} s  ({n / f:5.1f}x)")
    return lines


def main() -> None:
    args = parse_args()
    device = device_arg(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runtime = Runtime(data_root=args.data_root or str(root / "data"), results=str(root / "results"),
                          cache_dir=str(root / "cache"), device=str(device), workers=0, eval_batch_size=args.batch)
        runner = Runner(BenchConfig(study=Study(), runtime=runtime))
        specs = [RunSpec(m, args.backbone, args.dataset, k, s, pretrained="none")
                 for k in args.shots for s in args.seeds for m in args.methods]
        runner.backbone(specs[0])  # built once, outside both clocks
        for spec in specs:  # draw the few-shot splits outside both clocks too
            runner.splits.get(runner.dataset(spec.dataset), spec.shots, spec.seed)
        shared = encoding_pass(runner, specs[0])
        out, images = interleaved(runner, specs, root)
    fast_s = shared + sum(t for _, t in out["runner"].values())
    naive_s = sum(t for _, t in out["naive"].values())
    differ = [f"{s.method} K={s.shots} seed={s.seed}: {out['runner'][s][0]:.2f} vs {out['naive'][s][0]:.2f}"
              for s in specs if abs(out["runner"][s][0] - out["naive"][s][0]) > 1e-9]
    print(f"machine: {machine(device)}; {time.strftime('%Y-%m-%d')}")
    print(f"grid: {args.backbone} (random weights) on {args.dataset}, {len(args.methods)} methods "
          f"({', '.join(args.methods)}) x shots {args.shots} x seeds {args.seeds} = {len(specs)} runs")
    print(f"runner (whole-split feature cache): {fast_s:8.1f} s ({shared:.1f} s encoding pass), "
          f"{images['runner']} images encoded")
    print(f"naive (re-encode every run):        {naive_s:8.1f} s, {images['naive']} images encoded")
    print("\n".join(summary(args.methods, specs, out, shared)))
    detail = ": " + "; ".join(differ) if differ else ""
    print(f"top-1 equal in {len(specs) - len(differ)} of {len(specs)} runs{detail}")
    if differ:
        raise SystemExit("top-1 differs between the two loops")
    print(speedup_line(naive_s / fast_s))


if __name__ == "__main__":
    main()
