"""The `ood` protocol (issue 21): MCM's metrics and scores, the MOS OOD set readers, and a sweep end to end.

Reference numbers come from scikit-learn (`roc_auc_score`, `roc_curve`), scipy, and the outputs of MCM's
official `get_measures` stored in tests/fixtures/ood (see its README), never from fsbench's own functions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from datagen import OOD_LAYOUTS, make_coop_dataset, make_ood_set, make_ood_sets
from scipy.special import logsumexp, softmax
from sklearn.metrics import roc_auc_score, roc_curve

from fsbench.data import load_dataset
from fsbench.dataprep.check import check_dataset
from fsbench.dataprep.prepare import find_source
from fsbench.errors import DataError
from fsbench.ood import SCORES, auroc, fpr_at_tpr, ood_scores
from fsbench.protocols import OOD_SCORES, make_protocol
from fsbench.splits import draw_split

FIXTURE = Path(__file__).parent / "fixtures" / "ood" / "mcm_measures.json"


def _cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(21)
    return {
        "continuous": (rng.normal(1.0, 1.0, 700), rng.normal(0.0, 1.5, 450)),
        "four_values": (rng.integers(1, 5, 600).astype(float), rng.integers(0, 4, 333).astype(float)),
        "two_decimals": (np.round(rng.beta(5, 2, 500), 2), np.round(rng.beta(2, 3, 800), 2)),
        "saturated": (np.r_[np.ones(950), rng.uniform(0.5, 1, 50)], np.r_[np.ones(40), rng.uniform(0, 1, 160)]),
        "all_tied": (np.full(20, 0.3), np.full(30, 0.3)),
        "separable": (rng.uniform(2, 3, 40), rng.uniform(0, 1, 60)),
    }


def _labelled(pos, neg):
    return np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]


def reference_fpr(pos, neg, rule: str) -> float:
    """FPR at 95% TPR from scikit-learn's ROC curve (every distinct score a threshold, ID positive)."""
    y, s = _labelled(pos, neg)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    fpr, tpr = fpr[1:], tpr[1:]  # sklearn's first point (threshold +inf) accepts nothing
    if rule == "at_least":
        return float(fpr[np.argmax(tpr >= 0.95)])
    full = int(np.argmax(tpr == 1.0))  # MCM: thresholds up to the first that accepts every ID image,
    gap = np.abs(tpr[:full + 1] - 0.95)  # the nearest TPR; of equal gaps, the last (MCM searches backwards)
    return float(fpr[np.flatnonzero(gap == gap.min())[-1]])


@pytest.mark.parametrize("case", list(_cases()))
def test_auroc_equals_scikit_learn(case):
    pos, neg = _cases()[case]
    assert auroc(pos, neg) == pytest.approx(roc_auc_score(*_labelled(pos, neg)), abs=1e-12)


@pytest.mark.parametrize("rule", ["nearest", "at_least"])
@pytest.mark.parametrize("case", list(_cases()))
def test_fpr95_equals_the_roc_curve(case, rule):
    pos, neg = _cases()[case]
    assert fpr_at_tpr(pos, neg, rule=rule) == pytest.approx(reference_fpr(pos, neg, rule), abs=1e-12)


def test_tied_scores_are_accepted_together():
    """Ties are thresholds as a whole (MCM and sklearn): 100 ID and 100 OOD images all scoring 1.0 cannot be
    split, so keeping 95% of the ID images accepts every OOD image; nearest vs at-least differ on coarse ties."""
    assert fpr_at_tpr(np.ones(100), np.ones(100)) == 1.0 and auroc(np.ones(100), np.ones(100)) == 0.5
    pos, neg = _cases()["two_decimals"]
    assert fpr_at_tpr(pos, neg, rule="nearest") != fpr_at_tpr(pos, neg, rule="at_least")


