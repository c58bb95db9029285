"""TransCLIP (methods/transclip.py) against the official solver, and `METHOD+transclip` (fsbench.transduction).

The official EM's every state (W, the initial mu and variance, each z, mu and variance, the final z) on fixed
random features is in tests/fixtures/transclip/official.pt (README.md there: how it was made); fsbench's
`transclip_em` reproduces them to float32 tolerance, zero-shot, on top of a method's predictions (with the
official prior aliasing, `prior_follows_z`), on top of text prototypes, and few-shot (TransCLIP-FS).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fsbench.errors import ConfigError, UnknownNameError
from fsbench.method import METHODS
from fsbench.methods.transclip import Shots, TransCLIPConfig, knn_affinity, transclip_em
from fsbench.transduction import Composed, TransductiveInputs, probability_logits

FIXTURE = Path(__file__).parent / "fixtures" / "transclip" / "official.pt"


@pytest.fixture(scope="module")
def official() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURE)


def _run(official, case: str, prior: torch.Tensor, shots: Shots | None = None, follow: bool = False):
    trace: dict[str, list[torch.Tensor]] = {}
    z = transclip_em(official["input.query"], prior, TransCLIPConfig(), shots, follow, trace)
    return z, trace


def _check(official, case: str, z: torch.Tensor, trace: dict[str, list[torch.Tensor]]) -> None:
    W = torch.sparse_coo_tensor(official[f"{case}.W_indices"], official[f"{case}.W_values"],
                                check_invariants=True).to_dense()
    torch.testing.assert_close(trace["W"][0], W, rtol=0, atol=1e-6)
    torch.testing.assert_close(trace["mu0"][0], official[f"{case}.mu0"][:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(trace["var0"][0], official[f"{case}.std0"])
    assert len(trace["z"]) == len(official[f"{case}.z"]) and len(trace["mu"]) == len(official[f"{case}.mu"])
    for i, (ours, theirs) in enumerate(zip(trace["z"], official[f"{case}.z"], strict=True)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=2e-5, msg=lambda m, i=i: f"z update {i}: {m}")
    for i, (ours, theirs) in enumerate(zip(trace["mu"], official[f"{case}.mu"], strict=True)):
        torch.testing.assert_close(ours, theirs[:, 0], rtol=1e-4, atol=2e-5, msg=lambda m, i=i: f"mu {i}: {m}")
    for i, (ours, theirs) in enumerate(zip(trace["var"], official[f"{case}.std"], strict=True)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7, msg=lambda m, i=i: f"var {i}: {m}")
    assert torch.equal(z.argmax(1), official[f"{case}.final_z"].argmax(1)) or case == "few_shot"


def test_zero_shot_em_equals_the_official_solver(official):
    """Zero-shot TransCLIP (main.py:91-93): the prior is softmax(100 f t^T) of the text classifier."""
    prior = F.softmax(100 * official["input.query"] @ official["input.text"].T, dim=1)
    z, trace = _run(official, "zero_shot", prior)
    torch.testing.assert_close(official["zero_shot.y_hat0"], prior)
    _check(official, "zero_shot", z, trace)
    torch.testing.assert_close(z, official["zero_shot.final_z"], rtol=1e-4, atol=2e-5)


def test_on_top_of_predictions_equals_the_official_solver_with_its_prior_aliasing(official):
    """Another method's softmaxed predictions as `initial_predictions` (main.py:109-111): the official update
    overwrites the prior with z (`prior_follows_z`); the fixed prior of the paper gives other numbers."""
    prior = official["input.prior"]
    z, trace = _run(official, "predictions", prior, follow=True)
    _check(official, "predictions", z, trace)
    fixed, _ = _run(official, "predictions", prior, follow=False)
    assert not torch.allclose(fixed, official["predictions.final_z"], atol=1e-3)


def test_on_top_of_text_prototypes_equals_the_official_solver(official):
    """A text-only method's prototypes (`initial_prototypes`): the prior softmax(100 f p^T) stays fixed."""
    prior = F.softmax(100 * official["input.query"] @ official["input.base"].T, dim=1)
    z, trace = _run(official, "prototypes", prior)
    _check(official, "prototypes", z, trace)


