"""TDA (methods/tda.py) against the official code (kdiAAA/TDA), and end to end under the `test_time` protocol.

The fixture `tests/fixtures/tda/official.pt` holds what the official `run_test_tda` loop computed on two fixed
random streams of 30 test images (one view each, and 20 views each), with the official configs and templates
(tests/fixtures/tda/README.md says how it was made).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fsbench.backbones import TINY_FAMILIES, BackboneSpec, build_backbone, describe
from fsbench.cli import main
from fsbench.config import method_config
from fsbench.data.templates import TEMPLATES as COOP_TEMPLATES
from fsbench.errors import ConfigError
from fsbench.method import Context
from fsbench.methods.tda import POSITIVE, TDA, TDAConfig, official_templates, resolved

FIXTURE = Path(__file__).parent / "fixtures" / "tda" / "official.pt"
CPU = torch.device("cpu")
# fsbench dataset -> the official datasets/<module>.py holding its template list
TEMPLATE_MODULE = {"caltech101": "caltech101", "dtd": "dtd", "eurosat": "eurosat", "fgvc_aircraft": "fgvc",
                   "food101": "food101", "imagenet": "imagenet", "imagenet_a": "imagenet_a",
                   "imagenet_r": "imagenet_r", "imagenet_sketch": "imagenet_sketch", "imagenet_v2": "imagenetv2",
                   "oxford_flowers": "oxford_flowers", "oxford_pets": "oxford_pets",
                   "stanford_cars": "stanford_cars", "sun397": "sun397", "ucf101": "ucf101"}
STREAMS = [("one_view", "dtd"), ("views", "imagenet_a")]  # fixture key, the dataset whose official config ran


@pytest.fixture(scope="module")
def official() -> dict:
    return torch.load(FIXTURE)


@pytest.fixture
def ctx(tiny, synthetic) -> Context:
    return Context(tiny, synthetic, CPU, seed=1, shots=1)


def replay(official: dict, key: str, dataset: str, ctx: Context) -> tuple[TDA, torch.Tensor]:
    """fsbench's TDA with `dataset`'s defaults and the fixture's text classifier, fed the stream one image at a
    time as the runner does; returns the method and its (N, C) scores."""
    method = TDA(resolved(method_config(TDA, {}), dataset), ctx)
    method.load_state_tensors({"text": official["text"].T.contiguous()})  # the official W is (D, C)
    return method, torch.cat([method.online_logits(x.unsqueeze(0)) for x in official[key]["features"]])


# float32 on both sides; the logits are 100 x cosines, so an ulp of a cosine is about 1e-5 of a logit, and the
# probabilities and entropies derived from them carry relative errors of that size


def test_the_fixture_streams_fill_and_evict_both_caches(official):
    """The check below is only as good as the streams: both caches fill, and entries are replaced."""
    for key, _ in STREAMS:
        run = official[key]
        preds = torch.bincount(run["pred"], minlength=5)
        normalised = run["entropy"] / math.log2(5)
        band = run["pred"][(normalised > 0.2) & (normalised < 0.5)]
        assert (preds > 3).any() and (torch.bincount(band, minlength=5) > 2).any()  # more than capacity
        assert sum(len(v["entropy"]) for v in run["neg_cache"].values()) >= 6
        assert (run["logits"].argmax(1) != run["clip_logits"].argmax(1)).any()  # the caches change predictions


@pytest.mark.parametrize(("key", "dataset"), STREAMS)
def test_scores_equal_the_official_loop_step_by_step(official, ctx, key, dataset):
    run = official[key]
    method, logits = replay(official, key, dataset, ctx)
    assert method.config.pos_alpha == run["config"]["positive"]["alpha"]
    assert method.config.pos_beta == run["config"]["positive"]["beta"]
    torch.testing.assert_close(logits, run["logits"], rtol=1e-5, atol=1e-4)
    assert torch.equal(logits.argmax(1), run["logits"].argmax(1))


@pytest.mark.parametrize(("key", "dataset"), STREAMS)
def test_each_image_is_observed_as_the_official_get_clip_logits(official, ctx, key, dataset):
    from fsbench.methods.tda import observe

    run = official[key]
    text = official["text"].T.contiguous()
    for i, views in enumerate(run["features"]):
        obs = observe(views, text)
        torch.testing.assert_close(obs.feature, run["feature"][i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(obs.logits, run["clip_logits"][i], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(obs.probs, run["probs"][i], rtol=1e-4, atol=1e-5)
        assert math.isclose(obs.entropy, float(run["entropy"][i]), rel_tol=1e-4, abs_tol=1e-5)
        assert obs.pred == int(run["pred"][i])


@pytest.mark.parametrize(("key", "dataset"), STREAMS)
def test_final_caches_equal_the_official_ones(official, ctx, key, dataset):
    run = official[key]
    method, _ = replay(official, key, dataset, ctx)
    for cache, want in ((method.pos, run["pos_cache"]), (method.neg, run["neg_cache"])):
        assert sorted(c for c in range(5) if cache.entropy[c]) == sorted(want)
        for c, entries in want.items():
            n = len(entries["entropy"])
            assert len(cache.entropy[c]) == n and bool(cache.filled[c, :n].all()) and not cache.filled[c, n:].any()
            torch.testing.assert_close(torch.tensor(cache.entropy[c]), entries["entropy"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cache.keys[c, :n], entries["keys"], rtol=1e-5, atol=1e-6)
            if "probs" in entries:
                torch.testing.assert_close(cache.probs[c, :n], entries["probs"], rtol=1e-4, atol=1e-5)


def test_defaults_are_the_official_configs(official):
    configs = official["configs"]
    assert len(configs) == 15 and {file for file, _, _ in POSITIVE.values()} == set(configs)
    default = TDAConfig()
    for dataset, (file, alpha, beta) in POSITIVE.items():
        pos, neg = configs[file]["positive"], configs[file]["negative"]
        assert (pos["enabled"], pos["shot_capacity"], pos["alpha"], pos["beta"]) == (True, 3, alpha, beta), dataset
        assert (neg["enabled"], neg["shot_capacity"], neg["alpha"], neg["beta"]) == (
            default.neg_enabled, default.neg_capacity, default.neg_alpha, default.neg_beta)
        assert [neg["entropy_threshold"]["lower"], neg["entropy_threshold"]["upper"]] == default.neg_entropy
        assert [neg["mask_threshold"]["lower"], neg["mask_threshold"]["upper"]] == default.neg_mask
        assert default.pos_capacity == pos["shot_capacity"]
    assert (resolved(default, "synthetic").pos_alpha, resolved(default, "synthetic").pos_beta) == (2.0, 5.0)
    assert resolved(TDAConfig(pos_alpha=0.5), "dtd").pos_alpha == 0.5  # a user's value wins


def test_templates_are_the_official_lists(official):
    for dataset, module in TEMPLATE_MODULE.items():
        own = [COOP_TEMPLATES.get(dataset, COOP_TEMPLATES["imagenet"])]
        assert official_templates(dataset, own) == official["templates"][module], dataset
    assert official_templates("synthetic", ["x {}."]) == ["x {}."]


@pytest.mark.parametrize("bad", [{"neg_entropy": [0.5, 0.2]}, {"neg_mask": [0.03]}, {"pos_capacity": 0},
                                 {"select": 0.0}, {"neg_alpha": -1.0}])
def test_config_mistakes_are_one_line_errors(bad):
    with pytest.raises(ConfigError, match=r"^tda\."):
        method_config(TDA, bad)


def test_fresh_copies_start_empty_and_share_the_usage_record(official, ctx):
    method = TDA(resolved(method_config(TDA, {}), "dtd"), ctx)
    method.load_state_tensors({"text": official["text"].T.contiguous()})
    assert method.inference_overhead() == 0
    first = method.fresh()
    first.online_logits(official["one_view"]["features"][:, 0])
    held = len(first.pos) * 17 + len(first.neg) * (17 + 5)  # D = 16 and an entropy per key; C probabilities
    assert len(first.pos) == 10 and method.inference_overhead() == held > 0
    second = method.fresh()
    assert len(second.pos) == len(second.neg) == 0 and len(method.pos) == 0
    x = official["one_view"]["features"][:3, 0]
    torch.testing.assert_close(second.logits(x), 100 * x @ official["text"])  # without test data: zero-shot


@pytest.fixture(scope="module")
def runner(tmp_path_factory, make_runner):
    return make_runner(tmp_path_factory.mktemp("tda"))


@pytest.mark.parametrize("family", ["test-tiny", *TINY_FAMILIES])
def test_every_backbone_family_adapts_online(family, runner, synthetic):
    """Cached features only: TDA applies to every family (`supports` is None), its caches fill on each."""
    assert TDA.supports(describe(family)) is None
    bb = build_backbone(BackboneSpec(family))
    method = TDA(method_config(TDA, {}), Context(bb, synthetic, CPU, seed=1, shots=1))
    method.fit(None, None)  # type: ignore[arg-type]  (training-free: the shots are not used)
    feats = runner.executor.features.split(bb, synthetic, "test").x[:20]
    scorer = method.fresh()
    logits = scorer.online_logits(feats)
    assert logits.shape == (20, len(synthetic.classnames)) and torch.isfinite(logits).all()
    assert len(scorer.pos) > 0 and method.inference_overhead() > 0


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(root: Path, method: str, protocol: str) -> dict:
    assert main(["run", "--method", method, "--protocol", protocol, "--backbone", "test-tiny", "--dataset",
                 "synthetic", "--shots", "1", "--seed", "1", "--workers", "0", "--device", "cpu",
                 "--data-root", str(root)]) == 0
    folder = "" if protocol == "fewshot" else protocol
    path = Path("results/runs/test-tiny/synthetic") / method / folder / "shots1_seed1.json"
    return json.loads(path.read_text())


def test_cli_runs_tda_online_under_test_time_and_zero_shot_otherwise(workdir, synthetic_root, monkeypatch):
    """A recording of TDA's hooks: under test_time one fresh copy sees the test images one at a time and `logits`
    is never called; under fewshot only `logits` (zero-shot, the same top-1 as zero_shot)."""
    calls: list[tuple[str, int]] = []

    def recorded(hook: str):
        original = getattr(TDA, hook)

        def record(self, *x):
            calls.append((hook, len(x[0]) if x else 0))  # hook name, images in the batch
            return original(self, *x)
        return record

    for hook in ("logits", "online_logits", "fresh"):
        monkeypatch.setattr(TDA, hook, recorded(hook))
    online = _run(synthetic_root, "tda", "test_time")
    assert calls == [("fresh", 0)] + [("online_logits", 1)] * 100  # one fresh copy, then one image at a time
    calls.clear()
    assert online["status"] == "ok" and online["extra"]["unlabelled_test_data"] == "online"
    assert online["n_test"] == 100 and online["top1"] is not None and online["trainable_params"] == 0
    assert online["inference_overhead"] > 0  # the caches held test images
    assert (online["config"]["pos_alpha"], online["config"]["pos_beta"]) == (2.0, 5.0)  # no config: ImageNet's
    inductive = _run(synthetic_root, "tda", "fewshot")
    assert {h for h, _ in calls} == {"logits"} and sum(n for _, n in calls) == 100  # no online hook, no copy
    assert "unlabelled_test_data" not in inductive["extra"] and inductive["inference_overhead"] == 0
    assert inductive["top1"] == _run(synthetic_root, "zero_shot", "fewshot")["top1"]


def test_views_follow_the_official_pipeline_per_dataset():
    """63 AugMix views + the original on ImageNet-A/-V2/-R/-Sketch (utils.py:132-135), the image alone elsewhere
    (ImageNet itself and the ten other datasets, :128-130, :137-139); a user's value wins."""
    for dataset in ("imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch"):
        assert resolved(TDAConfig(), dataset).views == 63
    for dataset in ("imagenet", "dtd", "synthetic"):
        assert resolved(TDAConfig(), dataset).views == 0
    assert resolved(TDAConfig(views=3), "dtd").views == 3 and resolved(TDAConfig(views=0), "imagenet_a").views == 0


