"""Walk one `fsbench run` from the CLI to its stored file and count what it passes through (issue 19).

Traces one linear-probe run on `test-tiny` + `synthetic` (CPU, offline) with `sys.setprofile` and counts,
over fsbench's own code only (fsbench/ and methods/; dataclass-generated methods left out): the distinct
functions called, the distinct modules they live in, the re-entries (a call from another module into a
module that is already on the call stack below it: A -> B -> A, the back-and-forth of a hub) and, per
module, how often it is entered from another module. Prints one JSON line; BENCHMARKS.md keeps the numbers.

    python benchmarks/walk_run.py [--method linear_probe]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import fsbench

ROOT = Path(fsbench.__file__).resolve().parents[1]


def _module(filename: str) -> str | None:
    path = Path(filename).resolve()
    for top in ("fsbench", "methods"):
        base = ROOT / top
        if path.is_relative_to(base):
            return str(path.relative_to(ROOT))
    return None


def walk(args: list[str]) -> dict:
    """Run `fsbench <args>` under the profiler; the counts of fsbench's functions and modules."""
    from fsbench.cli import main

    functions: set[tuple[str, str]] = set()
    entries: Counter[str] = Counter()
    reentries: Counter[str] = Counter()
    stack: list[str | None] = []

    def profile(frame, event, arg):
        if event == "call":
            mod = _module(frame.f_code.co_filename)
            if mod is not None and frame.f_code.co_filename.startswith("<"):  # dataclass-generated code
                mod = None
            ours = [m for m in stack if m is not None]
            if mod is not None:
                functions.add((mod, frame.f_code.co_qualname))
                if not ours or mod != ours[-1]:
                    entries[mod] += 1
                    if mod in ours:
                        reentries[mod] += 1
            stack.append(mod)
        elif event == "return" and stack:
            stack.pop()

    sys.setprofile(profile)
    try:
        code = main(args)
    finally:
        sys.setprofile(None)
    return {"exit_code": code, "functions": len(functions), "modules": len(entries),
            "reentries": sum(reentries.values()), "reentered": dict(reentries.most_common(6)),
            "entries": dict(entries.most_common(8))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="linear_probe")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--backbone", "test-tiny", "--dataset", "synthetic", "--shots", "2", "--seed", "1",
                  "--device", "cpu", "--workers", "0", "--data-root", f"{tmp}/data", "--results", f"{tmp}/runs",
                  "--set", f"runtime.cache_dir=\"{tmp}/cache\""]
        from fsbench.cli import main as cli

        cli(["run", "--method", "zero_shot", *common])  # data generated, imports done: not counted
        print(json.dumps(walk(["run", "--method", opts.method, *common])))


if __name__ == "__main__":
    main()
