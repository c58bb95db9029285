"""Every key is content (issue 20): a cache, a stored draw or a report cell is keyed by what the number
depends on, by content (git's index: size, mtime, ctime, inode and device, confirmed by a SHA-256 whenever
one of them differs), never by a path, a size and an mtime. Each case a hostile or careless user reported is
a test here; a user who follows a refusal's advice (`--force`) gets the number of what is on disk now."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datagen import COLOURS, _encoded, make_coop_dataset
from test_trust import DTD_JSON, RUN, cli, dtd_run

from fsbench.cli import main
from fsbench.results import load_results, read_result

PADDED = 2048  # every test image is padded to this size, so that other pixels can take the same number of bytes


@pytest.fixture
def lab(tmp_path, monkeypatch):
    """A working folder with a DTD-layout dataset (3 classes, 3/2/3 images per class), as test_trust's."""
    monkeypatch.chdir(tmp_path)
    make_coop_dataset(tmp_path / "data", "dtd", counts=(3, 2, 3))
    return tmp_path


def stored(lab: Path, method: str = "zero_shot", dataset: str = "dtd", folder: str = ""):
    return read_result(lab / f"results/runs/test-tiny/{dataset}/{method}/{folder}shots1_seed1.json")


def edit_split(lab: Path, edit) -> None:
    path = lab / "data/dtd" / DTD_JSON
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def test_images(lab: Path) -> list[Path]:
    return sorted((lab / "data/dtd/images").glob("*/test_*.jpg"))


test_images.__test__ = False  # a helper, not a test


def padded(colour: int) -> bytes:
    """A tiny JPEG of `colour` padded with zeros after its end marker to PADDED bytes (decoders stop there)."""
    data = _encoded(".jpg", COLOURS[colour])
    assert len(data) < PADDED
    return data + b"\0" * (PADDED - len(data))


def replace_keeping_stat(path: Path, data: bytes) -> None:
    """Other bytes of the same size, with the old mtime put back (what `cp -p`, `rsync -a` or tar do)."""
    st = path.stat()
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def fresh_top1(lab: Path, capsys, *extra: str, method: str = "zero_shot") -> float:
    """The number a clean clone gets on the data as it is now (no results, no caches)."""
    for folder in ("results", ".fsbench_cache"):
        shutil.rmtree(lab / folder, ignore_errors=True)
    assert dtd_run(capsys, *extra, method=method)[0] == 0
    return stored(lab, method).top1


def tiny_checkpoint(path: Path, seed: int) -> None:
    """test-tiny weights: seed 0's, each float tensor moved by seed's noise (same keys and shapes, so the
    file has the same size for every seed)."""
    import open_clip

    from fsbench.backbones import TEST_TINY

    torch.manual_seed(0)
    state = open_clip.CLIP(**TEST_TINY, quick_gelu=True).state_dict()
    g = torch.Generator().manual_seed(seed)
    torch.save({k: v + 0.5 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
                for k, v in state.items()}, path)


# ---- 1. a checkpoint replaced by other weights of the same size, mtime kept -------------------------------

def test_feature_cache_key_is_the_checkpoints_content(tmp_path):
    from fsbench.backbones import BackboneSpec

    ckpt, other = tmp_path / "w.pt", tmp_path / "other" / "w.pt"  # torch.save names the archive after the file
    other.parent.mkdir()
    tiny_checkpoint(ckpt, 0)
    tiny_checkpoint(other, 1)
    assert ckpt.stat().st_size == other.stat().st_size  # same shapes: same size
    before = BackboneSpec("test-tiny", checkpoint=str(ckpt)).cache_key()
    replace_keeping_stat(ckpt, other.read_bytes())
    after = BackboneSpec("test-tiny", checkpoint=str(ckpt)).cache_key()
    assert after != before
    assert after == BackboneSpec("test-tiny", checkpoint=str(other)).cache_key()  # content, not path


