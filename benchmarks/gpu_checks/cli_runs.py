"""Run one `fsbench` command in this process and summarise the result files it wrote.

    PYTHONPATH=.:benchmarks python benchmarks/gpu_checks/cli_runs.py --results R --expect 2 --out X.json -- \\
        run --method coop,linear_probe --backbone ViT-B/16 --pretrained none ... --results R

Used by gpu_check.sh for CoOp and a frozen method on the GPU, and for `fsbench sweep --executor
ray`. The check passes when the command exits 0 and `--expect` result files under `--results`
have status "ok" and a finite top-1. Result files are read as plain JSON (fields `method`,
`status`, `top1`, `train_seconds`, `eval_seconds`, `peak_memory_bytes`, `device`, `error`), plus
`steps` (optimiser updates, from the stored training curves) and `s_per_step` (train seconds / steps,
data loading and validation included) for trained methods.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from jsonout import write_out

FIELDS = ("method", "backbone", "shots", "seed", "status", "top1", "train_seconds", "eval_seconds",
          "peak_memory_bytes", "device", "error")


def read_results(results: Path) -> list[dict]:
    """Every result JSON under `results` (the fields of FIELDS), sorted by method and seed."""
    out = []
    for path in sorted(Path(results).rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "method" in data and "status" in data:
            row = {k: data.get(k) for k in FIELDS}
            curves = data.get("curves") or {}
            steps = sum(int(c.get("steps") or 0) for c in curves.values() if isinstance(c, dict))
            row["steps"] = steps or None
            row["s_per_step"] = data["train_seconds"] / steps if steps and data.get("train_seconds") else None
            row["ms_per_image"] = (data.get("metrics") or {}).get("ms_per_image")  # test_time's scoring cost
            out.append(row)
    return sorted(out, key=lambda r: (str(r["method"]), r["seed"] or 0))


def ok(result: dict) -> bool:
    return result["status"] == "ok" and isinstance(result["top1"], (int, float)) and math.isfinite(result["top1"])


def run_fsbench(argv: list[str]) -> int:
    """`fsbench ARGV` in this process; its exit code."""
    from fsbench.cli import main

    return main(argv)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, required=True, help="the results folder the command writes")
    p.add_argument("--expect", type=int, required=True, help="result files the command must write")
    p.add_argument("--out", help="write the summary as JSON")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the fsbench arguments")
    args = p.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    start = time.perf_counter()
    code = run_fsbench(argv)
    seconds = time.perf_counter() - start
    results = read_results(args.results)
    good = sum(ok(r) for r in results)
    for r in results:
        peak = r["peak_memory_bytes"]
        print(f"{r['method']} seed {r['seed']}: {r['status']} top1 {r['top1']} train {r['train_seconds']} s "
              f"({r['steps']} steps, {r['s_per_step']} s/step) eval {r['eval_seconds']} s "
              f"({r['ms_per_image']} ms/test image), peak "
              f"{peak / 2**30 if peak else None} GiB on {r['device']} {r['error'] or ''}")
    passed = code == 0 and good == args.expect and len(results) == args.expect
    print(f"fsbench exit code {code}; {good} of {args.expect} expected runs ok in {seconds:.1f} s: "
          f"{'pass' if passed else 'FAIL'}")
    write_out(args.out, {"command": ["fsbench", *argv], "exit_code": code, "seconds": seconds, "runs": results,
                         "ok_runs": good, "expected_runs": args.expect, "pass": passed})


if __name__ == "__main__":
    main()
