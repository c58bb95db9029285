"""Summary lines and the ready-to-paste BENCHMARKS.md section of a gpu_check.sh run.

Everything printed comes from the numbers the checks wrote; a check that did not run or did not
write a number shows "-" (never a guess).
"""

from __future__ import annotations

from collections.abc import Callable

GB = 1e9  # the issue's "under 24 GB" bar, in bytes


def fmt(value: object, spec: str = ".3f", unit: str = "") -> str:
    return f"{value:{spec}}{unit}" if isinstance(value, (int, float)) else "-"


def _datagen(n: dict) -> str:
    return f"{n.get('images', '-')} images, {n.get('classes', '-')} classes, {fmt(n.get('seconds'), '.1f', ' s')}"


def _pytest(n: dict) -> str:
    return (f"{n.get('passed', '-')} passed, {n.get('failures', '-')} failed, {n.get('errors', '-')} errors, "
            f"{n.get('skipped', '-')} skipped")


def _crops(n: dict) -> str:
    parts = []
    for dev in n.get("devices", []):
        aa, no = n[dev]["pipeline"], n[dev]["no_antialias"]
        parts.append(f"{dev}: max {fmt(aa['smooth']['max'], '.4f')} ({fmt(aa['smooth']['max_levels'], '.0f')} levels) "
                     f"smooth, {fmt(aa['edges']['max'], '.4f')} edges, mean {fmt(aa['smooth']['mean'], '.5f')}; "
                     f"without antialias max {fmt(no['smooth']['max'], '.4f')} / {fmt(no['edges']['max'], '.4f')}")
    return "; ".join(parts) or "-"


def _e2e(n: dict) -> str:
    steps = " / ".join(fmt(s, ".4f") for s in n.get("s_per_step", [])) or "-"
    same = "identical" if n.get("identical") else f"max |diff| {fmt(n.get('max_abs_diff'), '.2e')}"
    return f"{steps} s/step; loss curves {same} (tolerance {n.get('tolerance', '-')})"


def _step(n: dict) -> str:
    return (f"fsbench {fmt(n.get('fsbench_s_per_step'), '.4f')} s/step "
            f"(MFU {fmt(n.get('fsbench_mfu_percent'), '.1f', '%')}), "
            f"reference {fmt(n.get('reference_s_per_step'), '.4f')} s/step "
            f"(MFU {fmt(n.get('reference_mfu_percent'), '.1f', '%')}); ratio {fmt(n.get('speedup'), '.2f')}x")


def _projection(n: dict) -> str:
    return (f"fsbench {fmt(n.get('fsbench_minutes'), '.1f')} min, reference {fmt(n.get('reference_minutes'), '.1f')} "
            f"min ({fmt(n.get('speedup'), '.2f')}x)")


def _memory(n: dict) -> str:
    peaks = n.get("peaks", {})
    return ", ".join(f"{b} {fmt(p.get('fsbench_gib'), '.2f')} / {fmt(p.get('reference_gib'), '.2f')} GiB"
                     for b, p in peaks.items()) + " (fsbench / reference)" if peaks else "-"


def _costs(n: dict) -> str:
    """Per run: status, seconds per training step and peak memory (the methods' cost on the device)."""
    runs = n.get("runs", [])
    return ", ".join(f"{r['method']} {r['status']} {fmt(r.get('s_per_step'), '.4f', ' s/step')} "
                     f"{fmt(r.get('ms_per_image'), '.1f', ' ms/test image')} peak "
                     f"{fmt((r.get('peak_memory_bytes') or 0) / 2**30 or None, '.2f', ' GiB')}" for r in runs) or "-"


def _runs(n: dict) -> str:
    runs = n.get("runs", [])
    return ", ".join(f"{r['method']} s{r['seed']} {r['status']} top1 {fmt(r['top1'], '.2f')}" for r in runs) or "-"


NUMBERS: dict[str, Callable[[dict], str]] = {
    "datagen": _datagen, "pytest_gpu": _pytest, "crops": _crops, "lora_e2e": _e2e, "lora_step": _step,
    "projection": _projection, "memory": _memory, "coop_frozen": _runs, "sweep_ray": _runs, "deep_prompt": _costs,
    "test_time": _costs, "datagen_tt": _datagen}


def key_numbers(record: dict) -> str:
    if record["status"] == "skipped":
        return ""
    try:
        return NUMBERS[record["name"]](record.get("numbers") or {}) if record["name"] in NUMBERS \
            else record.get("last_line", "")
    except (KeyError, TypeError):
        return "(numbers incomplete)"


