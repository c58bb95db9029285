"""The results store: one JSON file per (protocol, method, backbone, dataset, shots, seed).

This module never imports torch, so reports run on a laptop with results copied from a cluster.
Schema 2 added the protocol, named metrics and the result's identity; schema-1 files (few-shot
only) still load: protocol "fewshot", metrics {"top1": top1}, identity unknown.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fsbench.io import atomic_write_json

SCHEMA_VERSION = 2
log = logging.getLogger(__name__)


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
    protocol: str = "fewshot"
    protocol_version: int = 1
    source_dataset: str | None = None  # cross-dataset protocols: the dataset the method was fitted on
    metrics: dict[str, float | None] = field(default_factory=dict)
    not_applicable: dict[str, str] = field(default_factory=dict)  # metric -> why the method cannot produce it
    identity: dict[str, str] = field(default_factory=dict)  # what the number depends on (fsbench.identity)
    identity_hash: str = ""
    curves: dict[str, Any] = field(default_factory=dict)  # training curves per phase (fsbench.curves); {} if none

    @property
    def folder(self) -> str:
        """The protocol's path segment ("" for few-shot: the layout results had before protocols)."""
        if self.protocol == "fewshot":
            return ""
        return f"{self.protocol}-from-{self.source_dataset}" if self.source_dataset else self.protocol


def result_path(results_dir: str | Path, method: str, backbone: str, dataset: str, shots: int,
                seed: int, folder: str = "") -> Path:
    """Where the result of one run lives: <dir>/<backbone>/<dataset>/<method>/[<protocol>/]shots<K>_seed<S>.json
    (few-shot results have no protocol folder)."""
    base = Path(results_dir) / slug(backbone) / slug(dataset) / slug(method)
    return (base / slug(folder) if folder else base) / f"shots{shots}_seed{seed}.json"


def path_of(results_dir: str | Path, result: Result) -> Path:
    return result_path(results_dir, result.method, result.backbone, result.dataset, result.shots, result.seed,
                       result.folder)


def write_result(results_dir: str | Path, result: Result) -> Path:
    """Write `result` atomically and return its path."""
    return atomic_write_json(path_of(results_dir, result), asdict(result))


def file_fingerprint(path: str | Path) -> str | None:
    """SHA-256 of a result file's bytes (None when there is none): what a run saw when it decided."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return None


@contextlib.contextmanager
def cell_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on one result cell (a hidden `.<name>.lock` beside it) while a run checks
    what is stored and renames its result in place; no lock where the platform has none."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the check just before the rename still narrows the window to microseconds
        yield
        return
    lock = Path(path).parent / f".{Path(path).name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class ResultFileError(ValueError):
    """A result file that cannot be read or parsed; the message names the file and why."""


def parse_result(data: Any, path: str | Path = "") -> Result:
    """A `Result` from a parsed JSON object; schema-1 files are upgraded, unknown fields rejected."""
    if not isinstance(data, dict):
        raise ResultFileError(f"{path}: not a result (a JSON object was expected)")
    names = {f.name for f in fields(Result)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ResultFileError(f"{path}: unknown field(s) {', '.join(unknown)} (written by a newer fsbench?)")
    try:
        result = Result(**data)
    except TypeError as exc:
        raise ResultFileError(f"{path}: not a result ({exc})") from None
    if int(data.get("schema_version", 1)) < 2:
        result.metrics = {"top1": result.top1}
        result.identity_hash = ""
    if not isinstance(result.metrics, dict) or not isinstance(result.config, dict):
        raise ResultFileError(f"{path}: malformed result (metrics and config must be objects)")
    return result


def read_result_strict(path: str | Path) -> Result:
    """Read one result file or raise `ResultFileError` saying why it cannot be used."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ResultFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, RecursionError) as exc:
        raise ResultFileError(f"{path}: not valid JSON ({exc})") from None
    return parse_result(data, path)


def read_result(path: str | Path) -> Result | None:
    """Read one result file; None when it is unreadable or malformed."""
    try:
        return read_result_strict(path)
    except ResultFileError:
        return None


def scan_results(results_dir: str | Path) -> tuple[list[Result], list[str]]:
    """Every result under `results_dir` sorted by path, and one line for each file that could not be
    used (unreadable, corrupt, unknown fields) or holds no number: nothing is dropped without a word."""
    results, problems = [], []
    for path in sorted(Path(results_dir).rglob("shots*_seed*.json")):
        try:
            result = read_result_strict(path)
        except ResultFileError as exc:
            problems.append(str(exc))
            continue
        results.append(result)
        if result.status == "ok" and result.top1 is None and not result.not_applicable:
            problems.append(f"{path}: status ok but no top1 (hand-edited or interrupted?); it is left out of "
                            "the tables")
    return results, problems


