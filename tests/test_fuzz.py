"""Fuzz the readers and the config loader with seeded byte mutations of valid files.

Every case goes through `fsbench.cli.main`: a mutated file either still means something valid
(e.g. a space became a tab) or is refused with one line on stderr and a non-zero exit code;
never a traceback. Each family must mostly be refused, so the fuzz is not vacuous.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from datagen import make_aircraft, make_coop_dataset, make_imagenet

from fsbench.cli import main
from fsbench.dataprep import sources
from fsbench.dataprep.sources import DatasetSource

CASES = 100
ALPHABET = b' \t\n"\'[]{},:=.#-_/\\0123456789aeznNtf\x00\xff\xc3'
BENCH_TOML = b"""# a study
[study]
methods = ["zero_shot", "lora"]
shots = [1, 2, 4]
seeds = [1, 2, 3]

[runtime]
data_root = "data"  # CoOp layout
workers = 0
allow_repeat = false

[methods.lora]
rank = 2
betas = [0.9, 0.999]
"""


def mutate(data: bytes, rng: random.Random) -> bytes:
    """1-3 random edits: flip, delete, insert, truncate or duplicate a line."""
    for _ in range(rng.randint(1, 3)):
        if not data:
            break
        i = rng.randrange(len(data))
        kind = rng.choice(("flip", "delete", "insert", "truncate", "dup_line"))
        if kind == "flip":
            data = data[:i] + bytes([rng.choice(ALPHABET)]) + data[i + 1:]
        elif kind == "delete":
            data = data[:i] + data[i + rng.randint(1, 8):]
        elif kind == "insert":
            data = data[:i] + bytes(rng.choice(ALPHABET) for _ in range(rng.randint(1, 4))) + data[i:]
        elif kind == "truncate":
            data = data[:i]
        else:
            lines = data.split(b"\n")
            j = rng.randrange(len(lines))
            data = b"\n".join(lines[:j + 1] + lines[j:])
    return data


def fuzz(capsys, targets: list[Path], args: list[str], seed: int, refused_code: int) -> int:
    """Run `args` on CASES mutations of one of `targets` each; returns how many were refused."""
    originals = {t: t.read_bytes() for t in targets}
    assert main(args) in (0, refused_code)  # the unmutated files are fine
    capsys.readouterr()
    rng, refused = random.Random(seed), 0
    for case in range(CASES):
        target = rng.choice(targets)
        target.write_bytes(mutate(originals[target], rng))
        code = main(args)
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err, f"case {case} ({target.name}): {err}"
        if code != 0:
            assert code == refused_code and err.startswith("error:") and "\n" not in err, f"case {case}: {err}"
            refused += 1
        target.write_bytes(originals[target])
    return refused


@pytest.fixture
def tiny_expectations(monkeypatch) -> Callable[[str, tuple[int, int, int]], None]:
    """Make `data check` expect the generated datasets' sizes instead of the real ones."""
    def expect(name: str, counts: tuple[int, int, int]) -> None:
        monkeypatch.setitem(sources.SOURCES, name, DatasetSource(name, (), counts, 3))
    return expect


def test_fuzz_coop_split_json(capsys, tmp_path: Path, tiny_expectations) -> None:
    folder = make_coop_dataset(tmp_path, "caltech101")
    tiny_expectations("caltech101", (9, 3, 6))
    args = ["data", "check", "caltech101", "--root", str(tmp_path)]
    assert main(args) == 0
    assert fuzz(capsys, [folder / "split_zhou_Caltech101.json"], args, seed=1, refused_code=3) > CASES // 2


def test_fuzz_aircraft_lists(capsys, tmp_path: Path, tiny_expectations) -> None:
    folder = make_aircraft(tmp_path)
    tiny_expectations("fgvc_aircraft", (6, 6, 6))
    args = ["data", "check", "fgvc_aircraft", "--root", str(tmp_path)]
    assert main(args) == 0
    lists = [folder / f for f in ("variants.txt", "images_variant_train.txt", "images_variant_val.txt",
                                  "images_variant_test.txt")]
    assert fuzz(capsys, lists, args, seed=2, refused_code=3) > CASES // 2


