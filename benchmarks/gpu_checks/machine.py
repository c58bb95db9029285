"""The machine a check run measured: GPU name, driver, torch/CUDA versions, Python, date.

    python benchmarks/gpu_checks/machine.py --out machine.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path


def nvidia_smi() -> dict[str, str]:
    """GPU name, driver and memory as nvidia-smi reports them ({} without nvidia-smi)."""
    query = "name,driver_version,memory.total"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0 or not out.stdout.strip():
        return {}
    name, driver, memory = (s.strip() for s in out.stdout.strip().splitlines()[0].split(",", 2))
    return {"gpu_name": name, "driver": driver, "gpu_memory": memory, "gpus": str(len(out.stdout.strip().splitlines()))}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def torch_facts() -> dict[str, object]:
    import torch

    facts: dict[str, object] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                                "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update({"torch_gpu_name": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                      "multiprocessors": props.multi_processor_count,
                      "bf16": torch.cuda.is_bf16_supported()})
    return facts


def versions() -> dict[str, str | None]:
    """Installed versions of the packages the checks use (None when missing)."""
    from importlib import metadata

    out = {}
    for name in ("open_clip_torch", "ftfy", "torchvision", "timm", "peft", "ray"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    spec = importlib.util.find_spec("open_clip")
    out["open_clip_path"] = str(Path(spec.origin).parent) if spec and spec.origin else None
    return out


def git_commit(repo: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def facts(repo: Path) -> dict[str, object]:
    now = datetime.now(timezone.utc)
    return {"date": now.strftime("%Y-%m-%d"), "time_utc": now.strftime("%H:%M"), "cpu": cpu_name(),
            "python": platform.python_version(), **nvidia_smi(), **torch_facts(), "packages": versions(),
            "git_commit": git_commit(repo)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[2])
    args = p.parse_args()
    data = facts(args.repo)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data))


if __name__ == "__main__":
    main()
