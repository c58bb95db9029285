"""The defining maths of the CoOp family (methods/coop.py, coop_4ctx.py, kgcoop.py, prograd.py) and of
the toolkit they share (fsbench/training.py, fsbench/prompts.py), on the tiny CLIP."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from fsbench.config import method_config
from fsbench.engine import Runner
from fsbench.errors import ConfigError
from fsbench.method import METHODS, Context, FeatureSource, Method, zero_shot_weights
from fsbench.methods.kgcoop import knowledge_penalty
from fsbench.methods.prograd import kl_to_teacher, official_lambda, prograd_template, project_conflicting
from fsbench.metrics import accuracy
from fsbench.prompts import build_prompts, encode_prompts, frozen_image_features
from fsbench.spec import RunSpec
from fsbench.text import encode_tokens
from fsbench.training import (
    BestOnValidation,
    DasslRecipe,
    best_on_validation,
    dassl_steps,
    index_batches,
    shuffled_batches,
)

SEED = 1
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def runner(tmp_path_factory, make_runner):
    return make_runner(tmp_path_factory.mktemp("prompts"))


def build(name: str, runner: Runner, tiny, synthetic, shots: int = 2, **overrides) -> tuple[Method, object, object]:
    """(method, train, val) as the engine builds them, not yet fitted."""
    cls = METHODS.get(name)
    train, val = runner.executor.fewshot(cls, tiny, synthetic, runner.planner.splits.get(synthetic, shots, SEED))
    ctx = Context(tiny, synthetic, CPU, SEED, shots, features=FeatureSource(runner.executor.features, tiny, synthetic))
    return cls(method_config(cls, overrides), ctx), train, val


def trajectory(method: Method, train, val) -> list[torch.Tensor]:
    """The context after every optimiser step of `method.fit` (seeded as the engine seeds a run)."""
    steps: list[torch.Tensor] = []
    hook = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: steps.append(opt.param_groups[0]["params"][0].detach().clone()))
    try:
        torch.manual_seed(SEED)
        method.fit(train, val)
    finally:
        hook.remove()
    return steps


# ---- KgCoOp ----------------------------------------------------------------------------------------


def test_kgcoop_with_weight_zero_is_coop_step_for_step(runner, tiny, synthetic):
    recipe = {"epochs": 3, "batch_size": 4, "n_ctx": 4, "init": "a photo of a"}
    coop = trajectory(*build("coop", runner, tiny, synthetic, **recipe))
    kg0 = trajectory(*build("kgcoop", runner, tiny, synthetic, weight=0.0, **recipe))
    kg8 = trajectory(*build("kgcoop", runner, tiny, synthetic, weight=8.0, **recipe))
    assert len(coop) == len(kg0) == 3 * dassl_steps(2 * len(synthetic.classnames), 4)
    assert all(torch.equal(a, b) for a, b in zip(coop, kg0, strict=True))
    assert not torch.equal(coop[-1], kg8[-1])  # the penalty does act


def test_kgcoop_penalty_is_half_the_squared_l2_distance_and_pulls_towards_the_handcrafted_prompt(
        runner, tiny, synthetic):
    a, b = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    assert math.isclose(knowledge_penalty(a, b).item(), ((a - b) ** 2).sum(-1).mean().item() / 2, rel_tol=1e-5)
    assert knowledge_penalty(a, a).abs().item() < 1e-6
    distances = {}
    for weight in (0.0, 100.0):
        method, train, val = build("kgcoop", runner, tiny, synthetic, epochs=3, batch_size=4, lr=0.5, weight=weight)
        torch.manual_seed(SEED)
        method.fit(train, val)
        distances[weight] = knowledge_penalty(method.text, method.ctx.text_weights()).item()
    assert distances[100.0] < distances[0.0]


def test_kgcoop_and_coop_4ctx_defaults_are_the_official_configs():
    kg = method_config(METHODS.get("kgcoop"), {})
    assert (kg.weight, kg.batch_size, kg.epochs, kg.lr, kg.init) == (8.0, 128, 100, 0.002, "a photo of a")
    c4 = method_config(METHODS.get("coop_4ctx"), {})
    assert (c4.init, c4.batch_size, c4.epochs, c4.lr) == ("a photo of a", 32, 0, 0.002)
    with pytest.raises(ConfigError, match="kgcoop.weight must be"):
        method_config(METHODS.get("kgcoop"), {"weight": -1.0})


def test_coop_4ctx_learns_four_context_vectors(runner, tiny, synthetic):
    method, train, val = build("coop_4ctx", runner, tiny, synthetic, epochs=1)
    torch.manual_seed(SEED)
    method.fit(train, val)
    assert method.context.shape == (4, tiny.model.token_embedding.weight.shape[1])


# ---- ProGrad ---------------------------------------------------------------------------------------


def test_prograd_projection_keeps_agreeing_gradients_and_removes_the_conflicting_component():
    reference = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    agreeing = torch.tensor([[1.0, 3.0], [-4.0, 1.0]])  # dot with the reference > 0
    assert torch.equal(project_conflicting(agreeing, reference, 1.0), agreeing)
    orthogonal = torch.tensor([[0.0, 3.0], [5.0, 1.0]])  # dot = 0: no conflict
    assert torch.equal(project_conflicting(orthogonal, reference, 1.0), orthogonal)
    conflicting = torch.tensor([[-1.0, 3.0], [-4.0, 1.0]])
    projected = project_conflicting(conflicting, reference, 1.0)
    torch.testing.assert_close(projected, torch.tensor([[0.0, 3.0], [-4.0, 1.0]]))  # exactly the -1 along u
    assert torch.dot(projected.flatten(), reference.flatten()).item() == 0.0
    torch.testing.assert_close(project_conflicting(conflicting, reference, 0.5), torch.tensor([[-0.5, 3.0],
                                                                                               [-4.0, 1.0]]))
    g, r = torch.randn(300), torch.randn(300)
    g = g - 2 * torch.dot(g, r).abs() * r / r.norm() ** 2 - r  # make it conflict
    p = project_conflicting(g, r, 1.0)
    assert torch.dot(g, r) < 0 and abs(torch.dot(p, r).item()) < 1e-3 * g.norm().item() * r.norm().item()
    torch.testing.assert_close(g - p, torch.dot(g, r) / r.norm() ** 2 * r)  # only the component along r went


def test_prograd_backward_is_the_projected_cross_entropy_gradient(runner, tiny, synthetic):
    method, train, val = build("prograd", runner, tiny, synthetic)
    method._build(method.config.n_ctx)
    method.prepare(train)
    images = torch.randn(6, 3, tiny.image_size, tiny.image_size)
    labels = torch.arange(6) % len(synthetic.classnames)
    loss = method.loss(images, labels)
    g_ce, = torch.autograd.grad(loss, [method.context], retain_graph=True)
    g_kl, = torch.autograd.grad(method._kl, [method.context], retain_graph=True)
    method.backward_fn()(loss, torch.amp.GradScaler(enabled=False))
    torch.testing.assert_close(method.context.grad, project_conflicting(g_ce, g_kl, 1.0))
    feats = frozen_image_features(tiny, images)
    teacher = 100.0 * feats @ zero_shot_weights(tiny, synthetic.classnames, ["a photo of a {}."], CPU).T
    student = 100.0 * feats @ method.text_features().T
    expected = -(teacher.softmax(-1) * student.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(method._kl, expected)
    torch.testing.assert_close(kl_to_teacher(student, teacher, 2.0),
                               4 * -((teacher / 2).softmax(-1) * (student / 2).log_softmax(-1)).sum(-1).mean())


def test_prograd_context_is_sixteen_vectors_ending_with_the_template_words(runner, tiny, synthetic):
    method, _, _ = build("prograd", runner, tiny, synthetic)
    method._build(method.config.n_ctx)
    words = tiny.tokenize(["a photo of a"])
    embedded = tiny.model.token_embedding(words)[0, 1:5]
    assert method.context.shape[0] == 16
    assert torch.equal(method.context[:12].detach(), torch.zeros_like(method.context[:12]))
    torch.testing.assert_close(method.context[12:].detach(), embedded.detach())
    # the prompt is the hand-crafted one once the zero slots are ignored: same class suffix
    plain = build_prompts(tiny, synthetic.classnames, 4, "a photo of a", CPU, torch.Generator())
    assert torch.equal(method.prompts.suffix, plain.suffix[:, :method.prompts.suffix.shape[1]])
    assert prograd_template("oxford_pets").endswith("a photo of a {}.") and prograd_template("x") == "a photo of a {}."
    assert [official_lambda(d, k) for d, k in (("dtd", 8), ("dtd", 4), ("food101", 16))] == [0.8, 1.0, 1.0]


def test_prograd_records_the_resolved_lambda(runner, tiny, synthetic):
    method, train, val = build("prograd", runner, tiny, synthetic, epochs=1)
    torch.manual_seed(SEED)
    method.fit(train, val)
    assert method.config.projection_lambda == 1.0 and method.config.epochs == 1


# ---- prompts ---------------------------------------------------------------------------------------


def test_padded_init_words_need_enough_slots(tiny, synthetic):
    with pytest.raises(ValueError, match="fewer than the 4 tokens"):
        build_prompts(tiny, synthetic.classnames, 2, "a photo of a", CPU, torch.Generator(), pad_words=True)
    prompts = build_prompts(tiny, synthetic.classnames, 4, "a photo of a", CPU, torch.Generator(), pad_words=True)
    written = encode_tokens(tiny.model, tiny.tokenize([f"a photo of a {c}." for c in synthetic.classnames]))
    torch.testing.assert_close(encode_prompts(tiny.model, prompts, prompts.init), written)


# ---- the training toolkit --------------------------------------------------------------------------


def test_batches_follow_dassls_drop_last_rule_or_keep_every_sample():
    gen = torch.Generator().manual_seed(0)
    dropped = shuffled_batches(torch.arange(10.0)[:, None], torch.arange(10), 4, gen)
    assert [len(next(dropped)[1]) for _ in range(4)] == [4, 4, 4, 4]  # 2 per epoch, the 2 left over dropped
    kept = index_batches(10, 4, torch.Generator().manual_seed(0), steps=3)
    epoch = [next(kept) for _ in range(3)]
    assert [e for e, _ in epoch] == [0, 0, 0] and sorted(torch.cat([i for _, i in epoch]).tolist()) == list(range(10))
    assert next(kept)[0] == 1


def test_best_on_validation_rule():
    first = BestOnValidation(initial="init")
    for acc, state in ((0.5, "a"), (0.7, "b"), (0.7, "c"), (0.6, "d")):
        first.offer(acc, lambda s=state: s)
    assert (first.state, first.accuracy, first.index) == ("b", 0.7, 1)
    last = BestOnValidation(ties="last")
    for acc, state in ((0.5, "a"), (0.7, "b"), (0.7, "c"), (0.6, "d")):
        last.offer(acc, lambda s=state: s)
    assert last.state == "c"
    single = BestOnValidation()
    assert single.offer(float("nan"), lambda: "only") and single.state == "only"


def test_grid_search_and_floor_follow_the_one_rule():
    assert best_on_validation([1, 2, 3, 4], {1: 50.0, 2: 75.0, 3: 75.0, 4: 60.0}.get) == 2  # first best
    assert best_on_validation([1, 2, 3], {1: 75.0, 2: 75.0, 3: 10.0}.get, ties="last") == 2
    # GDA's official search: the default stays unless an alpha scores strictly above 0
    assert best_on_validation([1.0, 2.0], lambda a: 0.0, initial=7.0, floor=0.0) == 7.0
    assert best_on_validation([1.0, 2.0], lambda a: 0.0 if a < 2 else 10.0, initial=7.0, floor=0.0) == 2.0


def test_the_one_accuracy_is_exact_percent():
    logits = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == 100.0 * 2 / 3  # an exact count, not a float32 mean
    assert math.isnan(accuracy(logits[:0], torch.tensor([], dtype=torch.long)))


def test_recipe_is_flat_toml_keys_with_one_line_errors():
    cfg = method_config(METHODS.get("coop"), {"lr": 0.01, "batch_size": 8})
    assert isinstance(cfg, DasslRecipe) and (cfg.lr, cfg.batch_size, cfg.momentum) == (0.01, 8, 0.9)
    assert cfg.schedule(10)(0) == cfg.warmup_lr and cfg.schedule(10)(1) == 0.01
    with pytest.raises(ConfigError, match="coop.lr must be a finite number > 0"):
        method_config(METHODS.get("coop"), {"lr": -1.0})
    with pytest.raises(ConfigError, match="cocoop.batch_size must be an integer >= 1"):
        method_config(METHODS.get("cocoop"), {"batch_size": 0})


# ---- evaluation on cached features ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["coop", "cocoop", "coop_4ctx", "kgcoop", "prograd"])
def test_frozen_image_tower_prompt_methods_score_cached_features(name):
    assert METHODS.get(name).eval_input == "features" and METHODS.get(name).scores_unseen_classes()


def test_coop_grid_encodes_the_test_split_once(tmp_path, make_runner):
    """15 CoOp runs (shots 1-16 x seeds 1-3, one epoch each) encode the test split once for the backbone."""
    runner = make_runner(tmp_path, ["coop.epochs=1"])
    for shots in (1, 2, 4, 8, 16):
        for seed in (1, 2, 3):
            result, _ = runner.run(RunSpec("coop", "test-tiny", "synthetic", shots, seed))
            assert result.status == "ok", result.error
    data = runner.planner.dataset("synthetic")
    assert runner.executor.features.encoded_images == len(data.test)