def test_few_shot_em_equals_the_official_solver(official):
    """TransCLIP-FS (main.py:94-97): the shots join the EM, four gammas warm-started in turn; the z kept is that
    of the best validation accuracy, whose test accuracy is what the official solver returns."""
    prior = F.softmax(100 * official["input.query"] @ official["input.text"].T, dim=1)
    shots = Shots(official["input.support"], official["input.support_labels"], official["input.val"],
                  official["input.val_labels"])
    z, trace = _run(official, "few_shot", prior, shots)
    _check(official, "few_shot", z, trace)
    acc = 100 * float((z.argmax(1) == official["input.labels"]).float().mean())
    assert acc == pytest.approx(float(official["few_shot.acc"]), abs=1e-4)


def wide_inputs(n: int = 400, d: int = 512, k: int = 10) -> dict[str, torch.Tensor]:
    """The wide case's inputs, regenerated from their seed as the fixture's harness drew them."""
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(k, d, generator=g)
    labels = torch.randint(0, k, (n,), generator=g)
    query = F.normalize(centers[labels] + 3 * torch.randn(n, d, generator=g), dim=-1)
    return {"query": query, "labels": labels, "text": F.normalize(centers + 2 * torch.randn(k, d, generator=g), dim=-1)}


def test_zero_shot_em_at_clip_width_equals_the_official_solver(official):
    """512-d features, 10 classes: the matrix-product Gaussian terms against the official (N, K, D) ones."""
    w = wide_inputs()
    checksum = torch.stack([w["query"].double().sum(), w["text"].double().sum(), w["labels"].double().sum()])
    torch.testing.assert_close(checksum, official["wide.checksum"], rtol=0, atol=1e-9)  # the same inputs
    trace: dict[str, list[torch.Tensor]] = {}
    z = transclip_em(w["query"], F.softmax(100 * w["query"] @ w["text"].T, dim=1), TransCLIPConfig(), trace=trace)
    for i, (ours, theirs) in enumerate(zip(trace["z"], official["wide.z"], strict=True)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=2e-5, msg=lambda m, i=i: f"z update {i}: {m}")
    for i, (ours, theirs) in enumerate(zip(trace["var"], official["wide.std"], strict=True)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-8, msg=lambda m, i=i: f"var {i}: {m}")
    assert torch.equal(z.argmax(1), official["wide.final_z"].argmax(1))


def test_knn_affinity_in_blocks_equals_one_block(monkeypatch):
    import fsbench.methods.transclip as tc

    x = F.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(3)), dim=-1)
    whole = knn_affinity(x, x[:5], 3).to_dense()
    monkeypatch.setattr(tc, "CHUNK_ELEMENTS", 64)  # one row per block
    torch.testing.assert_close(knn_affinity(x, x[:5], 3).to_dense(), whole)


def test_composed_names_resolve_with_did_you_mean():
    cls = METHODS.get("linear_probe+transclip")
    assert cls is METHODS.get("LINEAR_PROBE+transclip") and issubclass(cls, Composed)
    assert cls.name == "linear_probe+transclip" and cls.test_time == "transductive"
    with pytest.raises(UnknownNameError, match="did you mean 'linear_probe'"):
        METHODS.get("linear_prob+transclip")
    with pytest.raises(UnknownNameError, match="did you mean 'lora\\+transclip'"):
        METHODS.get("lora+transclp")
    with pytest.raises(UnknownNameError, match="steps: transclip"):
        METHODS.get("lora+coop")
    with pytest.raises(UnknownNameError, match="METHOD\\+STEP"):
        METHODS.get("lora+transclip+transclip")
    with pytest.raises(ConfigError, match="already uses the unlabelled test data"):
        METHODS.get("transclip+transclip")


def test_probability_logits_keep_argmax_and_softmax():
    p = torch.tensor([[0.7, 0.3, 0.0], [0.1, 0.2, 0.7]])
    logits = probability_logits(p)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits.softmax(-1), p)
    assert TransductiveInputs(p, p).source is None