def summary_line(record: dict) -> str:
    status = record["status"].upper() + (f" ({record['reason']})" if record.get("reason") else "")
    return f"{record['name']:<12} {status:<28} {record.get('seconds', 0):7.1f} s  {key_numbers(record)}"


def _heading(machine: dict, smoke: bool) -> str:
    if smoke:
        return (f"## Smoke run of benchmarks/gpu_check.sh ({machine.get('cpu', 'CPU')}, {machine.get('date', '-')}): "
                "CPU, tiny sizes, not GPU measurements")
    gpu = machine.get("gpu_name", machine.get("torch_gpu_name", "-"))
    return f"## GPU measurements ({gpu}, {machine.get('date', '-')})"


def _machine(machine: dict, seconds: float) -> str:
    return (f"Measured by `bash benchmarks/gpu_check.sh` in one run of {seconds:.0f} s on "
            f"{machine.get('gpu_name', 'no GPU')} ({machine.get('gpu_memory', '-')}), driver "
            f"{machine.get('driver', '-')}, torch {machine.get('torch', '-')} (CUDA {machine.get('torch_cuda', '-')}), "
            f"open_clip {machine.get('packages', {}).get('open_clip_torch', '-')}, "
            f"Python {machine.get('python', '-')}, "
            f"CPU {machine.get('cpu', '-')}; fsbench commit {machine.get('git_commit') or 'unknown'}; "
            f"{machine.get('date', '-')} {machine.get('time_utc', '')} UTC. Weights: seeded random "
            "(`--pretrained none`): speed and memory do not depend on the weight values.")


def _headline(checks: dict[str, dict]) -> list[str]:
    proj = checks.get("projection", {}).get("numbers", {})
    step = checks.get("lora_step", {}).get("numbers", {})
    e2e = checks.get("lora_e2e", {}).get("numbers", {})
    minutes = proj.get("fsbench_minutes")
    target = "-" if minutes is None else ("met" if minutes < 5 else "NOT met")
    return [
        f"16-shot ImageNet {proj.get('backbone', 'ViT-B/16')} CLIP-LoRA projected: {fmt(minutes, '.1f')} min",
        "",
        f"- Target under 5 min: {target}. Projection = 8,000 measured-speed steps + decoding 16,000 training "
        f"images + 50,000 test images at the measured evaluation rate; reference-style path "
        f"{fmt(proj.get('reference_minutes'), '.1f')} min ({fmt(proj.get('speedup'), '.2f')}x).",
        f"- Training step ({step.get('backbone', '-')}, batch {step.get('batch', '-')}, {step.get('classes', '-')} "
        f"classes; lora_step.py): {_step(step)}; peak {fmt(step.get('peak_tflops'), '.0f')} TFLOP/s dense bf16 "
        "for MFU, FLOPs counted by torch.utils.flop_counter on a warm-up step.",
        f"- `fsbench run --method lora` end to end ({e2e.get('steps', '-')} steps, `augment=device`): {_e2e(e2e)}.",
    ]


def _memory_table(checks: dict[str, dict]) -> list[str]:
    mem = checks.get("memory", {}).get("numbers", {})
    rows = ["| backbone | fsbench | reference-style | fsbench under 24 GB |", "|---|---|---|---|"]
    for backbone, p in mem.get("peaks", {}).items():
        gib = p.get("fsbench_gib")
        under = "-" if gib is None else ("yes" if gib * 2**30 < 24 * GB else "NO")
        ref = fmt(p.get("reference_gib"), ".2f", " GiB")
        rows.append(f"| {backbone} | {fmt(gib, '.2f', ' GiB')} | {ref} | {under} |")
    return [f"Peak memory of one training step ({mem.get('classes', '-')} classes, batch {mem.get('batch', '-')}; "
            f"{mem.get('measure', '-')}):", "", *rows]


def _check_table(records: list[dict]) -> list[str]:
    rows = ["| check | what | result | seconds | numbers |", "|---|---|---|---|---|"]
    for r in records:
        status = r["status"] + (f" ({r['reason']})" if r.get("reason") else "")
        rows.append(f"| {r['name']} | {r['what']} | {status} | {r.get('seconds', 0):.1f} | "
                    f"{key_numbers(r).replace('|', '/')} |")
    return rows


def markdown(machine: dict, records: list[dict], smoke: bool, seconds: float) -> str:
    """The section for BENCHMARKS.md."""
    checks = {r["name"]: r for r in records}
    crops = _crops(checks.get("crops", {}).get("numbers", {}))
    lines = [_heading(machine, smoke), "", _machine(machine, seconds), "", *_headline(checks), "",
             *_memory_table(checks), "", f"On-device crops vs torchvision's PIL crops: {crops}.", "",
             *_check_table(records), ""]
    return "\n".join(lines)