def test_checkpoint_replaced_with_mtime_kept_gives_the_new_weights_number_under_force(lab, capsys):
    ckpt = lab / "w.pt"
    tiny_checkpoint(ckpt, 0)
    (lab / "other").mkdir()
    tiny_checkpoint(lab / "other/w.pt", 3)  # torch.save names the archive after the file: the same name
    assert dtd_run(capsys, "--checkpoint", "w.pt", method="linear_probe")[0] == 0
    replace_keeping_stat(ckpt, (lab / "other/w.pt").read_bytes())
    code, err = dtd_run(capsys, "--checkpoint", "w.pt", method="linear_probe")
    assert code == 2 and "backbone weights" in err
    assert dtd_run(capsys, "--checkpoint", "w.pt", "--force", method="linear_probe")[0] == 0
    forced = stored(lab, "linear_probe")
    assert forced.top1 == fresh_top1(lab, capsys, "--checkpoint", "w.pt", method="linear_probe")


# ---- 2. test images replaced by other bytes of the same size, mtime kept ----------------------------------

def test_same_size_same_mtime_test_images_are_seen_and_re_encoded(lab, capsys):
    for p in test_images(lab):
        p.write_bytes(padded({"apple_pie": 0, "beta": 1, "gamma": 2}[p.parent.name]))
    assert dtd_run(capsys)[0] == 0
    before = stored(lab)
    for p in test_images(lab):
        replace_keeping_stat(p, padded(3))  # every test image the 4th colour, same size, same mtime
    code, err = dtd_run(capsys)
    assert code == 2 and "test images of dtd" in err  # refused, not reused
    assert dtd_run(capsys, "--force")[0] == 0
    forced = stored(lab)
    assert forced.identity_hash != before.identity_hash
    assert forced.top1 == fresh_top1(lab, capsys)


def test_force_re_encodes_rows_it_cannot_verify(lab, make_runner):
    """The feature cache's rows: the old features of a replaced file are never returned, with or without
    --force, even when size and mtime are those the row was encoded from."""
    from fsbench.spec import RunSpec

    for p in test_images(lab):
        p.write_bytes(padded(0))
    runner = make_runner(lab)
    runner.cfg.runtime.data_root = str(lab / "data")
    spec = RunSpec("zero_shot", "test-tiny", "dtd", 1, 1)
    runner.run(spec)
    for p in test_images(lab):
        replace_keeping_stat(p, padded(2))
    again = make_runner(lab)
    again.cfg.runtime.data_root = str(lab / "data")
    again.run(spec, force=True)
    assert again.executor.features.encoded_images == len(test_images(lab))


# ---- 3. the other side: touch or an identical copy is the same content ------------------------------------

@pytest.mark.parametrize("how", ["touch", "copy"])
def test_touched_or_copied_test_images_are_reused(lab, capsys, how):
    assert dtd_run(capsys)[0] == 0
    before = stored(lab)
    time.sleep(0.01)
    for p in test_images(lab):
        if how == "touch":
            os.utime(p)
        else:  # an identical copy put in place: new inode, new mtime and ctime
            shutil.copy(p, p.with_suffix(".tmp"))
            os.replace(p.with_suffix(".tmp"), p)
    code, err = dtd_run(capsys)
    assert code == 0, err
    assert stored(lab).created_at == before.created_at  # reused, not re-run


def test_touched_images_are_not_re_encoded(lab, make_runner):
    from fsbench.spec import RunSpec

    runner = make_runner(lab)
    runner.cfg.runtime.data_root = str(lab / "data")
    spec = RunSpec("linear_probe", "test-tiny", "dtd", 1, 1)
    runner.run(spec)
    time.sleep(0.01)
    for p in (lab / "data/dtd/images").rglob("*.jpg"):
        os.utime(p)
    again = make_runner(lab)
    again.cfg.runtime.data_root = str(lab / "data")
    _, reused = again.run(spec, force=True)
    assert not reused and again.executor.features.encoded_images == 0  # every cached row verified by content


# ---- 4. the report never averages seeds of different weights or test sets -----------------------------------

def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def _result(**kw):
    base = {"method": "lora", "backbone": "ViT-B/16", "dataset": "dtd", "shots": 1, "seed": 1,
            "top1": 50.0, "config_hash": "aaaaaa", "schema_version": 2, "protocol": "fewshot",
            "metrics": {"top1": 50.0}, "n_test": 9,
            "identity": {"protocol": "fewshot/v1", "method": "m", "weights": "ViT-B/16|sha256:aaaa",
                         "train_list": "t", "val_list": "v", "fewshot": "seed-1-draw", "flags": "f",
                         "classes": "c", "eval:dtd/top1": "e9", "files": "sha256"}}
    return {**base, **kw}