@pytest.mark.parametrize("case", json.loads(FIXTURE.read_text()))
def test_metrics_equal_mcm_official_code(case):
    row = json.loads(FIXTURE.read_text())[case]
    assert auroc(row["id"], row["ood"]) == pytest.approx(row["auroc"], abs=1e-12)
    assert fpr_at_tpr(row["id"], row["ood"]) == pytest.approx(row["fpr95"], abs=1e-12)


def test_scores_are_mcm_on_cosine_similarities():
    rng = np.random.default_rng(0)
    cos = rng.uniform(-0.2, 0.4, size=(50, 7))
    logits = 100.0 * cos  # a CLIP-style head: cosine_scale 100
    assert np.allclose(ood_scores(logits, "mcm", 100.0), softmax(cos, axis=1).max(axis=1), atol=1e-12)
    assert np.allclose(ood_scores(logits, "max_logit", 100.0), cos.max(axis=1), atol=1e-12)
    assert np.allclose(ood_scores(logits, "energy", 100.0), logsumexp(cos, axis=1), atol=1e-12)
    assert np.allclose(ood_scores(logits, "mcm"), softmax(logits, axis=1).max(axis=1), atol=1e-12)  # no cosine form
    assert np.allclose(ood_scores(logits, "mcm", 100.0, temperature=0.01), ood_scores(logits, "mcm"), atol=1e-12)
    assert set(SCORES) == set(OOD_SCORES)
    with pytest.raises(ValueError, match="unknown OOD score"):
        ood_scores(logits, "msp")


# ---- the OOD sets: readers, data check, prepare ------------------------------------------------------------


def test_ood_readers_read_mcm_layout(tmp_path):
    make_ood_sets(tmp_path, per_class=3)
    for name, (folder, classes) in OOD_LAYOUTS.items():
        ds = load_dataset(name, tmp_path)
        assert ds.image_root == tmp_path / folder and not ds.train and not ds.val and ds.extra["ood"]
        assert len(ds.test) == 3 * len(classes)  # DTD's .directory file is not an image
        assert {Path(it.path).parts[0] for it in ds.test} == set(classes)


def test_textures_fall_back_to_coop_dtd_and_never_score_dtd_against_itself(tmp_path):
    make_coop_dataset(tmp_path, "dtd")  # dtd/images/<class>/...: the folder Textures falls back to
    textures = load_dataset("ood_textures", tmp_path)
    dtd = load_dataset("dtd", tmp_path)
    assert textures.image_root == tmp_path / "dtd" / "images" == dtd.image_root
    assert len(textures.test) == len(dtd.train) + len(dtd.val) + len(dtd.test)
    with pytest.raises(DataError, match="same images as the in-distribution dataset dtd"):
        make_protocol("ood", ood_targets=("ood_textures",)).episode(dtd, draw_split(dtd, 1, 1),
                                                                     {"ood_textures": textures})
    make_ood_set(tmp_path, "ood_textures")  # MCM's own copy comes first
    assert load_dataset("ood_textures", tmp_path).image_root == tmp_path / "ImageNet_OOD_dataset/dtd/images"


def test_data_check_and_prepare_know_the_ood_sets(tmp_path):
    absent = check_dataset("ood_places", tmp_path)
    assert not absent.ok and absent.fixes == [f"fsbench data prepare ood_places --root {tmp_path}"]
    make_ood_set(tmp_path, "ood_places", folder="ood_data/Places")
    found = check_dataset("ood_places", tmp_path)
    assert found.layout == "ood_data/Places/ (MOS)" and found.counts == {"train": 0, "val": 0, "test": 3}
    assert found.problems == ["split sizes 0/0/3 (1 classes) differ from the standard 0/0/10,000 (1 classes)"]
    inat = find_source("ood_inaturalist").downloads[0]
    assert inat.url.endswith("/iNaturalist.tar.gz") and inat.save_to == "ImageNet_OOD_dataset" and inat.extract
    assert find_source("ood_textures").downloads == find_source("dtd").downloads[:1]  # DTD's own archive


