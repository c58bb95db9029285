"""A run's specification: a plain, torch-free value the planner, executors and results store share."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

# Bump when a change to the few-shot sampling or evaluation invalidates earlier results.
PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class RunSpec:
    """One cell of a study: which method on which backbone, dataset, shot count and seed.

    `label` names a variant of `method` set by `overrides` (e.g. "lora@qv-r4-all-both"): its
    result is stored under the label, so variants of one method never overwrite each other.
    """

    method: str
    backbone: str
    dataset: str
    shots: int
    seed: int
    pretrained: str = ""
    checkpoint: str = ""
    label: str = ""
    overrides: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    protocol: str = "fewshot"
    replace: bool = field(default=False, hash=False, compare=False)  # `--retry changed`: may replace its result


def config_hash(method: str, config: Any, spec: RunSpec) -> str:
    """Hash of the method, its requested config and the weights' names (a result's `config_hash`; the
    full identity, data included, is `Result.identity_hash`)."""
    blob = {"method": method, "config": dataclasses.asdict(config), "pretrained": spec.pretrained,
            "checkpoint": spec.checkpoint, "protocol": PROTOCOL_VERSION}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