@pytest.mark.parametrize("component, words", [
    ("weights", "backbone weights"), ("eval:dtd/top1", "test images of dtd"), ("train_list", "train list"),
    ("flags", "data flags"), ("protocol", "protocol"), ("method", "method"),
])
def test_report_separates_seeds_of_different_identities(tmp_path, component, words):
    first = _result()
    second = _result(seed=2, top1=11.0, metrics={"top1": 11.0})
    second["identity"] = {**first["identity"], "fewshot": "seed-2-draw", component: "other"}
    _write(tmp_path / "a/shots1_seed1.json", first)
    _write(tmp_path / "a/shots1_seed2.json", second)
    warnings: list[str] = []
    df = load_results(tmp_path, warn=warnings.append)
    assert df["method"].nunique() == 2  # two rows of the table, never 30.5 +- 27.6
    assert len(warnings) == 1 and words in warnings[0] and "never averaged" in warnings[0]


@pytest.mark.parametrize("older", [False, True])
def test_report_keeps_seeds_of_one_identity_together(tmp_path, older):
    first = _result()
    second = _result(seed=2, top1=11.0, metrics={"top1": 11.0})
    second["identity"] = {**first["identity"], "fewshot": "seed-2-draw"}  # only the draw is per seed
    if older:  # before content stamps stamped files by size and mtime: not comparable, not a reason to split
        second["identity"] = {**second["identity"], "eval:dtd/top1": "stat-stamp"}
        del second["identity"]["files"]
    _write(tmp_path / "a/shots1_seed1.json", first)
    _write(tmp_path / "a/shots1_seed2.json", second)
    warnings: list[str] = []
    df = load_results(tmp_path, warn=warnings.append)
    assert df["method"].nunique() == 1 and not warnings


# ---- 5. a plug-in's code and a built-in method's version are in the identity ---------------------------------

PLUGIN = '''
import torch
from fsbench.method import Method, register_method


@register_method("keys_constant")
class Constant(Method):
    """Always answers class {answer}."""

    input_kind = "features"
    paper = "test"
    summary = "constant"

    def fit(self, train, val):
        pass

    def logits(self, x):
        out = torch.zeros(len(x), self.ctx.num_classes)
        out[:, {answer}] = 1.0
        return out
'''


def test_edited_plugin_is_not_reused(lab, capsys):
    plugin = lab / "my_plugin.py"
    plugin.write_text(PLUGIN.format(answer=0))
    args = ("--plugin", str(plugin))
    assert dtd_run(capsys, *args, method="keys_constant")[0] == 0
    assert stored(lab, "keys_constant").top1 == pytest.approx(100 / 3)
    plugin.write_text(PLUGIN.format(answer=1).replace("Always", "Now always"))
    code, err = dtd_run(capsys, *args, method="keys_constant")
    assert code == 2 and "method" in err  # never "skipped" with the old code's number
    assert dtd_run(capsys, *args, "--force", method="keys_constant")[0] == 0
    assert stored(lab, "keys_constant").top1 == pytest.approx(100 / 3)  # class 1: also one class in three
    assert stored(lab, "keys_constant").extra.get("method_source", "").startswith("sha256:")


def test_builtin_method_version_is_in_the_identity(lab, capsys, monkeypatch):
    from fsbench.methods.zero_shot import ZeroShot

    assert ZeroShot.version == 1
    assert dtd_run(capsys)[0] == 0
    monkeypatch.setattr(ZeroShot, "version", 2)  # its numbers changed: the stored one is not reused
    code, err = dtd_run(capsys)
    assert code == 2 and "method" in err


# ---- 6. a persisted draw replaced by another seed's valid draw ---------------------------------------------