# ---- the composition through the runner -------------------------------------------------------------


def _fit(runner, tiny, synthetic, name: str, sets: dict | None = None):
    """A method fitted as the executor fits it, and the test split's cached frozen features."""
    from fsbench.config import method_config
    from fsbench.method import Context, FeatureSource

    cls = METHODS.get(name)
    config = method_config(cls, sets or {})
    split = runner.planner.splits.get(synthetic, 1, 1)
    train, val = runner.executor.fewshot(cls, tiny, synthetic, split)
    ctx = Context(tiny, synthetic, torch.device("cpu"), 1, 1, features=FeatureSource(runner.executor.features, tiny,
                                                                                       synthetic))
    method = cls(config, ctx)
    method.fit(train, val)
    test = runner.executor.features.split(tiny, synthetic, "test")
    return method, test


@pytest.fixture(scope="module")
def runner(tmp_path_factory, make_runner):
    return make_runner(tmp_path_factory.mktemp("transclip"))


@pytest.mark.parametrize("name, sets", [("linear_probe+transclip", {"linear_probe": {"max_iter": 20}}),
                                        ("lora+transclip", {"lora": {"iters_per_shot": 2}}),
                                        ("dept_coop+transclip", {"dept_coop": {"epochs": 1}})])
def test_composed_transductive_logits_are_the_step_on_the_base_predictions(name, sets, runner, tiny, synthetic):
    """Under `transductive`, X+transclip = TransCLIP's EM on the frozen test features with softmax(X's logits)
    as the prior; elsewhere it scores as X; `fresh()` copies the step only, and a set scored after another
    gives what it gives alone."""
    method, test = _fit(runner, tiny, synthetic, name, sets)
    base_logits, _ = runner.executor.test_logits(method.base, tiny, synthetic)
    inductive, _ = runner.executor.test_logits(method, tiny, synthetic)
    torch.testing.assert_close(inductive, base_logits)
    copy = method.fresh()
    assert copy.base is method.base and copy.step is not method.step
    transductive, labels = runner.executor.test_logits(copy, tiny, synthetic, mode="transductive")
    assert torch.equal(labels, test.y)
    expected = transclip_em(test.x, base_logits.softmax(-1), method.step.config)
    torch.testing.assert_close(transductive.softmax(-1), expected, rtol=1e-4, atol=1e-5)
    half = tuple(range(0, len(test.y), 2))
    runner.executor.test_logits(method.fresh(), tiny, synthetic, half, mode="transductive")
    again, _ = runner.executor.test_logits(method.fresh(), tiny, synthetic, mode="transductive")
    assert torch.equal(again, transductive)


def test_transclip_alone_scores_zero_shot_without_unlabelled_data(runner, tiny, synthetic):
    transclip, test = _fit(runner, tiny, synthetic, "transclip")
    zero_shot, _ = _fit(runner, tiny, synthetic, "zero_shot")
    torch.testing.assert_close(transclip.logits(test.x), zero_shot.logits(test.x))
    assert transclip.config.kl_weight == 1.0  # resolved (zero-shot), recorded in the result
    z = transclip.transductive_logits(test.x).softmax(-1)
    torch.testing.assert_close(z, transclip_em(test.x, zero_shot.logits(test.x).softmax(-1), transclip.config))


def test_transclip_fs_uses_the_shots_of_an_image_method(runner, tiny, synthetic):
    """`transclip.shots_in_em`: the shots' frozen features join the EM, encoded through the feature cache even
    when the base method trains on images."""
    method, test = _fit(runner, tiny, synthetic, "lora+transclip",
                        {"lora": {"iters_per_shot": 2}, "transclip": {"shots_in_em": True}})
    assert method.step.shots is not None and method.step.config.kl_weight == 0.5
    split = runner.planner.splits.get(synthetic, 1, 1)
    train, _ = runner.executor.fewshot(METHODS.get("linear_probe"), tiny, synthetic, split)
    torch.testing.assert_close(method.step.shots.features, train.features.float())


