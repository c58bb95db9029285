"""CoOp's split files: `fsbench data import-splits` reads them without Dassl, `export-splits --format coop`
writes them. The pickles under tests/fixtures/samplers/pickles/ were written by CoOp itself with Dassl's
`Datum` (README.md there), on the trees of tests/sampler_trees.py, with its absolute paths."""

from __future__ import annotations

import json
import pickle
import pickletools
from pathlib import Path

import pytest
from sampler_trees import make_trees

from fsbench.cli import main
from fsbench.coop_pickle import DATUM_MODULE, DATUM_NAME, coop_pickle_bytes, read_coop_pickle
from fsbench.data import load_dataset
from fsbench.errors import DataError
from fsbench.results import iter_results
from fsbench.samplers import get_sampler

FIXTURES = Path(__file__).parent / "fixtures" / "samplers"
PICKLES = sorted((FIXTURES / "pickles").glob("*/*.pkl"))
CALLED: list[str] = []


def fixture_draws() -> dict[tuple[str, int, int], dict]:
    doc = json.loads((FIXTURES / "coop.json").read_text(encoding="utf-8"))
    return {(d["dataset"], d["shots"], d["seed"]): d for d in doc["draws"]}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_trees(tmp_path_factory.mktemp("trees") / "data")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def import_splits(files: list[Path], dataset: str, root: Path, out: Path) -> int:
    return main(["data", "import-splits", *map(str, files), "-d", dataset, "--root", str(root), "--out", str(out)])


def test_fixture_pickles_hold_only_dassls_datum() -> None:
    assert len(PICKLES) == 8
    for f in PICKLES:
        found = [arg for op, arg, _ in pickletools.genops(f.read_bytes()) if op.name in ("GLOBAL", "STACK_GLOBAL")
                 or (op.name == "SHORT_BINUNICODE" and arg in (DATUM_MODULE, DATUM_NAME))]
        assert DATUM_MODULE in found and DATUM_NAME in found
        assert str(read_coop_pickle(f)["train"][0].impath).startswith("/dev/shm/fsbench_samplers_")


@pytest.mark.parametrize("dataset", ["oxford_pets", "eurosat", "fgvc_aircraft", "imagenet"])
def test_coops_own_pickles_import_to_the_same_images(root: Path, tmp_path: Path, dataset: str) -> None:
    files = sorted((FIXTURES / "pickles" / dataset).glob("*.pkl"))
    out = tmp_path / "splits.json"
    assert import_splits(files, dataset, root, out) == 0
    entries = json.loads(out.read_text())["splits"]
    draws = fixture_draws()
    data = load_dataset(dataset, root)
    assert len(entries) == len(files) == 2
    for e in entries:
        want = draws[(dataset, e["shots"], e["seed"])]
        assert e["sampler"] == "coop" and e["train"] == want["train"]
        if want["val"] is not None:
            assert e["val"] == want["val"]
        else:  # ImageNet: CoOp validates on the test set; fsbench takes the coop sampler's val from train
            mine = get_sampler("coop").draw(data, e["shots"], e["seed"])
            assert e["val"] == [[it.path, it.label] for it in mine.items(data, "val")]
            assert not {p for p, _ in e["val"]} & {p for p, _ in e["train"]}


def evil(note: str) -> None:  # a global the refused pickles would call
    CALLED.append(note)


class Evil:
    def __reduce__(self):
        return (evil, ("unpickled",))