def test_another_seeds_persisted_draw_is_drawn_again(lab, capsys):
    assert dtd_run(capsys)[0] == 0
    assert cli(capsys, *RUN[:5], "-s", "2", "--device", "cpu", "--workers", "0", "-m", "zero_shot", "-d", "dtd",
               "--data-root", "data")[0] == 0
    splits = lab / ".fsbench_cache/splits/dtd/clip_lora"  # the default sampler's draws
    mine, other = json.loads((splits / "shots1_seed1.json").read_text()), json.loads(
        (splits / "shots1_seed2.json").read_text())
    assert mine["train"] != other["train"]
    (splits / "shots1_seed1.json").write_text(json.dumps({**other, "seed": 1}))  # a valid checksum of its own
    code, err = dtd_run(capsys, "--force")
    assert code == 0
    assert json.loads((splits / "shots1_seed1.json").read_text())["train"] == mine["train"]
    assert stored(lab).identity["fewshot"] != read_result(
        lab / "results/runs/test-tiny/dtd/zero_shot/shots1_seed2.json").identity["fewshot"]


def test_full_disk_while_persisting_the_draw_is_one_line(lab, capsys, monkeypatch):
    import fsbench.splits as splits

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(splits, "atomic_write_json", full)
    code, err = dtd_run(capsys)
    assert code == 5 and "No space left on device" in err and "runtime.cache_dir" in err


# ---- 7. --skip-bad-images follows the files, not the lists ---------------------------------------------------

def test_repaired_image_is_no_longer_skipped(lab, capsys):
    bad = lab / "data/dtd/images/beta/test_1.jpg"
    good = bad.read_bytes()
    bad.write_bytes(b"not an image")
    assert dtd_run(capsys, "--skip-bad-images")[0] == 0 and stored(lab).n_test == 8
    bad.write_bytes(good)  # repaired
    code, err = dtd_run(capsys, "--skip-bad-images")
    assert code == 2 and "test images of dtd" in err
    assert dtd_run(capsys, "--skip-bad-images", "--force")[0] == 0 and stored(lab).n_test == 9


def test_newly_broken_image_is_skipped(lab, capsys):
    assert dtd_run(capsys, "--skip-bad-images")[0] == 0 and stored(lab).n_test == 9
    (lab / "data/dtd/images/gamma/test_2.jpg").write_bytes(b"broken now")
    code, err = dtd_run(capsys, "--skip-bad-images", "--force")
    assert code == 0, err
    assert stored(lab).n_test == 8 and stored(lab).extra["skipped_images"] == 1


def test_no_skip_advice_to_a_user_who_skips(tmp_path):
    from fsbench.images import bad_images_error

    assert "--skip-bad-images" in str(bad_images_error(["a.jpg"], tmp_path))
    assert "pass --skip-bad-images" not in str(bad_images_error(["a.jpg"], tmp_path, skipping=True))


# ---- 8. base-to-new needs two classes in each half ----------------------------------------------------------

def test_base2new_with_a_one_class_half_is_refused(lab, capsys):
    code, err = dtd_run(capsys, "--protocol", "base2new")  # 3 classes: base 2, new 1
    assert code == 3 and "at least 2 classes" in err
    assert not (lab / "results").exists()


# ---- 9. an ok result without a number is named, not dropped silently ----------------------------------------

def test_ok_result_without_top1_is_named(tmp_path):
    _write(tmp_path / "a/shots1_seed1.json", _result())
    _write(tmp_path / "b/shots1_seed2.json", _result(seed=2, top1=None, metrics={"top1": None}))
    warnings: list[str] = []
    load_results(tmp_path, warn=warnings.append)
    assert any("b/shots1_seed2.json" in w and "no top1" in w for w in warnings), warnings


# ---- 10. lost work -------------------------------------------------------------------------------------------

def test_result_with_an_unknown_field_is_refused_not_replaced(lab, capsys):
    assert dtd_run(capsys)[0] == 0
    path = lab / "results/runs/test-tiny/dtd/zero_shot/shots1_seed1.json"
    doc = json.loads(path.read_text())
    doc["note"] = "checked by hand"
    path.write_text(json.dumps(doc))
    before = path.read_bytes()
    code, err = dtd_run(capsys, "--set", "runtime.eval_batch_size=7")
    assert code == 2 and "note" in err and "--force" in err
    assert path.read_bytes() == before
    assert dtd_run(capsys, "--force")[0] == 0 and "note" not in json.loads(path.read_text())