def test_composed_config_identity_and_user_sections(tmp_path, make_runner):
    """Each part's config comes from its own section; the identity changes with either part's config."""
    from fsbench.spec import RunSpec

    spec = RunSpec("linear_probe+transclip", "test-tiny", "synthetic", 1, 1, protocol="transductive")
    plain = make_runner(tmp_path / "a").planner.prepare(spec)
    tuned = make_runner(tmp_path / "b", ["transclip.neighbors=5", "linear_probe.max_iter=7"]).planner.prepare(spec)
    assert tuned.config.transclip.neighbors == 5 and tuned.config.linear_probe.max_iter == 7
    assert plain.identities["synthetic"]["method"] != tuned.identities["synthetic"]["method"]
    with pytest.raises(ConfigError, match=r"set its parts in \[methods.linear_probe\] and \[methods.transclip\]"):
        make_runner(tmp_path / "c", ["linear_probe+transclip.neighbors=5"])


# ---- the paired gain in the report ------------------------------------------------------------------


def _record(method, seed, top1, protocol="fewshot", dataset="dtd", transductive=False):
    return {"method": method, "backbone": "ViT-B/16", "dataset": dataset, "shots": 4, "seed": seed, "top1": top1,
            "status": "ok", "protocol": protocol,
            "extra": {"unlabelled_test_data": "transductive"} if transductive else {}}


def test_gain_pairs_by_seed_and_prefers_the_same_protocol():
    import pandas as pd

    from fsbench.report.gain import gain_csvs, gain_latex, gain_markdown, gain_table, paired_gains

    rows = [_record("lora", s, t) for s, t in ((1, 70.0), (2, 72.0), (3, 71.0))]
    rows += [_record("lora", 1, 69.0, "transductive")]  # seed 1 also ran under transductive: preferred
    rows += [_record("lora+transclip", s, t, "transductive", transductive=True)
             for s, t in ((1, 74.0), (2, 73.0), (3, 75.0))]
    rows += [_record("lora+transclip", 4, 80.0, "transductive", transductive=True)]  # no lora seed 4: unpaired
    rows += [_record("lora+transclip", 1, 70.0)]  # under fewshot it is lora alone: not a gain
    rows += [_record("transclip", 1, 60.0, "transductive", transductive=True)]  # no base: not paired
    rows += [_record("coop+transclip", 1, 60.0, "transductive", dataset="eurosat", transductive=True),
             _record("coop", 1, 58.5, dataset="eurosat")]
    df = pd.DataFrame(rows)
    pairs = paired_gains(df)
    lora = pairs[pairs["method"] == "lora+transclip"].sort_values("seed")
    assert lora["gain"].tolist() == [5.0, 1.0, 4.0]
    assert lora["base_protocol"].tolist() == ["transductive", "fewshot", "fewshot"]
    table = gain_table(df).set_index(["method", "dataset"])
    row = table.loc[("lora+transclip", "dtd")]
    assert row["n"] == 3 and row["gain_mean"] == pytest.approx(10 / 3)
    assert row["gain_std"] == pytest.approx(pd.Series([5.0, 1.0, 4.0]).std(ddof=1))
    one = table.loc[("coop+transclip", "eurosat")]
    assert one["n"] == 1 and one["gain_mean"] == pytest.approx(1.5) and one["gain_std"] != one["gain_std"]  # NaN
    md = gain_markdown(df)
    assert "CLIP-LoRA + TransCLIP | DTD | +3.33 ± 2.08 (3) | fewshot, transductive |" in md
    assert "CoOp + TransCLIP | EuroSAT | +1.50 (1)" in md
    assert r"+3.33 $\pm$ 2.08 (3)" in gain_latex(df)
    assert set(gain_csvs(df)) == {"transductive_gain.csv", "transductive_pairs.csv"}
    assert gain_markdown(df[df["method"] != "lora+transclip"].iloc[:3]) == ""


