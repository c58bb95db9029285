"""Configuration: built-in defaults < bench.toml < command line (`--set lora.rank=4`).

Sections are plain dataclasses; every key a user writes is checked against their fields and
types, and an unknown key is an error naming the file, the line and the valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsbench.errors import ConfigError
from fsbench.samplers import DEFAULT_SAMPLER

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PAPER_DATASETS = ["imagenet", "sun397", "fgvc_aircraft", "eurosat", "stanford_cars", "food101",
                  "oxford_pets", "oxford_flowers", "caltech101", "dtd", "ucf101"]


_EXAMPLE = {"methods": '["lora"]', "backbones": '["ViT-B/16"]', "datasets": '["dtd"]', "shots": "[1, 4]",
            "seeds": "[1, 2, 3]", "protocols": '["fewshot"]'}


@dataclass
class Study:
    """What to run: the product of these lists."""

    methods: list[str] = field(default_factory=lambda: ["zero_shot", "linear_probe", "lora"])
    backbones: list[str] = field(default_factory=lambda: ["ViT-B/16", "ViT-B/32", "ViT-L/14"])
    datasets: list[str] = field(default_factory=lambda: list(PAPER_DATASETS))
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    pretrained: str = ""  # "" = the backbone's default ("openai" for the paper's ViTs)
    checkpoint: str = ""  # a local weights file instead of a pretrained tag
    protocols: list[str] = field(default_factory=lambda: ["fewshot"])  # fewshot, base2new, cross_dataset, ...
    cross_targets: list[str] = field(default_factory=lambda: [d for d in PAPER_DATASETS if d != "imagenet"])
    dg_targets: list[str] = field(default_factory=lambda: ["imagenet_v2", "imagenet_sketch", "imagenet_a",
                                                           "imagenet_r"])
    # ood: the OOD sets scored against the ID test split (MOS's four, for ImageNet) and the score function
    ood_targets: list[str] = field(default_factory=lambda: ["ood_inaturalist", "ood_sun", "ood_places",
                                                            "ood_textures"])
    ood_score: str = "mcm"  # mcm | max_logit | energy (fsbench.ood; MCM's default is mcm)
    sampler: str = DEFAULT_SAMPLER  # few-shot sampler: fsbench | clip_lora | coop (`fsbench ls samplers`)
    # cross_dataset / domain_generalisation: the sources and shots they are planned with, when no
    # --datasets / --shots flag names them; [] = the papers' (source imagenet, 16 shots)
    transfer_sources: list[str] = field(default_factory=list)
    transfer_shots: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("methods", "backbones", "datasets", "shots", "seeds", "protocols"):
            if not getattr(self, name):
                raise ValueError(f"{name} is empty: list at least one (e.g. {name} = {_EXAMPLE[name]})")
        from fsbench.protocols import OOD_SCORES

        if self.ood_score not in OOD_SCORES:
            raise ValueError(f"ood_score must be one of {', '.join(OOD_SCORES)}, got {self.ood_score!r}")
        bad = [k for k in [*self.shots, *self.transfer_shots] if k < 1]
        if bad:
            raise ValueError(f"shots must be >= 1, got {bad[0]}")


@dataclass
class Runtime:
    """Where and how to run."""

    data_root: str = "data"
    results: str = "results/runs"
    cache_dir: str = ".fsbench_cache"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    workers: int = -1  # image loader processes; -1 = one per core, at most 8
    eval_batch_size: int = 256
    allow_repeat: bool = False  # `fsbench` sampler: small classes sampled with replacement (CLIP-LoRA's rule)
    skip_bad_images: bool = False  # leave undecodable image files out (counted in each result)
    splits: str = ""  # few-shot splits file from `fsbench data export-splits`, used instead of local draws
    save_adapters: str = ""  # folder for what each run learned (`--save-adapter DIR`); "" = not saved

    def __post_init__(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")


@dataclass
class Sweep:
    """How `fsbench sweep` / `fsbench ablate` execute their runs."""

    executor: str = "local"  # local: in this process, one device | ray: one Ray worker per GPU (or CPU slot)
    ray_address: str = ""  # "" = start a local Ray instance for the sweep; "auto" or host:port = join a cluster
    gpus_per_run: float = 1.0  # GPUs per Ray worker when the cluster has GPUs (0.5 = two workers per GPU)
    cpus_per_run: float = 1.0  # CPUs per Ray worker on a CPU-only cluster
    workers: int = 0  # Ray workers; 0 = as many as the cluster's resources allow
    max_failures: int = -1  # stop starting runs once more than this many failed (0: at the first); -1 = never

    def __post_init__(self) -> None:
        if self.executor not in ("local", "ray"):
            raise ValueError(f"executor must be local or ray, got {self.executor!r}")
        if self.gpus_per_run <= 0 or self.cpus_per_run <= 0 or self.workers < 0 or self.max_failures < -1:
            raise ValueError("need gpus_per_run > 0, cpus_per_run > 0, workers >= 0 and max_failures >= -1")


@dataclass
class Ablation:
    """Figure 3 of CLIP-LoRA: variants of `method` around its configured defaults, three panels:
    (a) matrices x ranks, (b) positions, (c) encoders; each stored under its own label."""

    enabled: bool = False  # also run the grid in `fsbench sweep` (`fsbench ablate` runs it regardless)
    method: str = "lora"
    backbones: list[str] = field(default_factory=lambda: ["ViT-B/16"])
    datasets: list[str] = field(default_factory=lambda: list(PAPER_DATASETS))
    shots: list[int] = field(default_factory=lambda: [4])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    matrices: list[list[str]] = field(default_factory=lambda: [
        ["q"], ["k"], ["v"], ["o"], ["q", "k"], ["q", "v"], ["k", "v"], ["q", "k", "v"], ["q", "k", "v", "o"]])
    ranks: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    positions: list[str] = field(default_factory=lambda: ["bottom", "mid", "up", "half-bottom", "half-up", "all"])
    encoders: list[str] = field(default_factory=lambda: ["vision", "text", "both"])


@dataclass
class BenchConfig:
    """A whole bench.toml: the study, the runtime, and per-method settings (`[methods.X]`)."""

    study: Study = field(default_factory=Study)
    runtime: Runtime = field(default_factory=Runtime)
    sweep: Sweep = field(default_factory=Sweep)
    ablation: Ablation = field(default_factory=Ablation)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)


SECTIONS: dict[str, type] = {"study": Study, "runtime": Runtime, "sweep": Sweep, "ablation": Ablation}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` (int, float, str, bool, list[...], tuple,
    Optional, Literal) and return it converted (int -> float, list -> tuple)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: must be one of {', '.join(map(repr, args))}, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in re.split(r"[,\s]+", value) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [coerce(v, inner, where) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):  # a nested config (a composed method's parts)
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return build_dataclass(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool, dict) and isinstance(value, tp) and not (
            tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def build_dataclass(cls: type, values: dict[str, Any], where: str, base: Any = None) -> Any:
    """Instantiate `cls` from `values` over `base` (or the defaults), checking keys and types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    current = {n: getattr(base, n) for n in names} if base is not None else {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(names)}")
        current[key] = coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**current)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _line_of(text: str, key: str) -> int | None:
    for i, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*\[?\s*{re.escape(key)}\s*[=\].]", line):
            return i
    return None


