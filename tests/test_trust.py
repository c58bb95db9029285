"""Numbers you can trust (issue "a result knows what it depends on"): every case a hostile or careless
user reported, as a test. A stored result is reused only when nothing it depends on changed; a finished
result is never replaced without --force; the report never drops or mixes results silently; a user
mistake is one line with the README's exit code, before any model or data is loaded."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from datagen import make_coop_dataset, make_imagefolder, write_image
from PIL import Image

from fsbench.cli import main
from fsbench.results import load_results, read_result, scan_results

RUN = ["run", "-b", "test-tiny", "-k", "1", "-s", "1", "--device", "cpu", "--workers", "0"]
DTD_JSON = "split_zhou_DescribableTextures.json"


def cli(capsys, *args: str) -> tuple[int, str]:
    """Run the CLI in-process: (exit code, stderr); an error is one line, never a traceback."""
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    if code != 0:
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, err
    return code, err


@pytest.fixture
def lab(tmp_path, monkeypatch):
    """A working folder with a DTD-layout dataset (3 classes, 3/2/3 images per class)."""
    monkeypatch.chdir(tmp_path)
    make_coop_dataset(tmp_path / "data", "dtd", counts=(3, 2, 3))
    return tmp_path


def dtd_run(capsys, *extra: str, method: str = "zero_shot") -> tuple[int, str]:
    return cli(capsys, *RUN, "-m", method, "-d", "dtd", "--data-root", "data", *extra)


def stored(lab: Path, method: str = "zero_shot", dataset: str = "dtd"):
    return read_result(lab / f"results/runs/test-tiny/{dataset}/{method}/shots1_seed1.json")


def edit_split(lab: Path, edit) -> None:
    path = lab / "data/dtd" / DTD_JSON
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


# ---- stale reuse: every change under a finished result is seen --------------------------------------

def _drop_last_test(doc):
    doc["test"].pop()


def _drop_unused_train(doc):
    doc["train"].append([doc["train"][0][0].replace("train_0", "train_9"), 0, "apple_pie"])
    write_image(Path("data/dtd/images") / doc["train"][-1][0], 0)


@pytest.mark.parametrize("mutate, what", [
    (lambda lab: edit_split(lab, _drop_last_test), "test images of dtd"),
    (lambda lab: edit_split(lab, _drop_unused_train), "train list"),
    (lambda lab: write_image(lab / "data/dtd/images/beta/test_0.jpg", 0), "test images of dtd"),
])
def test_changed_data_is_never_reused(lab, capsys, mutate, what):
    assert dtd_run(capsys)[0] == 0
    before = stored(lab)
    time.sleep(0.01)  # a new mtime even on coarse file systems
    mutate(lab)
    code, err = dtd_run(capsys)
    assert code == 2 and what in err and "--force" in err  # refused, and says what changed
    assert stored(lab).identity_hash == before.identity_hash  # the finished result is kept
    assert dtd_run(capsys, "--force")[0] == 0
    assert stored(lab).identity_hash != before.identity_hash


def test_replaced_test_image_is_re_encoded_with_force(lab, capsys):
    """Same file names, new pixels: the feature cache keys rows by file size + mtime, so --force gives
    the number of the new images (equal to a clean run), not the cached old features."""
    assert dtd_run(capsys)[0] == 0
    for p in (lab / "data/dtd/images").glob("*/test_*.jpg"):
        write_image(p, 3)  # every test image becomes the 4th colour
    assert dtd_run(capsys, "--force")[0] == 0
    forced = stored(lab).top1
    shutil.rmtree(lab / "results")
    shutil.rmtree(lab / ".fsbench_cache")
    assert dtd_run(capsys)[0] == 0
    assert stored(lab).top1 == forced


def test_edited_persisted_draw_is_drawn_again_not_used(lab, capsys):
    assert dtd_run(capsys, "--sampler", "fsbench")[0] == 0
    path = lab / ".fsbench_cache/splits/dtd/shots1_seed1.json"
    doc = json.loads(path.read_text())
    doc["train"] = [doc["train"][0]] * len(doc["train"])  # "1-shot" of one image for every class
    path.write_text(json.dumps(doc))
    code, err = dtd_run(capsys, "--sampler", "fsbench")
    assert code == 0  # the draw is redrawn from (lists, K, seed): the same images, so the same identity
    assert json.loads(path.read_text())["train"] != doc["train"]


def test_flags_are_part_of_the_identity(lab, capsys):
    assert dtd_run(capsys, "--allow-repeat")[0] == 0
    code, err = dtd_run(capsys)
    assert code == 2 and "data flags" in err


def test_skip_bad_images_dropped_after_the_fix(lab, capsys):
    bad = lab / "data/dtd/images/beta/test_1.jpg"
    bad.write_bytes(b"not an image")
    assert dtd_run(capsys, "--skip-bad-images")[0] == 0
    assert stored(lab).n_test == 8
    write_image(bad, 1)  # fixed
    code, err = dtd_run(capsys)
    assert code == 2 and "changed" in err
    assert dtd_run(capsys, "--force")[0] == 0 and stored(lab).n_test == 9


def test_another_imagefolder_in_the_same_results_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_imagefolder(tmp_path / "a", with_splits=True)
    make_imagefolder(tmp_path / "b", with_splits=True, per_class=6)
    assert cli(capsys, *RUN, "-m", "zero_shot", "-d", "imagefolder", "--data-root", "a")[0] == 0
    code, err = cli(capsys, *RUN, "-m", "zero_shot", "-d", "imagefolder", "--data-root", "b")
    assert code == 2 and "--results DIR" in err


def test_overwritten_checkpoint_is_another_backbone(lab, capsys):
    import open_clip

    from fsbench.backbones import TEST_TINY

    ckpt = lab / "w.pt"
    torch.manual_seed(0)
    torch.save(open_clip.CLIP(**TEST_TINY, quick_gelu=True).state_dict(), ckpt)
    assert dtd_run(capsys, "--checkpoint", str(ckpt))[0] == 0
    torch.manual_seed(1)
    torch.save(open_clip.CLIP(**TEST_TINY, quick_gelu=True).state_dict(), ckpt)
    os.utime(ckpt, ns=(1, 1))  # even with an old mtime: the identity is the file's content
    code, err = dtd_run(capsys, "--checkpoint", str(ckpt))
    assert code == 2 and "backbone weights" in err


def test_save_adapter_follows_the_result(lab, capsys):
    assert dtd_run(capsys, "--save-adapter", "ad", method="linear_probe")[0] == 0
    meta = lab / "ad/test-tiny/dtd/linear_probe/shots1_seed1/adapter.json"
    code, _ = dtd_run(capsys, "--save-adapter", "ad", "--set", "linear_probe.max_iter=7", method="linear_probe")
    assert code == 2  # refused: the adapter and the result both stay those of the first run
    assert dtd_run(capsys, "--save-adapter", "ad", "--set", "linear_probe.max_iter=7", "--force",
                   method="linear_probe")[0] == 0
    result = stored(lab, "linear_probe")
    saved = json.loads(meta.read_text())
    assert saved["identity_hash"] == result.identity_hash and saved["config"]["max_iter"] == 7


# ---- nothing finished is replaced silently ----------------------------------------------------------

def test_smoke_test_with_another_config_never_replaces_a_finished_result(lab, capsys):
    assert dtd_run(capsys, method="linear_probe")[0] == 0
    path = lab / "results/runs/test-tiny/dtd/linear_probe/shots1_seed1.json"
    before = path.read_bytes()
    code, err = dtd_run(capsys, "--set", "linear_probe.max_iter=1", method="linear_probe")
    assert code == 2 and "method config" in err
    assert path.read_bytes() == before


def test_failed_run_never_overwrites_a_finished_one(lab, make_runner):
    from fsbench.spec import RunSpec

    runner = make_runner(lab)
    runner.cfg.runtime.data_root = str(lab / "data")
    spec = RunSpec("zero_shot", "test-tiny", "dtd", 1, 1)
    first, _ = runner.run(spec)
    full = __import__("fsbench").errors.RunFailed("disk full")
    runner.executor.check_free_space = lambda: (_ for _ in ()).throw(full)
    again, reused = runner.run(spec, force=True, record_errors=True)
    assert again.status == "failed" and "not_written" in again.extra
    assert read_result(runner.planner.prepare(spec).paths["dtd"]).top1 == first.top1


def test_imported_splits_never_replace_the_local_draw(lab, capsys):
    assert dtd_run(capsys, "--sampler", "fsbench")[0] == 0
    local = (lab / ".fsbench_cache/splits/dtd/shots1_seed1.json").read_text()
    assert cli(capsys, "data", "export-splits", "-d", "dtd", "-k", "1", "-s", "2", "--root", "data",
               "--out", "s.json")[0] == 0
    doc = json.loads(Path("s.json").read_text())
    doc["splits"][0]["seed"] = 1
    Path("s.json").write_text(json.dumps(doc))
    assert dtd_run(capsys, "--splits", "s.json", "--results", "other")[0] == 0
    assert (lab / ".fsbench_cache/splits/dtd/shots1_seed1.json").read_text() == local


# ---- the report: nothing dropped or mixed without a word --------------------------------------------

def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def _result(**kw):
    base = {"method": "lora", "backbone": "ViT-B/16", "dataset": "oxford_pets", "shots": 1, "seed": 1,
            "top1": 50.0, "config_hash": "aaaaaa", "schema_version": 2, "protocol": "fewshot",
            "metrics": {"top1": 50.0}}
    return {**base, **kw}


def test_report_warns_about_every_unusable_file_and_separates_configs(tmp_path):
    root = tmp_path / "runs"
    _write(root / "a/shots1_seed1.json", _result())
    _write(root / "a/shots1_seed2.json", _result(seed=2, top1=70.0, config_hash="bbbbbb"))  # another config
    _write(root / "b/shots1_seed3.json", _result(seed=3, dataset="pets", top1=60.0))  # alias of oxford_pets
    _write(root / "c/shots1_seed1.json", "{not json")
    _write(root / "d/shots1_seed1.json", _result(surprise=1))
    _write(root / "e/shots1_seed1.json", [1, 2])
    warnings: list[str] = []
    df = load_results(root, warn=warnings.append)
    assert sorted(set(df["dataset"])) == ["oxford_pets"]
    assert len(df) == 3 and df["method"].nunique() == 2  # the two configs are two rows of the table
    assert sum("c/shots1_seed1.json" in w for w in warnings) == 1
    assert sum("unknown field(s) surprise" in w for w in warnings) == 1
    assert sum("e/shots1_seed1.json" in w for w in warnings) == 1
    assert sum("different configs" in w for w in warnings) == 1
    from fsbench.report.tables import main_table

    table = main_table(df, "ViT-B/16", 1)
    assert len(table) >= 2  # never one averaged row


def test_report_cli_prints_the_warnings(tmp_path, capsys):
    root = tmp_path / "runs"
    _write(root / "ok/shots1_seed1.json", _result())
    _write(root / "bad/shots1_seed1.json", "{")
    code = main(["report", "--results", str(root), "--out", str(tmp_path / "rep"), "--format", "md"])
    err = capsys.readouterr().err
    assert code == 0 and "bad/shots1_seed1.json" in err and "warning" in err


def test_result_files_get_normal_permissions(lab, capsys):
    old = os.umask(0o022)
    try:
        assert dtd_run(capsys)[0] == 0
    finally:
        os.umask(old)
    mode = (lab / "results/runs/test-tiny/dtd/zero_shot/shots1_seed1.json").stat().st_mode & 0o777
    assert mode == 0o644


def test_old_schema_results_still_load(tmp_path):
    old = {"method": "lora", "backbone": "ViT-B/16", "dataset": "dtd", "shots": 4, "seed": 1, "status": "ok",
           "top1": 63.5, "config": {}, "config_hash": "x", "schema_version": 1}
    _write(tmp_path / "ViT-B-16/dtd/lora/shots4_seed1.json", old)
    results, problems = scan_results(tmp_path)
    assert not problems and results[0].protocol == "fewshot" and results[0].metrics == {"top1": 63.5}


# ---- broken protocols are refused, with the README's exit codes -------------------------------------

def _dup_train(doc):
    doc["train"].append(doc["train"][0])


def _train_in_test(doc):
    doc["test"].append(doc["train"][0])


def _empty_class(doc):
    doc["train"] = [e for e in doc["train"] if e[1] != 1]


@pytest.mark.parametrize("edit, message", [
    (_dup_train, "listed more than once"), (_train_in_test, "also in the test list"),
    (_empty_class, "have no train images (e.g. 'beta')"),
])
def test_broken_split_files_are_refused(lab, capsys, edit, message):
    edit_split(lab, edit)
    code, err = dtd_run(capsys)
    assert code == 3 and message in err


def test_class_left_empty_by_skip_bad_images(lab, capsys):
    for p in (lab / "data/dtd/images/beta").glob("train_*.jpg"):
        p.write_bytes(b"broken")
    code, err = dtd_run(capsys, "--skip-bad-images")
    assert code == 3 and "no train images" in err


def test_one_class_imagefolder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for split in ("train", "test"):
        for k in range(6):
            write_image(tmp_path / "d" / split / "only" / f"{k}.jpg", 0)
    code, err = cli(capsys, *RUN, "-m", "zero_shot", "-d", "imagefolder", "--data-root", "d")
    assert code == 3 and "at least two" in err


def test_splits_file_without_the_dataset(lab, capsys):
    assert cli(capsys, "data", "export-splits", "-d", "dtd", "-k", "2", "-s", "1", "--root", "data",
               "--out", "s.json")[0] == 0
    code, err = dtd_run(capsys, "--splits", "s.json")  # has K=2, the run asks K=1
    assert code == 3 and "has no split for dtd K=1 seed=1" in err


@pytest.mark.parametrize("args, code, message", [
    (["-m", ""], 2, "--method was given an empty value"),
    (["-m", "zero_shot", "-k", "0"], 2, "--shots must be >= 1"),
    (["-m", "zero_shot", "--device", "mps"], 2, "device must be auto, cpu, cuda or cuda:N"),
    (["-m", "zero_shot", "--set", "runtime.eval_batch_size=0"], 2, "eval_batch_size must be >= 1"),
    (["-m", "zero_shot", "--protocol", "base2nwe"], 2, "did you mean 'base2new'"),
])
def test_bad_command_lines(lab, capsys, args, code, message):
    got, err = cli(capsys, "run", "-b", "test-tiny", "-d", "dtd", "--data-root", "data", *args)
    assert got == code and message in err
    assert not (lab / "results").exists()


def test_empty_seed_list_in_bench_toml(lab, capsys):
    Path("bench.toml").write_text("[study]\nseeds = []\n")
    code, err = cli(capsys, "run", "-m", "zero_shot", "-b", "test-tiny", "-d", "dtd", "--data-root", "data")
    assert code == 2 and "seeds is empty" in err


# ---- faults: one line, nothing lost -----------------------------------------------------------------

def test_full_disk_is_one_line_before_training(lab, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(100, 100, 0))
    code, err = dtd_run(capsys, method="linear_probe")
    assert code == 5 and "free" in err


def test_full_disk_in_a_sweep_is_a_failed_run_not_an_abort(lab, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(100, 100, 0))
    code = main(["sweep", "--methods", "zero_shot,linear_probe", "--backbones", "test-tiny", "--datasets", "dtd",
                 "--shots", "1", "--seeds", "1", "--data-root", "data", "--device", "cpu"])
    out = capsys.readouterr()
    assert code == 5 and "2 of 2 runs failed" in out.err and "Traceback" not in out.err + out.out


def test_write_failure_is_one_line(lab, capsys, monkeypatch):
    import fsbench.record as record

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(record, "write_result", boom)
    code, err = dtd_run(capsys)
    assert code == 5 and "No space left on device" in err


def test_bad_test_image_is_named_before_training(lab, capsys, monkeypatch):
    (lab / "data/dtd/images/gamma/test_2.jpg").write_bytes(b"\xff\xd8 truncated")
    from fsbench.methods.lora import CLIPLoRA

    monkeypatch.setattr(CLIPLoRA, "fit", lambda *a: pytest.fail("trained before checking the test images"))
    code, err = dtd_run(capsys, method="lora")
    assert code == 3 and "gamma/test_2.jpg" in err


def test_huge_images_are_allowed_and_bombs_say_why(tmp_path, monkeypatch):
    from fsbench.data.base import Item
    from fsbench.images import BAD_REASONS, bad_images_error, scan_images

    assert Image.MAX_IMAGE_PIXELS >= 20000 * 20000  # a valid 20000 x 20000 photo loads
    write_image(tmp_path / "x.jpg", 0)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    bad = scan_images([Item("x.jpg", 0)], tmp_path)
    assert [b.path for b in bad] == ["x.jpg"] and "decompression bomb" in BAD_REASONS["x.jpg"]
    assert "decompression bomb" in str(bad_images_error(["x.jpg"], tmp_path))


def test_too_small_class_is_named(lab, capsys):
    code, err = cli(capsys, *RUN[:3], "-k", "4", "-s", "1", "-m", "zero_shot", "-d", "dtd", "--data-root", "data",
                    "--device", "cpu", "--sampler", "fsbench")  # clip_lora and coop have small-class rules
    assert code == 3 and "class 'apple" in err and "(label 0) has 3 images" in err


def test_ctrl_c_exit_code_matches_the_readme(lab, capsys, monkeypatch):
    import fsbench.cli.run as run

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "execute", interrupt)
    code = main([*RUN, "-m", "zero_shot", "-d", "dtd", "--data-root", "data"])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "| 130 |" in readme


def test_stale_temp_files_are_cleaned(lab, capsys):
    stale = lab / "results/runs/.x.json.abc.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_text("{")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert dtd_run(capsys)[0] == 0
    assert not stale.exists()


def test_dry_run_plans_a_read_only_results_folder(lab, capsys):
    Path("afile").write_text("x")  # results under a file: not writable, but a plan only reads
    args = ["sweep", "--methods", "zero_shot", "--backbones", "test-tiny", "--datasets", "dtd", "--shots", "1",
            "--seeds", "1", "--data-root", "data", "--results", "afile/runs"]
    assert main([*args, "--dry-run"]) == 0
    assert main(args) == 2


# ---- the property: no mutation of the data under a finished run yields the old number ---------------

MUTATIONS = ["split_test_label", "split_drop_test", "image_bytes", "image_same_bytes", "toggle_repeat",
             "checkpoint", "same_size_mtime_kept", "identical_copy", "plugin_edited", "two_configs"]
PADDED = 2048  # test images are padded to this size, so that other pixels can keep the size
PROP_PLUGIN = '''from fsbench.method import register_method
from fsbench.methods.linear_probe import LinearProbe


@register_method("prop_probe")
class PropProbe(LinearProbe):
    """The linear probe, as a plug-in (edit {edit})."""
'''


def _padded(colour: int) -> bytes:
    from datagen import COLOURS, _encoded

    data = _encoded(".jpg", COLOURS[colour])
    return data + b"\0" * (PADDED - len(data))


def _mutate(kind: str, lab: Path, rng: random.Random, state: dict) -> bool:
    """Apply one mutation; returns whether it changes anything the number depends on."""
    if kind == "split_test_label":
        def relabel(doc):
            i = rng.randrange(len(doc["test"]))
            doc["test"][i][1] = (doc["test"][i][1] + 1) % 3
            doc["test"][i][2] = ["apple_pie", "beta", "gamma"][doc["test"][i][1]]
        edit_split(lab, relabel)
        return True
    if kind == "split_drop_test":
        edit_split(lab, lambda doc: doc["test"].pop(rng.randrange(len(doc["test"]))))
        return True
    if kind in ("image_bytes", "image_same_bytes", "same_size_mtime_kept", "identical_copy"):
        return _mutate_image(kind, rng.choice(sorted((lab / "data/dtd/images").glob("*/test_*.jpg"))), rng)
    if kind == "toggle_repeat":
        state["flags"] = [] if state["flags"] else ["--allow-repeat"]
        return True
    if kind == "plugin_edited":
        state["edits"] = state.get("edits", 0) + 1
        (lab / "prop_plugin.py").write_text(PROP_PLUGIN.format(edit=state["edits"]))
        return True
    if kind == "two_configs":
        _two_configs_at_once(lab, state)
        return True
    import open_clip

    from fsbench.backbones import TEST_TINY

    torch.manual_seed(rng.randrange(1000))
    torch.save(open_clip.CLIP(**TEST_TINY, quick_gelu=True).state_dict(), lab / "w.pt")
    return True


def _mutate_image(kind: str, path: Path, rng: random.Random) -> bool:
    st, before = path.stat(), path.read_bytes()
    if kind == "image_same_bytes":
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # touch nothing
        return False
    time.sleep(0.01)
    if kind == "identical_copy":  # new inode, mtime and ctime; same bytes
        shutil.copy(path, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
        return False
    if kind == "image_bytes":
        write_image(path, 3)
        return path.read_bytes() != before
    other = next(_padded(c) for c in rng.sample(range(4), 4) if _padded(c) != before)
    path.write_bytes(other)  # other pixels, the same size, the old mtime (cp -p, rsync -a, tar)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return True


def _two_configs_at_once(lab: Path, state: dict) -> None:
    """Two runs of the cell with different configs, started together: the one that finishes second must
    refuse in one line (the other's result kept), never print "ok" over a lost result."""
    from fsbench.cli.common import load_config
    from fsbench.engine import Runner
    from fsbench.resolve import ResultConflict
    from fsbench.spec import RunSpec

    state["max_iter"] = state.get("max_iter", 100) + 1
    flags = {"allow_repeat": True} if state["flags"] else {}
    mine = Runner(load_config(None, [], data_root="data", device="cpu", workers=0, **flags))
    theirs = Runner(load_config(None, [f"prop_probe.max_iter={state['max_iter']}"], data_root="data", device="cpu",
                                workers=0, **flags))
    spec = RunSpec("prop_probe", "test-tiny", "dtd", 1, 1, checkpoint="w.pt")
    prep = mine.planner.prepare(spec)
    mine.planner.decide(prep, force=True)  # what it saw when it started
    theirs.run(spec, force=True)  # the other run finishes first
    with pytest.raises(ResultConflict, match="meanwhile") as info:
        mine.recorder.write(prep, mine._attempt(prep, False)[0])
    assert len(str(info.value).splitlines()) == 1
    assert stored(lab, "prop_probe").config["max_iter"] == state["max_iter"]  # theirs, not lost


@pytest.mark.slow
def test_no_mutation_reports_the_old_number(lab, capsys):
    rng = random.Random(11)
    state = {"flags": []}
    _mutate("checkpoint", lab, rng, state)
    _mutate("plugin_edited", lab, rng, state)
    for p in (lab / "data/dtd/images").glob("*/test_*.jpg"):
        p.write_bytes(_padded(["apple_pie", "beta", "gamma"].index(p.parent.name)))
    args = ["-m", "prop_probe", "--checkpoint", "w.pt", "--plugin", "prop_plugin.py"]
    assert cli(capsys, *RUN, *args, "-d", "dtd", "--data-root", "data")[0] == 0
    kinds = [rng.choice(MUTATIONS[:6]) for _ in range(8)] + ["image_same_bytes"] + MUTATIONS[6:]
    for kind in kinds:
        old = stored(lab, "prop_probe")
        changed = _mutate(kind, lab, rng, state)
        there = stored(lab, "prop_probe")  # the old result, or (two configs at once) the other run's
        code, err = cli(capsys, *RUN, *args, *state["flags"], "-d", "dtd", "--data-root", "data")
        if changed:
            assert code == 2 and "--force" in err, (kind, err)  # never "skipped" with the old number
            code, _ = cli(capsys, *RUN, *args, *state["flags"], "-d", "dtd", "--data-root", "data", "--force")
            assert code == 0
            assert stored(lab, "prop_probe").identity_hash != there.identity_hash, kind
        else:
            assert code == 0 and stored(lab, "prop_probe").created_at == old.created_at, kind


def test_report_out_is_an_existing_file(tmp_path, capsys):
    root = tmp_path / "runs"
    _write(root / "ok/shots1_seed1.json", _result())
    (tmp_path / "taken").write_text("x")
    code = main(["report", "--results", str(root), "--out", str(tmp_path / "taken"), "--format", "md"])
    err = capsys.readouterr().err
    assert code == 2 and "is a file, not a folder" in err and "Traceback" not in err