def test_two_configs_of_one_cell_at_once_lose_nothing_silently(lab, make_runner, monkeypatch):
    """Two runs of one cell with different configs started together: the second to finish finds the
    first's result (which it did not see when it decided) and refuses with one line."""
    from fsbench.engine import Runner
    from fsbench.errors import FsbenchError
    from fsbench.spec import RunSpec

    first = make_runner(lab)
    first.cfg.runtime.data_root = str(lab / "data")
    second = make_runner(lab, ["linear_probe.max_iter=7"])
    second.cfg.runtime.data_root = str(lab / "data")
    spec = RunSpec("linear_probe", "test-tiny", "dtd", 1, 1)
    attempt = Runner._attempt

    def meanwhile(self, prep, record_errors):  # the first run finishes while the second one trains
        monkeypatch.setattr(Runner, "_attempt", attempt)
        first.run(spec)
        return attempt(self, prep, record_errors)

    monkeypatch.setattr(Runner, "_attempt", meanwhile)
    with pytest.raises(FsbenchError, match="meanwhile") as info:
        second.run(spec)
    assert len(str(info.value).splitlines()) == 1
    kept = read_result(first.planner.prepare(spec).paths["dtd"])
    assert kept.config["max_iter"] != 7  # the first run's result is not replaced without a word


# ---- 11. tracebacks and wrong words --------------------------------------------------------------------------

def test_plugin_syntax_error_is_file_line_message(lab, capsys):
    plugin = lab / "broken.py"
    plugin.write_text("import torch\n\ndef oops(:\n    pass\n")
    code, err = dtd_run(capsys, "--plugin", str(plugin))
    assert code == 2 and f"{plugin}:3:" in err


@pytest.mark.parametrize("args, words", [
    (["--pretrained", "none", "--checkpoint", "x.pt"], "either --pretrained or --checkpoint"),
    (["--pretrained", "opneai"], "known: none"),
])
def test_weights_usage_errors(lab, capsys, args, words):
    code, err = dtd_run(capsys, *args)
    assert code == 2 and words in err
    assert not (lab / "results").exists()


def test_unknown_pretrained_tag_lists_the_known_ones(lab, capsys):
    code, err = cli(capsys, "run", "-b", "ViT-B/32", "--pretrained", "opneai", "-m", "zero_shot", "-d", "dtd",
                    "--data-root", "data")
    assert code == 2 and "'openai'" in err and "did you mean" in err


def test_garbage_checkpoint_is_not_a_checkpoint(lab, capsys):
    (lab / "w.pt").write_bytes(b"this is not a checkpoint at all" * 10)
    code, err = dtd_run(capsys, "--checkpoint", "w.pt")
    assert code == 4 and "not a checkpoint" in err and "weights_only" not in err


def test_label_range_counts_the_classes(lab, capsys):
    edit_split(lab, lambda doc: doc["test"][0].__setitem__(1, 7))
    code, err = dtd_run(capsys)
    assert code == 3 and "label 7 is outside 0..2" in err


