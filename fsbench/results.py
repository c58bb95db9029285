"""The results store: one JSON file per (method, backbone, dataset, shots, seed).

This module never imports torch, so reports run on a laptop with results copied from a cluster.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fsbench.io import atomic_write_json

SCHEMA_VERSION = 1


def slug(text: str) -> str:
    """File-system safe form of a name: "ViT-B/16" -> "ViT-B-16"."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


@dataclass
class Result:
    """One run's outcome; the JSON written to disk is `asdict(result)`.

    `top1` is a percentage on the full test split. `status` is "ok" or "failed" (then `error`
    says why and the metric fields are None). `config` is the method's resolved config and
    `config_hash` the hash used to decide whether a finished run can be skipped. A variant run
    (`fsbench ablate`) has its label as `method`, e.g. "lora@qv-r4-all-both", and the registered
    method in `extra["base_method"]`.
    """

    method: str
    backbone: str
    dataset: str
    shots: int
    seed: int
    status: str = "ok"
    top1: float | None = None
    train_seconds: float | None = None
    eval_seconds: float | None = None
    peak_memory_bytes: int | None = None
    trainable_params: int | None = None
    inference_overhead: int | None = None
    pretrained: str | None = None
    n_test: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""
    split_checksum: str | None = None
    device: str | None = None
    versions: dict[str, str | None] = field(default_factory=dict)
    created_at: str = ""
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION


def result_path(results_dir: str | Path, method: str, backbone: str, dataset: str, shots: int,
                seed: int) -> Path:
    """Where the result of one run lives: <dir>/<backbone>/<dataset>/<method>/shots<K>_seed<S>.json."""
    return Path(results_dir) / slug(backbone) / slug(dataset) / slug(method) / f"shots{shots}_seed{seed}.json"


def write_result(results_dir: str | Path, result: Result) -> Path:
    """Write `result` atomically and return its path."""
    path = result_path(results_dir, result.method, result.backbone, result.dataset, result.shots,
                       result.seed)
    return atomic_write_json(path, asdict(result))


def read_result(path: str | Path) -> Result | None:
    """Read one result file; None when it is unreadable or of another schema."""
    try:
        data = json.loads(Path(path).read_text())
        return Result(**data)
    except (OSError, ValueError, TypeError):
        return None


def iter_results(results_dir: str | Path) -> list[Result]:
    """Every readable result under `results_dir`, sorted by path."""
    root = Path(results_dir)
    found = (read_result(p) for p in sorted(root.rglob("shots*_seed*.json")))
    return [r for r in found if r is not None]


def load_results(results_dir: str | Path, include_failed: bool = False):
    """Load a results store as a pandas DataFrame, one row per run.

    Columns are the `Result` fields (nested `config`, `versions` and `extra` kept as dicts).
    """
    import pandas as pd

    rows = [asdict(r) for r in iter_results(results_dir) if include_failed or r.status == "ok"]
    columns = list(Result.__dataclass_fields__)
    return pd.DataFrame(rows, columns=columns)
