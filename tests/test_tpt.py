"""TPT (methods/tpt.py) against the official code (github.com/azshue/TPT, fixtures made outside the project:
tests/fixtures/tpt/README.md): the views, the confident selection, the one-step loss, gradient and AdamW update,
and the tuned prediction, on the same random CLIP and inputs; then the test-time runs of tpt and zero through the
CLI, with the views the runner hands them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from parity import parity_model_backbone
from PIL import Image

from fsbench.backbones import Backbone, BackboneSpec, build_backbone, describe
from fsbench.cli import main
from fsbench.config import method_config
from fsbench.errors import ConfigError
from fsbench.images import image_loader
from fsbench.method import Context
from fsbench.methods.tpt import TPT
from fsbench.methods.zero import Zero
from fsbench.prompts import frozen_image_features
from fsbench.protocols import ClassSet
from fsbench.tta_views import TTAViews, view_seed

FIXTURES = Path(__file__).parent / "fixtures" / "tpt"
CPU = torch.device("cpu")


def official(name: str = "official") -> dict:
    return torch.load(FIXTURES / f"{name}.pt", weights_only=False)


@pytest.fixture(scope="module")
def parity_backbone(tiny) -> Backbone:
    """The seeded random open_clip CLIP the official code was run on (its `build_model` on this state dict),
    unfused and frozen as `build_backbone` does, with the real BPE tokenizer."""
    data = official()
    return parity_model_backbone(data, tiny)


@pytest.fixture(scope="module")
def official_views() -> torch.Tensor:
    views = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert math.isclose(float(views.double().sum()), official()["views_sum"], rel_tol=1e-12)
    return views


def parity_tpt(bb: Backbone, **overrides) -> TPT:
    data = official()
    names = tuple(data["classnames"])
    classes = ClassSet("oxford_pets", "oxford_pets", tuple(range(len(names))), names, ("a photo of a {}.",))
    method = TPT(method_config(TPT, {"logit_scale": data["logit_scale"], **overrides}), Context(bb, classes, CPU, 1, 0))
    method.fit(None, None)  # type: ignore[arg-type]
    return method


def test_views_equal_the_official_augmix_augmenter_on_the_same_seeds():
    data = official("official_views")
    image = Image.fromarray(data["image"].numpy())
    for (augmix, seed), want in data["cases"].items():
        views = TTAViews(data["size"], data["mean"], data["std"], len(want) - 1, augmix)
        torch.testing.assert_close(views(image, seed=seed), want, rtol=0, atol=1e-6)  # measured: equal


def test_prompt_selection_loss_gradient_and_step_equal_the_official_code(parity_backbone, official_views):
    data = official()
    method = parity_tpt(parity_backbone)
    assert torch.equal(method.prompts.init, data["init"])  # "a photo of a": the same 4 token embeddings
    feats = frozen_image_features(parity_backbone, official_views)
    with torch.no_grad():
        logits = data["logit_scale"] * feats @ method.text.T
    torch.testing.assert_close(logits, data["logits"], rtol=1e-5, atol=1e-5)
    context = torch.nn.Parameter(method.prompts.init.clone())
    loss, selected = method.entropy(feats, context)
    assert selected.tolist() == data["selected"].tolist() and len(selected) == 6  # int(64 * 0.1)
    assert math.isclose(loss.item(), data["loss"].item(), rel_tol=1e-5)
    loss.backward()
    grad = data["grad"]
    assert ((context.grad - grad).norm() / grad.norm()).item() < 1e-5
    torch.testing.assert_close(context.grad, grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item())
    scores, tuned = method.adapt(official_views)
    torch.testing.assert_close(tuned, data["tuned"], rtol=1e-6, atol=1e-6)  # AdamW's first step ~ lr x sign(grad)
    torch.testing.assert_close(scores, data["logits_tuned"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(scores, data["logits_original"], atol=1e-4), "the step changed nothing"


def test_the_prompt_is_reset_for_every_image(parity_backbone, official_views):
    method = parity_tpt(parity_backbone)
    first, _ = method.adapt(official_views)
    method.adapt(official_views.flip(0))
    again, _ = method.adapt(official_views)
    assert torch.equal(first, again)
    assert torch.equal(method.online_logits(torch.stack([official_views, official_views])), torch.cat([first, first]))
    untuned, _ = parity_tpt(parity_backbone, steps=0).adapt(official_views)
    torch.testing.assert_close(untuned, official()["logits_original"], rtol=1e-5, atol=1e-5)


def test_tpt_config_and_backbone_support():
    with pytest.raises(ConfigError, match="tpt.top"):
        method_config(TPT, {"top": 0})
    with pytest.raises(ConfigError, match="tpt.augmix must be one of auto, always, never"):
        method_config(TPT, {"augmix": "yes"})
    with pytest.raises(ConfigError, match="tpt.init must be"):
        method_config(TPT, {"init": " "})
    assert TPT.supports(describe("SigLIP2-B/16")) is None and Zero.supports(describe("ConvNeXt-B")) is None


# ---- the runner's side: raw images in, views seeded per (seed, dataset, position) ---------------------------------
class Recorded(Zero):
    """ZERO that records what the runner hands `online_logits`."""

    seen: list[torch.Tensor]

    def online_logits(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return super().online_logits(x)


def test_online_methods_get_each_raw_images_views_seeded_by_its_position(make_runner, tmp_path, tiny, synthetic):
    runner = make_runner(tmp_path)
    method = Recorded(method_config(Zero, {"views": 2}), Context(tiny, synthetic, CPU, 1, 0))
    method.fit(None, None)  # type: ignore[arg-type]
    order = (4, 0, 7)
    method.seen = []
    runner.executor.test_logits(method, tiny, synthetic, order, "online", 1)
    forward = dict(zip(order, method.seen, strict=True))
    method.seen = []
    runner.executor.test_logits(method, tiny, synthetic, order[::-1], "online", 1)
    backward = dict(zip(order[::-1], method.seen, strict=True))
    loader = image_loader([synthetic.test[i] for i in order], synthetic.image_root, tiny.preprocess, 3, CPU, workers=0)
    originals = next(iter(loader))[0]
    for i, original in zip(order, originals, strict=True):
        assert forward[i].shape == (1, 3, 3, 32, 32) and torch.equal(forward[i], backward[i])
        assert torch.equal(forward[i][0, 0], original)  # the first view is the backbone's preprocess
        image = Image.open(synthetic.image_root / synthetic.test[i].path).convert("RGB")
        want = method.online_transform()(image, seed=view_seed(1, synthetic.name, i))
        assert torch.equal(forward[i][0], want)
    method.seen = []
    runner.executor.test_logits(method, tiny, synthetic, order, "none", 1)
    assert method.seen == []  # inductive: plain `logits` on preprocessed images


def test_tpt_and_zero_run_under_the_test_time_protocol(tmp_path, monkeypatch, synthetic_root):
    """End to end on test-tiny + synthetic (100 test images). CI uses 3 random views per image (the defaults are
    63 + the original) to keep the run to seconds."""
    monkeypatch.chdir(tmp_path)
    args = ["run", "--method", "tpt,zero", "--protocol", "test_time", "--backbone", "test-tiny", "--dataset",
            "synthetic", "--shots", "1", "--seed", "1", "--workers", "0", "--device", "cpu", "--data-root",
            str(synthetic_root), "--set", "tpt.views=3", "--set", "zero.views=3"]
    assert main(args) == 0
    for name in ("tpt", "zero"):
        result = json.loads((tmp_path / f"results/runs/test-tiny/synthetic/{name}/test_time/shots1_seed1.json")
                            .read_text())
        assert result["extra"]["unlabelled_test_data"] == "online" and result["n_test"] == 100
        assert result["config"]["views"] == 3 and 0 <= result["top1"] <= 100 and result["eval_seconds"] > 0
    tpt = json.loads((tmp_path / "results/runs/test-tiny/synthetic/tpt/test_time/shots1_seed1.json").read_text())
    assert tpt["config"]["lr"] == 5e-3 and tpt["config"]["top"] == 0.1 and tpt["trainable_params"] == 4 * 64


@pytest.mark.parametrize("family", ["test-tiny", "test-tiny-siglip2", "test-tiny-eva", "test-tiny-convnext",
                                    "test-tiny-metaclip2"])
def test_the_online_step_runs_on_every_family(family, synthetic):
    """TPT's step and ZERO's vote on each family's tiny random CLIP (no Hugging Face text tower among them)."""
    bb = build_backbone(BackboneSpec(family))
    image = Image.open(synthetic.image_root / synthetic.test[0].path).convert("RGB")
    for cls in (TPT, Zero):
        assert cls.supports(describe(family)) is None
        method = cls(method_config(cls, {"views": 3}), Context(bb, synthetic, CPU, 1, 0))
        method.fit(None, None)  # type: ignore[arg-type]
        views = method.online_transform()(image, seed=1)[None]
        assert views.shape == (1, 4, 3, bb.image_size, bb.image_size)
        scores = method.online_logits(views)
        assert scores.shape == (1, 10) and torch.isfinite(scores).all()
    untuned = TPT(method_config(TPT, {"views": 3, "steps": 0}), Context(bb, synthetic, CPU, 1, 0))
    untuned.fit(None, None)  # type: ignore[arg-type]
    torch.testing.assert_close(untuned.online_logits(views), untuned.logits(views[:, 0]), rtol=1e-5, atol=1e-4)
    tuner = TPT(method_config(TPT, {"views": 3}), Context(bb, synthetic, CPU, 1, 0))
    tuner.fit(None, None)  # type: ignore[arg-type]
    assert not torch.equal(tuner.adapt(views[0])[1], tuner.prompts.init), "the step left the context as it was"