def iter_results(results_dir: str | Path) -> list[Result]:
    """Every readable result under `results_dir`, sorted by path; unusable files are logged."""
    results, problems = scan_results(results_dir)
    for line in problems:
        log.warning("skipped result file %s", line)
    return results


def canonical_dataset(name: str) -> str:
    """A dataset alias's main name ("pets" -> "oxford_pets"); unknown names are kept as they are."""
    from fsbench.data import DATASETS  # torch-free readers

    return DATASETS.canonical(name) if name in DATASETS else name


def load_results(results_dir: str | Path, include_failed: bool = False, warn=None):
    """Load a results store as a pandas DataFrame, one row per run.

    Columns are the `Result` fields (nested `config`, `versions`, `metrics`, `identity` and `extra`
    kept as dicts); dataset aliases are canonicalised. `warn(line)` receives one line per file that
    could not be read (default: the `logging` warning).
    """
    import pandas as pd

    results, problems = scan_results(results_dir)
    for line in problems:
        (warn or (lambda m: log.warning("skipped result file %s", m)))(line)
    rows = []
    for r in results:
        if include_failed or r.status == "ok":
            row = asdict(r)
            row["dataset"] = canonical_dataset(r.dataset)
            if r.source_dataset:
                row["source_dataset"] = canonical_dataset(r.source_dataset)
            rows.append(row)
    columns = list(Result.__dataclass_fields__)
    return separate_variants(pd.DataFrame(rows, columns=columns), warn)


CELL = ["protocol", "method", "backbone", "dataset", "source_dataset", "shots"]
PER_SEED = ("fewshot", "order")  # identity components that differ from seed to seed by design (the draw, the order)


def _seedless(identity: Any) -> tuple[str, str]:
    """(the non-file components, the file components) of an identity without its per-seed ones, each as a
    digest; the file components are "" for identities of before content stamps (stamped by size and mtime, so not
    comparable with today's content digests)."""
    ident = identity if isinstance(identity, dict) else {}
    files = {k: v for k, v in ident.items() if k.startswith("eval:")}
    rest = {k: v for k, v in ident.items() if k not in PER_SEED and k not in files and k != "files"}
    digest = lambda obj: hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:6]  # noqa: E731
    return (digest(rest) if rest else ""), (digest(files) if files and "files" in ident else "")


def _differs(group: Any) -> list[str]:
    """What differs between the seeds of one cell, in words."""
    from fsbench.identity import LABELS

    words = []
    if group["config_hash"].nunique() > 1 or group["schema_version"].nunique() > 1:
        words.append("configs or schema versions")
    idents = [i for i in group["identity"] if isinstance(i, dict) and i]
    for key in sorted({k for i in idents for k in i} - set(PER_SEED) - {"files"}):
        if len({i.get(key) for i in idents}) > 1 and (not key.startswith("eval:") or all("files" in i for i in idents)):
            words.append(LABELS.get(key, f"test images of {key[5:].split('/')[0]}" if key.startswith("eval:") else key))
    return list(dict.fromkeys(words))


def separate_variants(df, warn=None):
    """Never average across configs, schema versions or anything else a number depends on: in a cell whose
    seeds were run with different configs (`config_hash`), schema versions or seed-independent identity
    components (weights, protocol, lists, evaluation sets, flags, method code, classes: everything but the
    draw), each variant's method is labelled `method [cfg <hash>]` (one warning line per such cell, saying
    what differs), so tables keep them apart."""
    import pandas as pd

    if df.empty:
        return df
    seedless = [_seedless(i) for i in df["identity"]]
    variant = pd.Series([f"{str(h or '')[:6]}/s{v}" + (f"/{a}{b}" if a else "") for h, v, (a, b) in
                         zip(df["config_hash"], df["schema_version"], seedless, strict=True)], index=df.index)
    keys = pd.Series(["|".join("" if v is None or v != v else str(v) for v in row)
                      for row in df[CELL].itertuples(index=False)], index=df.index)
    rest = pd.Series([a for a, _ in seedless], index=df.index)
    files = pd.Series([b or None for _, b in seedless], index=df.index)
    plain = pd.Series([f"{str(h or '')[:6]}/s{v}" for h, v in zip(df["config_hash"], df["schema_version"],
                                                                   strict=True)], index=df.index)
    mixed = ((plain.groupby(keys).transform("nunique") > 1) | (rest.groupby(keys).transform("nunique") > 1)
             | (files.groupby(keys).transform("nunique") > 1))
    for cell in sorted(set(keys[mixed])):
        what = " or ".join(_differs(df[keys == cell])) or "identities"
        (warn or (lambda m: log.warning("%s", m)))(
            f"{' '.join(cell.split())}: seeds run with different {what} are reported separately, never averaged")
    df = df.copy()
    df.loc[mixed, "method"] = df.loc[mixed, "method"] + " [cfg " + variant[mixed] + "]"
    return df
