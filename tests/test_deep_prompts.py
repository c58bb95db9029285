"""The defining maths of MaPLe and PLOT++ (methods/maple.py, methods/plot_pp.py), on the tiny CLIP.

- MaPLe at depth 1 without coupling is its shallow form: CoOp's text prompt ("a photo" learned, "of a"
  fixed) and the frozen image tower; at depth 2 the hooks put each block's prompts where the official
  code does (after SOS in text, the last tokens in vision, the vision ones projected from the text ones).
- PLOT++ with one text and one vision prompt is a global prompt: the OT similarity is the plain cosine;
  with one text prompt the plan is uniform (the mean of the M cosines); Sinkhorn's plan has the marginals.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fsbench.methods.plot_pp as plot_pp
from fsbench.config import method_config
from fsbench.errors import ConfigError
from fsbench.method import Context
from fsbench.methods.maple import MaPLe, MaPLePrompts
from fsbench.methods.plot_pp import TEMPLATES, PlotPP, ot_scores, sinkhorn, template_prompts
from fsbench.prompts import assemble_prompts, encode_prompts, frozen_image_features
from fsbench.towers import text_forward, vision_tokens


def _method(cls, tiny, synthetic, **overrides):
    ctx = Context(tiny, synthetic, torch.device("cpu"), seed=1, shots=1)
    return cls(method_config(cls, overrides), ctx)


def _images(tiny, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, tiny.image_size, tiny.image_size, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_maple_depth_1_without_coupling_is_coop_with_the_official_context(tiny, synthetic):
    maple = _method(MaPLe, tiny, synthetic, depth=1, coupling=False)
    maple._build()
    learner, prompts = maple.learner, maple.prompts
    assert learner.deep_text.shape[0] == 0 and learner.proj is None
    words = tiny.tokenize(["a photo of a"])
    assert torch.equal(learner.context, tiny.model.token_embedding(words)[0, 1:3])  # "a photo" is learned
    # the prompt is "[SOS] [a] [photo] of a <class>. [EOS]": "of a" stays fixed (trainers/maple.py:121-131)
    name = synthetic.classnames[0].replace("_", " ")
    full = tiny.model.token_embedding(tiny.tokenize([f"a photo of a {name}."]))[0, :prompts.suffix.shape[1] + 3]
    start = torch.cat([prompts.prefix[0], learner.context, prompts.suffix[0]])
    assert torch.equal(start, full)
    context = learner.context + 0.1 * torch.randn_like(learner.context)  # any context, not only the init
    learner.context.copy_(context)
    assert torch.allclose(maple.text_features(), encode_prompts(tiny.model, prompts, context), atol=1e-6)
    images = _images(tiny)
    assert torch.allclose(maple.image_features(images), frozen_image_features(tiny, images), atol=1e-6)


@torch.no_grad()
def test_maple_depth_1_with_coupling_adds_only_the_projected_input_prompt(tiny, synthetic):
    maple = _method(MaPLe, tiny, synthetic, depth=1)
    maple._build()
    images, learner = _images(tiny), maple.learner
    expected = vision_tokens(tiny.model, images, learner.proj(learner.context))[0]
    assert torch.allclose(maple.image_features(images), F.normalize(expected, dim=-1), atol=1e-6)
    assert not torch.allclose(maple.image_features(images), frozen_image_features(tiny, images), atol=1e-3)


@torch.no_grad()
def test_maple_deep_prompts_replace_the_tokens_of_each_block(tiny, synthetic):
    maple = _method(MaPLe, tiny, synthetic, depth=9)  # capped at the tiny towers' 2 blocks
    maple._build()
    learner, n = maple.learner, 2
    assert maple.config.depth == 2 and learner.deep_text.shape == (1, n, 64) and len(learner.deep_proj) == 1
    seen = []  # the input of each block, after the hook

    def spy(hook):
        def run(i, x):
            seen.append(hook(i, x))
            return seen[-1]
        return run

    text_forward(tiny.model, assemble_prompts(maple.prompts, learner.context), maple.prompts.eot,
                 spy(learner.text_hook()))
    positions = tiny.model.positional_embedding[1:1 + n]  # block 0 gets the context with its positions
    assert torch.allclose(seen[0][:, 1:1 + n], (learner.context + positions).expand(len(seen[0]), -1, -1))
    assert torch.equal(seen[1][:, 1:1 + n], learner.deep_text[0].expand(len(seen[1]), -1, -1))
    first, hook = learner.vision_prompts()
    seen.clear()
    vision_tokens(tiny.model, _images(tiny), first, spy(hook))
    assert seen[0].shape[1] == 17 + n  # the input prompts were appended (after ln_pre: not compared)
    assert torch.allclose(seen[1][:, -n:], learner.deep_proj[0](learner.deep_text[0]).expand(3, -1, -1))


def test_maple_projections_start_equal_as_the_official_clones(tiny, synthetic):
    maple = _method(MaPLe, tiny, synthetic, depth=2)
    maple._build()
    learner = MaPLePrompts(maple.prompts.init, 4, 64, True, seed=1)
    weights = [p.weight for p in learner.deep_proj]
    assert len(weights) == 3 and all(torch.equal(w, weights[0]) for w in weights)


def test_sinkhorn_plan_has_the_marginals():
    gen = torch.Generator().manual_seed(0)
    sim = torch.rand(5, 3, 4, 6, generator=gen) * 2 - 1  # (B, C, M, N) cosines
    kernel = torch.exp(-(1 - sim) / 0.1)
    u, v = torch.full((5, 3, 4), 1 / 4), torch.full((5, 3, 6), 1 / 6)
    plan = sinkhorn(kernel, u, v, max_iter=1000, thresh=1e-9)
    assert torch.allclose(plan.sum(-1), u, atol=1e-5) and torch.allclose(plan.sum(-2), v, atol=1e-6)
    official = sinkhorn(kernel, u, v, max_iter=100, thresh=1e-2)  # stops early: columns exact, rows close
    assert torch.allclose(official.sum(-2), v, atol=1e-6)
    assert torch.allclose(official.sum(-1), u, atol=0.05)
    assert (plan >= 0).all()


def test_ot_with_one_prompt_each_is_the_plain_cosine_and_with_one_text_prompt_the_mean():
    gen = torch.Generator().manual_seed(1)
    image, text = torch.randn(1, 4, 8, generator=gen), torch.randn(1, 5, 8, generator=gen)
    ot, glob = ot_scores(image, text, eps=0.1, max_iter=100, thresh=1e-2)
    cosine = F.normalize(image[0], dim=-1) @ F.normalize(text[0], dim=-1).T
    assert torch.allclose(ot, cosine, atol=1e-6) and torch.allclose(glob, cosine, atol=1e-6)
    images = torch.randn(3, 4, 8, generator=gen)  # M = 3 image features, one text prompt: plan = 1/M
    ot, _ = ot_scores(images, text, eps=0.1, max_iter=100, thresh=1e-2)
    mean = torch.stack([F.normalize(i, dim=-1) @ F.normalize(text[0], dim=-1).T for i in images]).mean(0)
    assert torch.allclose(ot, mean, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the OT stays float32 under the training autocast
        assert ot_scores(images, text, eps=0.1, max_iter=100, thresh=1e-2)[0].dtype == torch.float32


@torch.no_grad()
def test_plot_pp_with_one_prompt_each_scores_as_a_global_prompt(tiny, synthetic):
    plot = _method(PlotPP, tiny, synthetic, n_text=1, n_vision=1)
    plot._build(plot._templates())
    plot._finish()
    images = _images(tiny)
    p, ctx = plot.prompts[0], plot.context[0]
    text = text_forward(tiny.model, assemble_prompts(p, ctx), p.eot)
    image = F.normalize(vision_tokens(tiny.model, images, plot.vision[0])[0], dim=-1)
    assert torch.allclose(plot.logits(images), 100 * image @ text.T, atol=1e-4)


@torch.no_grad()
def test_plot_pp_templates_set_the_context_as_the_official_code(tiny, synthetic):
    plot = _method(PlotPP, tiny, synthetic)
    prompts = template_prompts(plot, TEMPLATES["imagenet"])
    assert [p.n_ctx for p in prompts] == [4, 4, 4, 4]  # the words of "a photo of a"
    emb, name = tiny.model.token_embedding, synthetic.classnames[0].replace("_", " ")
    ids = tiny.tokenize([f"one picture of a {name}."])
    full = torch.cat([prompts[3].prefix[0], prompts[3].init, prompts[3].suffix[0]])
    assert torch.equal(full, emb(ids)[0, :len(full)])
    # "this is a" has 3 tokens: its 4th context vector starts as the end token's embedding and the
    # class name's first token becomes context (plotpp.py:96, :133), as in the official code
    short = tiny.tokenize(["this is a"])
    assert torch.equal(prompts[2].init, emb(short)[0, 1:5])
    assert torch.equal(prompts[2].init[3], emb(short)[0, short.argmax()])


def test_plot_pp_stage_1_trains_the_vision_prompts_only(tiny, synthetic, monkeypatch, make_runner, tmp_path):
    calls = []  # per stage: the optimised parameters, as they are when the stage starts
    real = plot_pp.train_epochs

    def spy(ctx, opt, *args, **kwargs):
        calls.append([p.detach().clone() for group in opt.param_groups for p in group["params"]])
        return real(ctx, opt, *args, **kwargs)

    monkeypatch.setattr(plot_pp, "train_epochs", spy)
    runner = make_runner(tmp_path)
    train, val = runner.executor.fewshot(PlotPP, tiny, synthetic, runner.planner.splits.get(synthetic, 1, 1))
    plot = _method(PlotPP, tiny, synthetic, epochs=2)
    plot.fit(train, val)
    (vision0,), (text1, vision1) = calls  # stage 1: vision prompts; stage 2: text contexts and vision prompts
    assert vision0.shape == vision1.shape == (4, 2, 64) and text1.shape == (4, 4, 64)
    assert torch.equal(text1, torch.stack([p.init for p in plot.prompts]))  # stage 1 left the text as set
    assert not torch.equal(vision0, vision1)  # stage 1 moved the vision prompts
    assert not torch.equal(plot.context, text1)  # stage 2 moved the text contexts


@pytest.mark.parametrize("cls,bad", [(MaPLe, {"depth": 0}), (MaPLe, {"n_ctx": 0}), (PlotPP, {"eps": 0.0}),
                                     (PlotPP, {"n_text": 5}), (PlotPP, {"init": "a photo"})])
def test_configs_reject_out_of_range_values(cls, bad):
    with pytest.raises(ConfigError, match=cls.Config.section):
        method_config(cls, bad)