# ---- the protocol, end to end ----------------------------------------------------------------------------


@pytest.fixture
def ood_root(tmp_path):
    root = tmp_path / "data"
    load_dataset("synthetic", root)
    make_ood_sets(root, per_class=4)
    return root


def _recording(monkeypatch) -> list[tuple]:
    """Every (evaluation set, logits, labels) the executor computes."""
    from fsbench.execute import Executor

    calls, original = [], Executor.eval_logits

    def record(self, method, backbone, fitted, ev, *args, **kwargs):
        logits, labels = original(self, method, backbone, fitted, ev, *args, **kwargs)
        calls.append((method.name, ev, logits.clone(), labels.clone()))
        return logits, labels
    monkeypatch.setattr(Executor, "eval_logits", record)
    return calls


def test_sweep_runs_ood_end_to_end_and_reports_it(ood_root, tmp_path, monkeypatch, capsys):
    from fsbench.cli import main

    monkeypatch.chdir(tmp_path)
    calls = _recording(monkeypatch)
    code = main(["sweep", "--protocols", "ood", "--methods", "zero_shot,linear_probe", "--backbones", "test-tiny",
                 "--datasets", "synthetic", "--shots", "1", "--seeds", "1", "--data-root", str(ood_root),
                 "--device", "cpu", "--set", "runtime.workers=0"])
    assert code == 0, capsys.readouterr()
    files = sorted((tmp_path / "results/runs").rglob("ood-from-synthetic/*.json"))
    stored = {(r["method"], r["dataset"]): r for r in map(json.loads, (f.read_text() for f in files))}
    assert len(stored) == 2 * 5  # per method: the ID result and one per OOD set
    for method, scale in (("zero_shot", 100.0), ("linear_probe", None)):
        ran = [(ev, logits, labels) for name, ev, logits, labels in calls if name == method]
        assert [ev.dataset for ev, _, _ in ran].count("synthetic") == 1  # the ID test split: scored once
        id_ev, id_logits, id_labels = next(c for c in ran if c[0].dataset == "synthetic")
        top1 = 100.0 * float((id_logits.argmax(1) == id_labels).float().mean())
        assert stored[(method, "synthetic")]["metrics"]["id_top1"] == pytest.approx(top1)
        assert "auroc" not in stored[(method, "synthetic")]["metrics"]
        for ev, logits, labels in ran:
            if ev.dataset == "synthetic":
                continue
            assert not ev.labelled and len(labels) == 0 and ev.classes == id_ev.classes  # scored over ID classes
            r = stored[(method, ev.dataset)]
            pos = softmax(id_logits.double().numpy() / (scale or 1.0), axis=1).max(axis=1)  # MCM, T = 1
            neg = softmax(logits.double().numpy() / (scale or 1.0), axis=1).max(axis=1)
            assert r["metrics"]["auroc"] == pytest.approx(100 * roc_auc_score(*_labelled(pos, neg)), abs=1e-9)
            assert r["metrics"]["fpr95"] == pytest.approx(100 * reference_fpr(pos, neg, "nearest"), abs=1e-9)
            assert r["top1"] == r["metrics"]["id_top1"] == pytest.approx(top1)
            assert r["n_test"] == len(id_labels) + len(logits)
            assert set(r["metrics"]) == {"auroc", "fpr95", "id_top1", "ece", "ece_id_top1"}  # no accuracy on OOD
    assert {d for _, d in stored} == {"synthetic", *OOD_LAYOUTS}
    capsys.readouterr()

    assert main(["report", "--results", "results/runs", "--out", "report", "--format", "md,csv,tex"]) == 0
    md, tex = (tmp_path / "report/report.md").read_text(), (tmp_path / "report/tables.tex").read_text()
    assert "## OOD detection" in md and "| Dataset | Method | AUROC | FPR95 ↓ | ID top-1 |" in md
    zs = stored[("zero_shot", "ood_inaturalist")]["metrics"]
    assert f"| iNaturalist | Zero-shot CLIP | {zs['auroc']:.2f} (1) | {zs['fpr95']:.2f} (1) |" in md
    mean_auroc = np.mean([stored[("zero_shot", d)]["metrics"]["auroc"] for d in OOD_LAYOUTS])
    assert f"| Average | Zero-shot CLIP | {mean_auroc:.2f} |" in md  # over the four OOD sets, the ID row left out
    assert md.index("| synthetic | Zero-shot CLIP | – | – |") < md.index("| iNaturalist |")  # the ID row first
    assert "OOD detection, test-tiny, 1 shots, fitted on synthetic" in tex and r"FPR95 $\downarrow$" in tex
    csv = pd.read_csv(tmp_path / "report/ood.csv")
    cell = csv[(csv["method"] == "linear_probe") & (csv["dataset"] == "ood_sun") & (csv["metric"] == "fpr95")]
    assert cell["mean"].iloc[0] == pytest.approx(stored[("linear_probe", "ood_sun")]["metrics"]["fpr95"], abs=1e-4)