def test_sweep_end_to_end_reports_the_paired_gain(tmp_path, synthetic_root, monkeypatch):
    """`fsbench sweep --protocols transductive,fewshot` with X, X+transclip and transclip, then the report."""
    import pandas as pd

    from fsbench.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["sweep", "--protocols", "transductive,fewshot", "--methods",
                 "linear_probe,linear_probe+transclip,transclip", "--backbones", "test-tiny", "--datasets",
                 "synthetic", "--shots", "1", "--seeds", "1,2", "--data-root", str(synthetic_root), "--results",
                 str(tmp_path / "results"), "--device", "cpu", "--set", "linear_probe.max_iter=20", "--set",
                 f"runtime.cache_dir={tmp_path / 'cache'}"])
    assert code == 0
    assert main(["report", "--results", str(tmp_path / "results"), "--out", str(tmp_path / "report"),
                 "--format", "md,csv,tex"]) == 0
    pairs = pd.read_csv(tmp_path / "report" / "transductive_pairs.csv")
    assert sorted(pairs["seed"]) == [1, 2] and set(pairs["base_protocol"]) == {"transductive"}
    from fsbench.results import load_results

    df = load_results(tmp_path / "results")
    for seed in (1, 2):
        both = df[(df["seed"] == seed) & (df["protocol"] == "transductive")].set_index("method")["top1"]
        gain = pairs[pairs["seed"] == seed]["gain"].item()
        assert gain == pytest.approx(both["linear_probe+transclip"] - both["linear_probe"], abs=1e-3)
    composed = df[(df["method"] == "linear_probe+transclip") & (df["protocol"] == "transductive")].iloc[0]
    assert set(composed["config"]) == {"linear_probe", "transclip"}
    assert "## Transductive gain" in (tmp_path / "report" / "report.md").read_text()


