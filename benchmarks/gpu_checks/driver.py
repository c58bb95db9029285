"""Run the checks of benchmarks/gpu_check.sh under one time budget; write what each found.

    python benchmarks/gpu_checks/driver.py OUT_DIR [--smoke] [--work DIR] [--budget S] [--only a,b] [--skip a,b]

Writes, under OUT_DIR: `checks/<name>.json` (each check's numbers plus status, seconds, exit code,
reason), `logs/<name>.log` (its whole output), `results.json` (all checks), `summary.txt` (one
line per check: name, PASS / FAIL / SKIPPED, seconds, key numbers) and `gpu_measurements.md` (the
section for BENCHMARKS.md, report.py). Each check runs in its own process group under
min(its timeout, what is left of the budget), so one hang cannot eat the run; once less than
MIN_SECONDS is left, the remaining checks are skipped with that reason.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from plan import SIZES, Check, plan
from report import markdown, summary_line

MIN_SECONDS = 20


def parse_junit(path: Path) -> dict:
    """Counts from pytest's JUnit XML ({} when missing)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def execute(argv: list[str], log: Path, timeout: float, cwd: Path) -> tuple[int | None, float]:
    """Run `argv` in its own process group, output to `log`; (exit code or None on timeout, seconds)."""
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the check and every process it started
            proc.wait()
            code = None
    return code, time.perf_counter() - start


def skip_reason(check: Check, cuda: bool, left: float) -> str | None:
    if check.cuda_only and not cuda:
        return "no CUDA"
    if check.needs and importlib.util.find_spec(check.needs) is None:
        return f"{check.needs} is not installed"
    if left < MIN_SECONDS:
        return "time budget used up"
    return None


def judge(check: Check, code: int | None, numbers: dict) -> tuple[str, str]:
    """(status, reason) of a check that ran."""
    if code is None:
        return "fail", "timed out"
    if check.name == "pytest_gpu":
        good = code == 0 and numbers.get("passed", 0) > 0 and not numbers.get("failures") and not numbers.get("errors")
        return ("pass", "") if good else ("fail", f"pytest exit code {code}")
    if code != 0:
        return "fail", f"exit code {code}"
    if numbers.get("pass") is False:
        return "fail", "outside its bar (see numbers)"
    return "pass", ""


def run_check(check: Check, out: Path, cwd: Path, cuda: bool, deadline: float) -> dict:
    """Run one check (or skip it) and write `checks/<name>.json`."""
    record = {"name": check.name, "what": check.what, "command": [str(a) for a in check.argv]}
    reason = skip_reason(check, cuda, deadline - time.monotonic())
    if reason:
        record.update(status="skipped", reason=reason, seconds=0.0, numbers={})
    else:
        timeout = min(check.timeout, deadline - time.monotonic())
        code, seconds = execute(check.argv, out / "logs" / f"{check.name}.log", timeout, cwd)
        path = out / "checks" / f"{check.name}.json"
        numbers = parse_junit(check.extra["junit"]) if "junit" in check.extra else read_json(path)
        status, reason = judge(check, code, numbers)
        record.update(status=status, reason=reason, seconds=round(seconds, 1), exit_code=code,
                      timeout=round(timeout, 1), numbers=numbers,
                      last_line=last_line(out / "logs" / f"{check.name}.log"))
    (out / "checks" / f"{check.name}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def last_line(log: Path) -> str:
    """The last non-empty line a check printed (its verdict or its error), at most 200 characters."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def select(checks: list[Check], only: str, skip: str) -> list[Check]:
    names = {c.name for c in checks}
    wanted = {n for n in only.split(",") if n} or names
    dropped = {n for n in skip.split(",") if n}
    unknown = (wanted | dropped) - names
    if unknown:
        raise SystemExit(f"unknown check(s) {', '.join(sorted(unknown))}; "
                         f"the checks are {', '.join(c.name for c in checks)}")
    return [c for c in checks if c.name in wanted and c.name not in dropped]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes")
    p.add_argument("--work", type=Path, required=True, help="scratch folder (data, results, caches)")
    p.add_argument("--budget", type=float, help="seconds for all checks (default: 480 on GPU, 300 smoke)")
    p.add_argument("--only", default="", help="comma-separated check names to run")
    p.add_argument("--skip", default="", help="comma-separated check names to leave out")
    args = p.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("error: no CUDA device here; on a CPU machine run with --smoke", file=sys.stderr)
        raise SystemExit(2)
    out, repo = args.out.resolve(), Path(__file__).resolve().parents[2]
    for sub in ("checks", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "empty.toml").write_text("")
    budget = args.budget or SIZES["smoke" if args.smoke else "gpu"]["budget"]
    deadline, start, records = time.monotonic() + budget, time.monotonic(), []
    for check in select(plan(args.smoke, out / "checks", args.work), args.only, args.skip):
        records.append(run_check(check, out, repo, cuda, deadline))
        print(summary_line(records[-1]), flush=True)
    write_outputs(out, records, args.smoke, time.monotonic() - start)
    raise SystemExit(1 if any(r["status"] == "fail" for r in records) else 0)


def write_outputs(out: Path, records: list[dict], smoke: bool, seconds: float) -> None:
    machine = read_json(out / "machine.json")
    (out / "results.json").write_text(json.dumps({"smoke": smoke, "seconds": round(seconds, 1), "machine": machine,
                                                  "checks": records}, indent=2, default=str) + "\n")
    lines = [summary_line(r) for r in records]
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    (out / "gpu_measurements.md").write_text(markdown(machine, records, smoke, seconds))
    failed = [r["name"] for r in records if r["status"] == "fail"]
    print(f"{len(records)} checks in {seconds:.0f} s: {sum(r['status'] == 'pass' for r in records)} pass, "
          f"{len(failed)} fail{' (' + ', '.join(failed) + ')' if failed else ''}, "
          f"{sum(r['status'] == 'skipped' for r in records)} skipped; see {out}/summary.txt")


if __name__ == "__main__":
    main()
