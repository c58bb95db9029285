"""Save and reload what a method learned, and export merged weights.

An adapter is a directory with `adapter.safetensors` (the method's `state_tensors()`) and
`adapter.json` (method, resolved config, backbone and its weights identity, dataset, shots,
seed, class names). `fsbench run --save-adapter DIR` writes one per run under
DIR/<backbone>/<dataset>/<method>/shots<K>_seed<S>/; `load_adapter(dir, ctx)` returns the method
ready for `logits` on the same backbone and classes, without training. `export_merged` writes a
weight-merging method's adapted CLIP (lora, peft) as a plain open_clip checkpoint, loadable with
`fsbench run --checkpoint FILE`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from fsbench.config import method_config
from fsbench.errors import ConfigError
from fsbench.io import atomic_write, atomic_write_json
from fsbench.method import METHODS, Context, Method
from fsbench.results import slug

if TYPE_CHECKING:
    from fsbench.spec import RunSpec

TENSORS = "adapter.safetensors"
META = "adapter.json"
FORMAT_VERSION = 1


def adapter_dir(root: str | Path, spec: RunSpec, folder: str = "") -> Path:
    """Where `--save-adapter root` puts the adapter of one run (`folder`: the protocol's path segment)."""
    method = Path(root) / slug(spec.backbone) / slug(spec.dataset) / slug(spec.label or spec.method.lower())
    return (method / slug(folder) if folder else method) / f"shots{spec.shots}_seed{spec.seed}"


def is_saved(directory: str | Path, identity_hash: str | None = None) -> bool:
    """An adapter is saved there (and, given `identity_hash`, by the run of that identity)."""
    meta = Path(directory) / META
    if not (meta.is_file() and (Path(directory) / TENSORS).is_file()):
        return False
    if identity_hash is None:
        return True
    try:
        return json.loads(meta.read_text()).get("identity_hash") == identity_hash
    except (OSError, ValueError):
        return False


def save_adapter(method: Method, directory: str | Path, spec: RunSpec, identity_hash: str = "") -> Path:
    """Write `method`'s learned state and its description into `directory` (atomically)."""
    directory = Path(directory)
    # clone: safetensors refuses tensors that share storage
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in method.state_tensors().items()}
    atomic_write(directory / TENSORS, lambda tmp: save_file(tensors, str(tmp)))
    meta = {
        "format": FORMAT_VERSION, "method": method.name, "config": dataclasses.asdict(method.config),
        "backbone": spec.backbone, "backbone_key": method.ctx.backbone.key, "pretrained": spec.pretrained,
        "checkpoint": spec.checkpoint, "dataset": spec.dataset, "shots": spec.shots, "seed": spec.seed,
        "classnames": method.ctx.classnames, "tensors": sorted(tensors), "identity_hash": identity_hash,
    }
    atomic_write_json(directory / META, meta)  # written last: its presence means the pair is complete
    return directory


def load_adapter(directory: str | Path, ctx: Context) -> Method:
    """The method saved in `directory`, ready for `logits` on `ctx`'s backbone and classes."""
    directory = Path(directory)
    if not is_saved(directory):
        raise ConfigError(f"no saved adapter in {directory} (expected {META} and {TENSORS})")
    meta = json.loads((directory / META).read_text())
    if meta["backbone_key"] != ctx.backbone.key:
        raise ConfigError(f"{directory} was saved with backbone {meta['backbone_key']}, not {ctx.backbone.key}")
    if meta["classnames"] != ctx.classnames:
        raise ConfigError(f"{directory} was saved for the classes of {meta['dataset']}, which differ from "
                          f"{ctx.dataset}'s")
    cls = METHODS.get(meta["method"])
    method = cls(method_config(cls, meta["config"]), ctx)
    method.load_state_tensors(load_file(str(directory / TENSORS), device=str(ctx.device)))
    return method


def export_merged(method: Method, path: str | Path) -> Path:
    """Write the method's adapted CLIP, updates merged, as an open_clip safetensors checkpoint."""
    merged_weights = getattr(method, "merged_weights", None)
    if merged_weights is None:
        raise ConfigError(f"method {method.name!r} does not change the CLIP weights; nothing to merge")
    state: dict[str, torch.Tensor] = merged_weights()
    return atomic_write(Path(path), lambda tmp: save_file(state, str(tmp)))