def test_views_of_raw_images_are_encoded_and_observed_as_features(synthetic):
    """With views, the runner hands TDA (1, 1 + V, 3, S, S) views of each raw image (`online_transform`); their
    encoded, normalised features go through the same step as (1, 1 + V, D) features would."""
    bb = build_backbone(BackboneSpec("test-tiny"))
    method = TDA(method_config(TDA, {"views": 3}), Context(bb, synthetic, CPU, seed=1, shots=1))
    method.fit(None, None)  # type: ignore[arg-type]
    transform = method.online_transform()
    assert transform is not None and TDA(method_config(TDA, {}), method.ctx).online_transform() is None
    from PIL import Image

    image = Image.open(synthetic.image_root / synthetic.test[0].path).convert("RGB")
    views = transform(image, seed=7)[None]  # (1, 4, 3, S, S), the original first
    assert views.shape[:2] == (1, 4)
    a, b = method.fresh(), method.fresh()
    with torch.no_grad():
        feats = torch.nn.functional.normalize(bb.model.encode_image(views[0]).float(), dim=-1)[None]
    torch.testing.assert_close(a.online_logits(views), b.online_logits(feats))
    assert len(a.pos) == len(b.pos) == 1


def test_cli_runs_tda_with_views_through_the_image_path(workdir, synthetic_root):
    """`--set tda.views=2`: the image path with TDA's own views; the stored config records what ran."""
    assert main(["run", "--method", "tda", "--protocol", "test_time", "--backbone", "test-tiny", "--dataset",
                 "synthetic", "--shots", "1", "--seed", "1", "--workers", "0", "--device", "cpu",
                 "--data-root", str(synthetic_root), "--set", "tda.views=2"]) == 0
    stored = json.loads(Path("results/runs/test-tiny/synthetic/tda/test_time/shots1_seed1.json").read_text())
    assert stored["status"] == "ok" and stored["config"]["views"] == 2 and stored["n_test"] == 100
