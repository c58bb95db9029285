"""`--out FILE` of the check scripts: numbers as JSON, NaN as null, written atomically.

Kept apart from benchmarks/common.py (which imports the whole LoRA stack) so that the data
generator and the report work even when a broken import elsewhere fails the other checks.
"""

from __future__ import annotations

from pathlib import Path

from fsbench.io import atomic_write_json


def clean(value: object) -> object:
    """`value` with NaN floats as None, at any depth (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return None if isinstance(value, float) and value != value else value


def write_out(path: str | Path | None, numbers: dict) -> None:
    """Write `numbers` to `path` (nothing when None), atomically (fsbench.io, torch-free)."""
    if path:
        atomic_write_json(path, clean(numbers))