def load_bench(path: str | Path | None) -> BenchConfig:
    """Read bench.toml (or return the defaults for None); errors carry file:line."""
    if path is None:
        return BenchConfig()
    path = Path(path)
    try:
        text = path.read_text()
        raw = tomllib.loads(text)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, RecursionError) as exc:  # bad TOML or UTF-8, a 5000-digit int, [[[[... nesting
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    cfg = BenchConfig()
    for section, values in raw.items():
        line = _line_of(text, section)
        where = f"{path}:{line}" if line else str(path)
        if section == "methods":
            if not isinstance(values, dict) or not all(isinstance(v, dict) for v in values.values()):
                raise ConfigError(f"{where}: [methods] must hold one table per method, e.g. [methods.lora]")
            cfg.methods = {k.lower(): dict(v) for k, v in values.items()}
            for name, table in cfg.methods.items():
                mline = _line_of(text, f"methods.{name}")
                check_method_section(name, table, f"{path}:{mline}" if mline else str(path))
        elif section in SECTIONS:
            if not isinstance(values, dict):
                raise ConfigError(f"{where}: {section} must be a table, [{section}]")
            for key in values:
                kline = _line_of(text, key)
                kwhere = f"{path}:{kline}" if kline else str(path)
                build_dataclass(SECTIONS[section], {key: values[key]}, f"{kwhere}: [{section}]")
            setattr(cfg, section, build_dataclass(SECTIONS[section], values, f"{where}: [{section}]"))
        else:
            valid = ", ".join([*SECTIONS, "methods"])
            raise ConfigError(f"{where}: unknown section [{section}]; valid sections: {valid}")
    return cfg


def parse_value(text: str) -> Any:
    """A --set value: TOML syntax when it parses (4, 0.5, true, ["q","v"]), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (ValueError, RecursionError):
        return text


def apply_sets(cfg: BenchConfig, sets: list[str]) -> BenchConfig:
    """Apply `--set section.key=value` overrides; a section that is not study/runtime is a
    method name (`lora.rank=4` sets [methods.lora] rank)."""
    for item in sets:
        target, sep, value = item.partition("=")
        section, dot, key = target.strip().partition(".")
        if not sep or not dot or not key:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. lora.rank=4")
        parsed = parse_value(value.strip())
        if section in SECTIONS:
            updated = build_dataclass(SECTIONS[section], {key: parsed}, f"--set {section}",
                                      getattr(cfg, section))
            setattr(cfg, section, updated)
        else:
            table = {**cfg.methods.get(section.lower(), {}), key: parsed}
            check_method_section(section.lower(), table, "--set")
            cfg.methods[section.lower()] = table
    return cfg


def check_method_section(name: str, values: dict[str, Any], where: str) -> None:
    """A `[methods.<name>]` table or `--set <name>.<key>=...`: the method must be registered
    (a one-line error with a did-you-mean otherwise) and the values must make a valid config."""
    from fsbench.catalog import method_class, method_names  # lazy: the live registry imports torch and the methods

    prefix = "" if where == "--set" else f"{where}: "
    if "+" in name:  # METHOD+STEP (fsbench.transduction) takes each part's own table
        parts = " and ".join(f"[methods.{p}]" for p in name.split("+"))
        raise ConfigError(f"{prefix}{name!r} has no settings of its own: set its parts in {parts}")
    names = method_names()
    if name not in names:
        close = difflib.get_close_matches(name, [*names, *SECTIONS], n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known methods: {', '.join(names)}"
        place = f"[methods.{name}]" if prefix else "--set"
        what = "section or method" if close and close[0] in SECTIONS else "method"
        raise ConfigError(f"{prefix}unknown {what} {name!r} in {place}{hint}")
    try:
        method_config(method_class(name), values)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}") from None


def method_config(method_cls: type, overrides: dict[str, Any]) -> Any:
    """The method's `Config` with user overrides applied and validated."""
    return build_dataclass(method_cls.Config, overrides, f"[methods.{method_cls.name}]")