def test_ls_methods_says_any_method_takes_the_step(capsys, monkeypatch):
    from fsbench.catalog import check_names
    from fsbench.cli import main

    for name in [m for m in sys.modules if m.startswith("fsbench_plugin_")]:  # as in a process without --plugin
        monkeypatch.delitem(sys.modules, name)  # files (other tests loaded some: names go to the live registry)

    assert main(["ls", "methods"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "transclip" in out and "METHOD+transclip" in out
    check_names(methods=["lora+transclip"])  # known from the static index
    with pytest.raises(UnknownNameError, match="did you mean 'lora\\+transclip'"):
        check_names(methods=["lora+transclipp"])


@pytest.mark.parametrize("family", ["test-tiny-siglip", "test-tiny-siglip2", "test-tiny-eva", "test-tiny-convnext",
                                    "test-tiny-metaclip2"])
def test_transclip_runs_on_every_backbone_family(family, runner, synthetic):
    """TransCLIP reads only frozen image features and the zero-shot text classifier: every family applies."""
    from fsbench.backbones import BackboneSpec, build_backbone, describe

    assert METHODS.get("transclip").supports(describe(family)) is None
    bb = build_backbone(BackboneSpec(family))
    for name in ("transclip", "linear_probe+transclip"):
        method, test = _fit(runner, bb, synthetic, name, {"linear_probe": {"max_iter": 5}} if "+" in name else {})
        logits, _ = runner.executor.test_logits(method.fresh(), bb, synthetic, mode="transductive")
        assert logits.shape == (len(synthetic.test), len(synthetic.classnames)) and torch.isfinite(logits).all()


def test_aligned_shot_graph_gives_each_test_image_its_own_neighbourhood(official):
    """`aligned_shot_graph`: one z update equals the paper's, written densely: test image i gets
    sum_j W_ij z_j over its own neighbours plus what points at it, from test images and from the shots."""
    from fsbench.methods.transclip import gaussian_log_likelihood, update_z

    q, s = official["input.query"], official["input.support"]
    shots = F.one_hot(official["input.support_labels"], 4).float()
    prior = F.softmax(100 * q @ official["input.text"].T, dim=1)
    cfg = TransCLIPConfig(z_iterations=1, aligned_shot_graph=True)
    W = knn_affinity(q, s, cfg.neighbors, support_first=False)
    mu = F.normalize(shots.T @ s, dim=-1)
    loglik = gaussian_log_likelihood(q, mu, torch.full((16,), 1 / 16))
    z = update_z(loglik, prior, prior, W, cfg, 0.5, shots)
    dense = W.to_dense()  # rows: the 300 test images, then the 8 shots
    full = torch.cat([prior, shots])
    pair = dense[:300] @ prior + dense.T @ full
    x = loglik + 50 / 6 * pair
    expected = prior ** 0.5 * torch.exp((x - x.max(1, keepdim=True).values) / 50)
    torch.testing.assert_close(z, expected / expected.sum(1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_composed_save_and_reload(runner, tiny, synthetic, tmp_path):
    """`--save-adapter` keeps the base's tensors and both configs; the reloaded composition scores the same,
    inductively and transductively."""
    from fsbench.adapters import load_adapter, save_adapter
    from fsbench.spec import RunSpec

    method, test = _fit(runner, tiny, synthetic, "linear_probe+transclip", {"linear_probe": {"max_iter": 20}})
    spec = RunSpec(method.name, "test-tiny", synthetic.name, 1, 1)
    reloaded = load_adapter(save_adapter(method, tmp_path, spec), method.ctx)
    assert type(reloaded) is type(method) and reloaded.config == method.config
    assert torch.equal(reloaded.logits(test.x), method.logits(test.x))
    encoded = method.transductive_encode(test.x)
    assert torch.equal(reloaded.fresh().transductive_logits(encoded), method.fresh().transductive_logits(encoded))


def test_identity_carries_each_parts_version_and_plugin_source():
    """A composed method's identity: its name and both configs, plus each part's version and a plug-in part's
    source digest (so editing a plug-in base re-runs X+transclip too)."""
    from fsbench.identity import method_identity
    from fsbench.methods.zero_shot import ZeroShot
    from fsbench.transduction import compose

    class PluginBase(ZeroShot):  # defined in this test file: a method not shipped with fsbench
        pass

    PluginBase.name = "plugin_base"
    step = METHODS.get("transclip")
    plugin = compose(PluginBase, step)
    assert plugin.name == "plugin_base+transclip"
    own = compose(METHODS.get("zero_shot"), step)
    config = {"zero_shot": {}, "transclip": {}}
    partless = {"parts": (), "__module__": "fsbench.transduction"}
    assert method_identity(plugin, config) != method_identity(type("Same", (plugin,), partless), config)
    assert method_identity(own, config) == method_identity(type("Same", (own,), partless), config)
    before = method_identity(plugin, config)
    PluginBase.version = 2
    assert method_identity(plugin, config) != before


def test_the_step_sees_each_whole_test_set_once_and_only_under_transductive(tmp_path, make_runner, synthetic,
                                                                            monkeypatch):
    """A recording step: one call per evaluation set under `transductive`, with the whole set's features and the
    base's prior (no labels exist in its inputs); none under `fewshot` or `test_time`."""
    from fsbench.methods.transclip import TransCLIP
    from fsbench.spec import RunSpec

    seen: list[tuple[int, str | None]] = []
    real = TransCLIP.transduce

    def record(self, inputs):
        assert set(vars(inputs)) == {"features", "prior", "source"}
        seen.append((len(inputs.features), inputs.source))
        return real(self, inputs)

    monkeypatch.setattr(TransCLIP, "transduce", record)
    runner = make_runner(tmp_path, ["linear_probe.max_iter=5"])
    for protocol in ("fewshot", "test_time"):
        runner.run_all(RunSpec("linear_probe+transclip", "test-tiny", "synthetic", 1, 1, protocol=protocol))
    assert seen == []
    results, _ = runner.run_all(RunSpec("linear_probe+transclip", "test-tiny", "synthetic", 1, 1,
                                        protocol="transductive"))
    assert seen == [(len(synthetic.test), "linear_probe")]
    assert results[0].extra["unlabelled_test_data"] == "transductive" and results[0].top1 is not None