def test_fuzz_imagenet_classnames(capsys, tmp_path: Path, tiny_expectations) -> None:
    folder = make_imagenet(tmp_path)
    tiny_expectations("imagenet", (9, 0, 6))
    args = ["data", "check", "imagenet", "--root", str(tmp_path)]
    assert main(args) == 0
    assert fuzz(capsys, [folder / "classnames.txt"], args, seed=3, refused_code=3) > CASES // 3


def test_fuzz_export_splits_reader_path(capsys, tmp_path: Path, monkeypatch) -> None:
    """The same split json through the command that draws shots from what the reader returns."""
    monkeypatch.chdir(tmp_path)
    folder = make_coop_dataset(tmp_path / "data", "dtd", counts=(2, 1, 1))
    args = ["data", "export-splits", "-d", "dtd", "-k", "1", "-s", "1", "--root", "data", "--out", "s.json"]
    assert fuzz(capsys, [folder / "split_zhou_DescribableTextures.json"], args, seed=4, refused_code=3) > CASES // 3


def test_fuzz_bench_toml(capsys, tmp_path: Path) -> None:
    """A broken bench.toml is refused before anything runs (exit 2, file:line); a still-valid one
    reaches the name check, which refuses the unknown dataset (exit 2 too)."""
    toml = tmp_path / "bench.toml"
    toml.write_bytes(BENCH_TOML)
    args = ["run", "--config", str(toml), "-m", "zero_shot", "-b", "test-tiny", "-d", "no_such_dataset"]
    assert fuzz(capsys, [toml], args, seed=5, refused_code=2) == CASES


def split_with(path: Path, edit: Callable[[dict], object]) -> str:
    doc = json.loads(path.read_text())
    edit(doc)
    return json.dumps(doc)


# Inputs a byte mutation almost never produces. Before the fixes in fsbench/data/coop.py the first two
# crashed the reader (RecursionError; ValueError from Python's 4300-digit int limit) and the next three
# were accepted: a lone surrogate later crashed the split fingerprint (UnicodeEncodeError), a NUL could
# not be opened, and "../" pointed outside the image folder.
NASTY_SPLITS = {
    "deep nesting": lambda p: "[" * 100_000 + "]" * 100_000,
    "5000-digit label": lambda p: p.read_text().replace(', 0, "apple_pie"', ", 1" + "0" * 5000 + ', "apple_pie"', 1),
    "lone surrogate": lambda p: split_with(p, lambda d: d["train"][0].__setitem__(0, "\ud800.jpg")),
    "NUL in path": lambda p: split_with(p, lambda d: d["train"][0].__setitem__(0, "a\x00b.jpg")),
    "path escapes": lambda p: split_with(p, lambda d: d["train"][0].__setitem__(0, "../../etc/passwd")),
    "UTF-8 BOM": lambda p: "\ufeff" + p.read_text(),
    "bool label": lambda p: split_with(p, lambda d: d["train"][0].__setitem__(1, True)),
}


@pytest.mark.parametrize("case", list(NASTY_SPLITS))
def test_nasty_split_files(capsys, tmp_path: Path, case: str) -> None:
    folder = make_coop_dataset(tmp_path, "caltech101")
    path = folder / "split_zhou_Caltech101.json"
    path.write_text(NASTY_SPLITS[case](path), encoding="utf-8", errors="surrogatepass")
    code = main(["data", "export-splits", "-d", "caltech101", "-k", "1", "-s", "1", "--root", str(tmp_path),
                 "--out", str(tmp_path / "s.json")])
    err = capsys.readouterr().err.strip()
    assert code == 3 and err.startswith("error: caltech101: malformed split file") and "\n" not in err


@pytest.mark.parametrize("text", ["a = " + "[" * 100_000 + "]" * 100_000, "[runtime]\nworkers = 1" + "0" * 5000])
def test_nasty_bench_toml(capsys, tmp_path: Path, text: str) -> None:
    (tmp_path / "bench.toml").write_text(text)
    assert main(["run", "--config", str(tmp_path / "bench.toml"), "-m", "zero_shot", "-d", "synthetic"]) == 2
    err = capsys.readouterr().err.strip()
    assert "invalid TOML" in err and "\n" not in err