def test_report_results_is_a_file(tmp_path, capsys):
    (tmp_path / "r.json").write_text("{}")
    code = main(["report", "--results", str(tmp_path / "r.json"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "is a file" in err and "does not exist" not in err


def test_schema_1_refusal_reads_well(lab, capsys):
    old = {"method": "zero_shot", "backbone": "test-tiny", "dataset": "dtd", "shots": 1, "seed": 1,
           "status": "ok", "top1": 63.5, "config": {}, "config_hash": "x", "schema_version": 1}
    _write(lab / "results/runs/test-tiny/dtd/zero_shot/shots1_seed1.json", old)
    code, err = dtd_run(capsys)
    assert code == 2 and "cannot be verified" in err and "verified changed" not in err and "--force" in err


def test_tampered_identity_hash_is_not_nothing_changed(lab, capsys):
    assert dtd_run(capsys)[0] == 0
    path = lab / "results/runs/test-tiny/dtd/zero_shot/shots1_seed1.json"
    doc = json.loads(path.read_text())
    doc["identity_hash"] = "0" * 16
    path.write_text(json.dumps(doc))
    code, err = dtd_run(capsys)
    assert code == 2 and "nothing changed" not in err and "identity_hash" in err


@pytest.mark.parametrize("targets, words", [("[]", "cross_targets is empty"),
                                             ('["dtd"]', "the source dataset dtd")])
def test_cross_targets_config_errors(lab, capsys, targets, words):
    Path("bench.toml").write_text(f"[study]\ncross_targets = {targets}\n")
    code, err = dtd_run(capsys, "--protocol", "cross_dataset")
    assert code == 2 and words in err


def test_data_check_reports_duplicated_train_entries(lab, capsys):
    edit_split(lab, lambda doc: doc["train"].append(doc["train"][0]))
    main(["data", "check", "dtd", "--root", "data"])
    out = capsys.readouterr()
    assert "listed more than once" in out.out + out.err


# ---- results stamped by size and mtime (before content stamps) keep their number --------------------------

def test_result_stamped_by_size_and_mtime_is_verified_and_upgraded(lab, capsys, make_runner):
    from fsbench import identity
    from fsbench.spec import RunSpec

    assert dtd_run(capsys)[0] == 0
    path = lab / "results/runs/test-tiny/dtd/zero_shot/shots1_seed1.json"
    runner = make_runner(lab)
    runner.cfg.runtime.data_root, runner.cfg.runtime.results = "data", "results/runs"
    prep = runner.planner.prepare(RunSpec("zero_shot", "test-tiny", "dtd", 1, 1))
    old = runner.planner._legacy_identity(prep, "dtd")
    assert "files" not in old and old["fewshot"] != prep.identities["dtd"]["fewshot"]
    doc = json.loads(path.read_text())
    doc["identity"], doc["identity_hash"] = old, identity.identity_hash(old)
    path.write_text(json.dumps(doc))
    code, err = dtd_run(capsys)
    assert code == 0, err  # verified by its old stamps: reused, not re-run
    upgraded = stored(lab)
    assert upgraded.created_at == doc["created_at"] and upgraded.identity.get("files") == "sha256"
    write = test_images(lab)[0]
    write.write_bytes(write.read_bytes() + b"\0")  # and a changed image is still seen
    path.write_text(json.dumps(doc))
    code, err = dtd_run(capsys)
    assert code == 2 and "test images of dtd" in err


# ---- 12. a mistyped name answers before torch is imported ---------------------------------------------------

def test_catalog_matches_the_registries():
    """`fsbench/catalog_index.py` is what the live registries hold (regenerate: `python -m fsbench.catalog`)."""
    # in a fresh interpreter: a plug-in registered by another test (the README's examples) is not built in
    # and it lists every built-in method (peft's presets, made with `type`, were once left out as module `abc`)
    code = ("from fsbench.catalog import build, index; from fsbench.method import METHODS; import sys; "
            "sys.exit(0 if build() == index() and set(METHODS.names()) == set(index()['methods']) else 1)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, "stale fsbench/catalog_index.py: run python -m fsbench.catalog\n" + proc.stderr[-2000:]


def test_a_method_file_added_since_the_index_is_checked_live(monkeypatch):
    """Adding a method stays one file: until the index is regenerated, method names go to the live registry."""
    import fsbench.catalog as catalog

    stale = {**catalog.index(), "method_modules": catalog.index()["method_modules"][1:]}
    monkeypatch.setattr(catalog, "index", lambda: stale)
    assert catalog.extra_methods_possible()
    catalog.check_names(methods=["a_method_only_the_live_registry_knows"])  # not refused from the index


@pytest.mark.parametrize("args, words", [
    (["run", "-m", "tipadapter", "-b", "test-tiny", "-d", "dtd"], "did you mean 'tip_adapter'"),
    (["run", "-m", "zero_shot", "-b", "test-tiyn", "-d", "dtd"], "did you mean 'test-tiny'"),
    (["run", "-m", "zero_shot", "-b", "test-tiny", "-d", "dtdd"], "did you mean 'dtd'"),
    (["run", "-m", "zero_shot", "-b", "test-tiny", "-d", "dtd", "-p", "base2nwe"], "did you mean 'base2new'"),
    (["ls", "methods"], ""),
])
def test_mistyped_names_answer_without_torch(tmp_path, args, words):
    import subprocess
    import sys

    code = ("import sys; from fsbench.cli import main; rc = main(sys.argv[1:]); "
            "heavy = [m for m in ('torch', 'open_clip', 'numpy') if m in sys.modules]; "
            "print('heavy:', heavy, file=sys.stderr); sys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert "heavy: []" in out.stderr, out.stderr
    assert (out.returncode == 2 and words in out.stderr) if words else out.returncode == 0