def test_score_function_is_part_of_the_identity(ood_root, tmp_path):
    from fsbench.config import BenchConfig, Runtime, apply_sets
    from fsbench.resolve import Resolver
    from fsbench.spec import RunSpec

    def identities(protocol, *sets):
        rt = Runtime(data_root=str(ood_root), results=str(tmp_path / "r"), cache_dir=str(tmp_path / "c"))
        prep = Resolver(apply_sets(BenchConfig(runtime=rt), ['study.ood_targets=["ood_sun"]', *sets])).prepare(
            RunSpec("zero_shot", "test-tiny", "synthetic", 1, 1, protocol=protocol))
        return {t: prep.identity_hash(t) for t in prep.identities}

    mcm, energy = identities("ood"), identities("ood", "study.ood_score=energy")
    assert set(mcm) == {"synthetic", "ood_sun"} and all(mcm[t] != energy[t] for t in mcm)
    assert identities("fewshot") == identities("fewshot", "study.ood_score=energy")  # other protocols: unchanged


def test_config_errors_are_one_line(ood_root, tmp_path, monkeypatch, capsys):
    from fsbench.cli import main

    monkeypatch.chdir(tmp_path)
    base = ["sweep", "--protocols", "ood", "--methods", "zero_shot", "--backbones", "test-tiny", "--datasets",
            "synthetic", "--shots", "1", "--seeds", "1", "--data-root", str(ood_root), "--dry-run"]
    assert main([*base, "--set", "study.ood_score=msp"]) == 2
    err = capsys.readouterr().err.strip()
    assert "ood_score must be one of mcm, max_logit, energy" in err and "\n" not in err
    assert main([*base, "--set", "study.ood_targets=[]"]) == 2
    assert "ood_targets is empty" in capsys.readouterr().err


def test_cosine_scale_is_declared_where_logits_are_scaled_cosines():
    """docs/methods.md's list: these methods' logits are logit_scale x cosine; a subclass with its own `logits`
    (two_stage) and a linear head (linear_probe) are scored on their own logits."""
    from fsbench.method import METHODS

    def scale(name):
        cls = METHODS.get(name)
        method = object.__new__(cls)  # no fit needed: the scale is the config's
        method.config = cls.Config()
        return method.cosine_scale()

    cosine = ("zero_shot", "coop", "coop_4ctx", "kgcoop", "prograd", "lora", "lora_dora", "lora_pissa", "lora_vera",
              "peft", "clip_svd")
    assert {name: scale(name) for name in cosine} == dict.fromkeys(cosine, 100.0)
    assert scale("two_stage") is None and scale("linear_probe") is None and scale("tip_adapter") is None