@pytest.mark.parametrize("payload,named", [
    ({"train": [Evil()], "val": []}, "test_coop_pickle.evil"),
    ({"train": [print], "val": []}, "builtins.print"),
])
def test_any_other_global_is_refused_and_never_called(root: Path, tmp_path: Path, capsys, payload, named) -> None:
    bad = tmp_path / "shot_1-seed_1.pkl"
    bad.write_bytes(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
    assert import_splits([bad], "oxford_pets", root, tmp_path / "s.json") == 3
    err = one_line_error(capsys)
    assert named in err and "refused" in err
    assert CALLED == [] and not (tmp_path / "s.json").exists()


def test_old_protocol_reconstructor_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "shot_1-seed_1.pkl"
    bad.write_bytes(b"ccopyreg\n_reconstructor\n(tR.")  # how protocols 0 and 1 rebuild an object
    with pytest.raises(DataError, match="copyreg._reconstructor"):
        read_coop_pickle(bad)


def rewrite(src: Path, dst: Path, change) -> Path:
    roles = read_coop_pickle(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(coop_pickle_bytes({r: [change(i, d) for i, d in enumerate(ds)] for r, ds in roles.items()}))
    return dst


def test_missing_file_and_label_mismatch_are_one_line(root: Path, tmp_path: Path, capsys) -> None:
    from dataclasses import replace

    src = FIXTURES / "pickles" / "oxford_pets" / "shot_2-seed_1.pkl"
    first = read_coop_pickle(src)["train"][0]
    relabel = rewrite(src, tmp_path / "a" / src.name, lambda i, d: replace(d, label=(d.label + 1) % 5) if i == 0 else d)
    assert import_splits([relabel], "oxford_pets", root, tmp_path / "s.json") == 3
    err = one_line_error(capsys)
    rel = first.impath.split("/images/")[1]
    assert f"{rel} has label {(first.label + 1) % 5}" in err and f"but {first.label}" in err
    gone = rewrite(src, tmp_path / "b" / src.name,
                   lambda i, d: replace(d, impath=d.impath.replace(rel, "beagle/not_here.jpg")) if i == 0 else d)
    assert import_splits([gone], "oxford_pets", root, tmp_path / "s.json") == 3
    err = one_line_error(capsys)
    assert "not_here.jpg is missing here" in err
    named = tmp_path / "c" / "fewshot.pkl"
    named.parent.mkdir()
    named.write_bytes(src.read_bytes())
    assert import_splits([named], "oxford_pets", root, tmp_path / "s.json") == 3
    assert "shot_<K>-seed_<S>.pkl" in one_line_error(capsys)
    truncated = tmp_path / "d" / src.name
    truncated.parent.mkdir()
    truncated.write_bytes(src.read_bytes()[:100])
    assert import_splits([truncated], "oxford_pets", root, tmp_path / "s.json") == 3
    assert "not a CoOp split file" in one_line_error(capsys)


@pytest.mark.parametrize("dataset", ["eurosat", "imagenet"])
def test_exported_coop_pickles_import_back_to_the_same_draw(root: Path, tmp_path: Path, monkeypatch,
                                                            dataset: str) -> None:
    monkeypatch.chdir(tmp_path)
    common = ["-d", dataset, "-k", "2,4", "-s", "1,2", "--root", str(root), "--sampler", "coop"]
    assert main(["data", "export-splits", *common, "--format", "coop", "--out", "coop"]) == 0
    assert main(["data", "export-splits", *common, "--out", "ref.json"]) == 0
    files = sorted((tmp_path / "coop" / dataset / "split_fewshot").glob("*.pkl"))
    assert [f.name for f in files] == [f"shot_{k}-seed_{s}.pkl" for k in (2, 4) for s in (1, 2)]
    for f in files:  # only Dassl's Datum as a global, as CoOp's own files
        ops = list(pickletools.genops(f.read_bytes()))
        assert [a for op, a, _ in ops if op.name == "GLOBAL"] == [f"{DATUM_MODULE} {DATUM_NAME}"]
    assert import_splits(files, dataset, root, tmp_path / "back.json") == 0
    back = {(e["shots"], e["seed"]): e for e in json.loads((tmp_path / "back.json").read_text())["splits"]}
    for e in json.loads((tmp_path / "ref.json").read_text())["splits"]:
        assert back[(e["shots"], e["seed"])] == e


def test_run_trains_on_an_imported_coop_split(root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    src = FIXTURES / "pickles" / "eurosat" / "shot_2-seed_1.pkl"
    assert import_splits([src], "eurosat", root, tmp_path / "s.json") == 0
    entry = json.loads((tmp_path / "s.json").read_text())["splits"][0]
    assert main(["run", "-m", "linear_probe", "-b", "test-tiny", "-d", "eurosat", "--shots", "2", "--seed", "1",
                 "--device", "cpu", "--workers", "0", "--data-root", str(root), "--results", "res",
                 "--set", "linear_probe.max_iter=5", "--set", "linear_probe.weight_decays=[0.01]",
                 "--splits", str(tmp_path / "s.json")]) == 0
    (result,) = list(iter_results(tmp_path / "res"))
    assert result.split_checksum == entry["checksum"]
