"""PromptSRC and TCP (methods/promptsrc.py, methods/tcp.py): the loss and its gradients equal the official
code's on the same random weights and inputs (fixtures made outside the project, tests/fixtures/*/README.md),
the defining limits of each method, and the sweep of issue 22 on the tiny backbone."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from parity import parity_model_backbone
from test_method_contract import fitted
from test_report_protocols import ROOT, _record
from test_sweep import results_by_key, sweep_args

from fsbench.backbones import Backbone
from fsbench.cli import main
from fsbench.config import method_config
from fsbench.method import Context
from fsbench.methods.dept import DePTCoOp, DePTHead, DePTKgCoOp, DePTMaPLe
from fsbench.methods.promptsrc import (
    PROMPTSRC_TEMPLATES,
    PromptSRC,
    PromptSRCPrompts,
    gpa_weights,
    template_mean_features,
)
from fsbench.methods.tcp import TCP, TCPLearner
from fsbench.prompt_hooks import block_tokens_hook, deep_prompts_hook
from fsbench.prompts import assemble_prompts, encode_prompts, frozen_image_features
from fsbench.protocols import ClassSet
from fsbench.report.compare import (
    base2new_markdown,
    compare_base2new,
    compare_to_reference,
    fewshot_reference,
    load_reference,
)
from fsbench.towers import text_forward, vision_tokens

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"
CPU = torch.device("cpu")


def official(name: str) -> dict:
    return torch.load(FIXTURES / name / "official_loss.pt", weights_only=False)


@pytest.fixture(scope="module")
def parity_backbone(tiny) -> Backbone:
    """The seeded random open_clip CLIP the official code was run on (text 9 x 512 wide: TCP's block 8 and
    its hard-coded 512), unfused and frozen as `build_backbone` does, with the real BPE tokenizer."""
    data = official("tcp")
    return parity_model_backbone(data, tiny)


def parity_context(bb: Backbone, dataset: str, names: list[str]) -> Context:
    classes = ClassSet(dataset, dataset, tuple(range(len(names))), tuple(names), ("a photo of a {}.",))
    return Context(bb, classes, CPU, seed=1, shots=1)


def assert_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for name, grad in want.items():
        assert got[name].shape == grad.shape, name
        assert ((got[name] - grad).norm() / grad.norm()).item() < 1e-5, name  # measured: about 2e-6
        scale = grad.abs().max().item()  # float32 through 9 blocks: elementwise error ~1e-6 of the largest entry
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_promptsrc_loss_and_gradients_equal_the_official_code(parity_backbone):
    data = official("promptsrc")
    ctx = parity_context(parity_backbone, "oxford_pets", data["classnames"])
    method = PromptSRC(method_config(PromptSRC, {"logit_scale": data["logit_scale"]}), ctx)
    method._build()
    method.frozen_text = template_mean_features(method, PROMPTSRC_TEMPLATES)
    init, learner = data["init"], method.learner
    deep_text = [init[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] for i in range(1, 9)]
    with torch.no_grad():
        learner.context.copy_(init["prompt_learner.ctx"])  # the official "a photo of a" embeddings
        assert torch.equal(learner.context, init["prompt_learner.ctx"])
        learner.deep_text.copy_(torch.stack(deep_text))
        learner.vision.copy_(init["image_encoder.VPT"])
        learner.deep_vision.copy_(init["image_encoder.transformer.resblocks.1.VPT_shallow"][None])
    loss = method.loss(data["images"], data["labels"])
    loss.backward()
    assert math.isclose(loss.item(), data["loss"], rel_tol=1e-5)
    grads = {"prompt_learner.ctx": learner.context.grad, "image_encoder.VPT": learner.vision.grad,
             "image_encoder.transformer.resblocks.1.VPT_shallow": learner.deep_vision.grad[0]}
    grads |= {f"text_encoder.transformer.resblocks.{i}.VPT_shallow": learner.deep_text.grad[i - 1] for i in range(1, 9)}
    assert_grads(grads, data["grads"])


def test_tcp_loss_and_gradients_equal_the_official_code(parity_backbone):
    data = official("tcp")
    ctx = parity_context(parity_backbone, "oxford_pets", data["classnames"])  # "X X X X {}, a type of pet."
    method = TCP(method_config(TCP, {"logit_scale": data["logit_scale"]}), ctx)
    method._build()
    assert method.config.block == 8
    init = {k.removeprefix("prompt_learner.").replace("meta_net", "tke").replace("ctx", "context"): v
            for k, v in data["init"].items()}
    method.learner.load_state_dict(init)
    loss = method.loss(data["images"], data["labels"])
    loss.backward()
    assert math.isclose(loss.item(), data["loss"], rel_tol=1e-5)
    named = dict(method.learner.named_parameters())
    assert_grads({k: named[k.removeprefix("prompt_learner.").replace("meta_net", "tke").replace("ctx", "context")].grad
                  for k in data["grads"]}, data["grads"])


def test_gpa_weights_are_the_normalised_gaussian_densities():
    for mean, std in [(30, 30), (45, 5), (15, 1)]:
        dens = [math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)) for e in range(1, 51)]
        want = [d / sum(dens) for d in dens]
        got = gpa_weights(50, mean, std)
        assert all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-300) for a, b in zip(got, want, strict=True))
    assert math.isclose(sum(gpa_weights(2, 45, 1)), 1.0) and gpa_weights(2, 45, 1)[1] > 0.99  # no underflow


def _images(tiny, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, tiny.image_size, tiny.image_size, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_promptsrc_with_zero_prompts_in_depth_one_is_coop_and_frozen_vision(tiny, synthetic):
    """Depth 1 in both towers: the text side is CoOp's prompt "a photo of a <class>." (all 4 tokens learned);
    the vision prompts are appended before ln_pre only; the GPA pair is the official per-dataset one."""
    ctx = Context(tiny, synthetic, CPU, seed=1, shots=1)
    method = PromptSRC(method_config(PromptSRC, {"depth_text": 1, "depth_vision": 1}), ctx)
    method._build()
    learner = method.learner
    assert learner.deep_text.shape[0] == 0 and learner.deep_vision.shape[0] == 0
    assert (method.config.gpa_mean, method.config.gpa_std) == (30.0, 30.0)
    words = tiny.model.token_embedding(tiny.tokenize(["a photo of a"]))[0, 1:5]
    assert torch.equal(learner.context, words)
    coop = encode_prompts(tiny.model, method.prompts, learner.context)
    assert torch.allclose(method.text_features(), coop, atol=1e-6)
    images = _images(tiny)
    want = F.normalize(vision_tokens(tiny.model, images, learner.vision)[0], dim=-1)
    assert torch.allclose(method.image_features(images), want, atol=1e-6)
    assert not torch.allclose(want, frozen_image_features(tiny, images), atol=1e-3)


def test_promptsrc_loss_is_cross_entropy_when_prompted_equals_frozen(tiny, synthetic):
    """With the prompts' effect removed (features equal to the frozen ones) the regularisers vanish."""
    ctx = Context(tiny, synthetic, CPU, seed=1, shots=1)
    method = PromptSRC(method_config(PromptSRC, {}), ctx)
    method._build()
    method.frozen_text = template_mean_features(method, PROMPTSRC_TEMPLATES)
    images, labels = _images(tiny), torch.tensor([0, 1, 2])
    frozen = frozen_image_features(tiny, images)
    method.text_features = lambda: method.frozen_text
    method.image_features = lambda x: frozen
    logits = 100 * frozen @ method.frozen_text.T
    torch.testing.assert_close(method.loss(images, labels), F.cross_entropy(logits, labels))


def test_gpa_replaces_the_prompts_by_the_weighted_sum(tiny, synthetic, make_runner, tmp_path, monkeypatch):

    seen = []
    real = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        seen.append([p.detach().clone() for p in self.param_groups[0]["params"]])
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    runner = make_runner(tmp_path)
    method = fitted("promptsrc", runner, tiny, synthetic)  # FAST: 2 epochs
    steps = len(seen) // 2
    w = gpa_weights(2, method.config.gpa_mean, method.config.gpa_std)
    for got, first, last in zip(method.learner.parameters(), seen[steps - 1], seen[-1], strict=True):
        torch.testing.assert_close(got, w[0] * first + w[1] * last)


@torch.no_grad()
def test_tcp_class_tokens_enter_before_their_block_and_only_there(tiny, synthetic):
    ctx = Context(tiny, synthetic, CPU, seed=1, shots=1)
    method = TCP(method_config(TCP, {}), ctx)
    method._build()
    assert method.config.block == 1  # block 8 capped at test-tiny's last block
    tokens = method.learner.tokens(method.handcrafted)
    assert tokens.shape == (len(synthetic.classnames), 4, 64)
    seen = []

    def spy(i, x):
        seen.append(block_tokens_hook(1, tokens, 1)(i, x))
        return seen[-1]

    x = assemble_prompts(method.prompts, method.learner.context)
    text_forward(tiny.model, x, method.prompts.eot, spy)
    assert torch.equal(seen[1][:, 1:5], tokens) and not torch.equal(seen[0][:, 1:5], tokens)
    # blend 0 leaves CoOp's prompt: the features of the plain learned context
    method.config.blend = 0.0
    coop = encode_prompts(tiny.model, method.prompts, method.learner.context)
    torch.testing.assert_close(method.text_features(), coop, atol=1e-6, rtol=1e-5)


def test_tcp_prompts_and_handcrafted_templates_follow_the_dataset(tiny):
    names = ["american bulldog", "abyssinian"]
    classes = ClassSet("oxford_pets", "oxford_pets", (0, 1), tuple(names), ("a photo of a {}, a type of pet.",))
    method = TCP(method_config(TCP, {}), Context(tiny, classes, CPU, seed=1, shots=1))
    method._build()
    emb = tiny.model.token_embedding(tiny.tokenize(["X X X X american bulldog, a type of pet."]))[0]
    full = torch.cat([method.prompts.prefix[0], method.prompts.init, method.prompts.suffix[0]])
    assert torch.equal(full[5:], emb[5:len(full)])  # context then "<class>, a type of pet."
    want = F.normalize(tiny.model.encode_text(tiny.tokenize(["a photo of a american bulldog, a type of pet.",
                                                             "a photo of a abyssinian, a type of pet."])), dim=-1)
    torch.testing.assert_close(method.handcrafted, want, atol=1e-5, rtol=1e-5)


def test_deep_prompts_hook_replaces_from_the_start_and_the_end():
    x = torch.zeros(2, 6, 3)
    deep = torch.ones(2, 2, 3) * torch.tensor([1.0, 2.0])[:, None, None]
    assert torch.equal(deep_prompts_hook(deep, 1)(0, x), x)
    assert torch.equal(deep_prompts_hook(deep, 1)(2, x)[:, 1:3], deep[1].expand(2, -1, -1))
    assert torch.equal(deep_prompts_hook(deep, -2)(1, x)[:, -2:], deep[0].expand(2, -1, -1))
    assert torch.equal(deep_prompts_hook(deep, 1)(3, x), x)


def test_sweep_of_promptsrc_and_tcp_on_the_tiny_backbone(tmp_path, synthetic_root, capsys, monkeypatch):
    """Issue 22's acceptance command: `fsbench sweep --methods promptsrc,tcp,dept_coop,dept_kgcoop,dept_maple,gallop
    --backbones test-tiny --datasets synthetic --shots 1,2 --seeds 1` (short schedules; the LoRA family's in
    tests/test_lora_family.py)."""
    monkeypatch.chdir(tmp_path)  # no ./bench.toml: built-in defaults
    methods = ("promptsrc", "tcp", "dept_coop", "dept_kgcoop", "dept_maple", "gallop")
    args = [*sweep_args(tmp_path, synthetic_root), "--methods", ",".join(methods), "--shots", "1,2", "--seeds", "1",
            *[a for m in methods for a in ("--set", f"{m}.epochs=2")]]
    assert main(args) == 0
    results = results_by_key(tmp_path / "results")
    assert set(results) == {(m, s, 1) for m in methods for s in (1, 2)}
    assert all(r.error is None for r in results.values())


def test_trainable_parameters_on_vit_b16_widths_equal_the_official_counts():
    """The official counts on a random ViT-B/16 (tests/fixtures/*/README.md): PromptSRC 46,080, TCP 331,904
    (text width 512, vision width 768, feature dim 512, depth 9, 4 + 4 tokens)."""
    promptsrc = PromptSRCPrompts(torch.zeros(4, 512), 9, 4, 768, 9, seed=1)
    assert sum(p.numel() for p in promptsrc.parameters()) == 46_080
    tcp = TCPLearner(torch.zeros(4, 512), 512, 4, 4, seed=1)
    assert sum(p.numel() for p in tcp.parameters()) == 331_904
    head = sum(p.numel() for p in DePTHead(512, 3, cwt=True, seed=1).parameters())  # 3 classes
    assert 16 * 512 + head == 11_779  # dept_coop; dept_kgcoop: 4 x 512 + head (official + unused 263,168)


def test_published_base_to_new_numbers_compare_with_base2new_runs_only(tmp_path):
    """results/reference/prompt_methods_2025.csv: PromptSRC's base-to-new averages compare with
    base2new Averages (H of the averaged Base and New), never with few-shot cells."""
    ref = load_reference(ROOT / "results" / "reference" / "prompt_methods_2025.csv")
    assert set(ref["protocol"]) == {"base2new"} and fewshot_reference(ref).empty
    rows = [_record("promptsrc", d, s, "base2new", {"base": b + s, "new": n + s, "hm": None})
            for d, b, n in (("dtd", 80.0, 60.0), ("eurosat", 90.0, 70.0)) for s in (1, 2)]
    rows.append(_record("promptsrc", "dtd", 1, "fewshot", {"top1": 79.97}))  # a few-shot cell never compares
    df = pd.DataFrame(rows)
    fewshot, others = df[df["protocol"] == "fewshot"], df[df["protocol"] == "base2new"]
    assert compare_to_reference(fewshot.assign(status="ok"), ref).empty
    cmp = compare_base2new(others, ref).set_index("metric")
    base, new = (81.5 + 91.5) / 2, (61.5 + 71.5) / 2
    assert cmp.loc["base", "delta"] == pytest.approx(base - 84.26)
    assert cmp.loc["new", "delta"] == pytest.approx(new - 76.10)
    assert cmp.loc["hm", "delta"] == pytest.approx(2 * base * new / (base + new) - 79.97)
    assert "Δ vs published, base-to-new" in base2new_markdown(others, ref)
    assert base2new_markdown(others, None) == ""


DEPT_NAMES = {"prompt_learner.ctx": "context", "film_lp_img.scale": "head.image.scale",
              "film_lp_img.bias": "head.image.bias", "film_lp_text.scale": "head.text.scale",
              "film_lp_text.bias": "head.text.bias", "linear_probe_proj.weight": "head.linear.weight",
              "linear_probe_proj.bias": "head.linear.bias"}


@pytest.mark.parametrize("base", ["coop", "kgcoop"])
def test_dept_loss_and_gradients_equal_the_official_code(base, parity_backbone):
    data = torch.load(FIXTURES / "dept" / f"official_loss_{base}.pt", weights_only=False)
    names = data["classnames"]
    classes = ClassSet("oxford_pets", "oxford_pets", tuple(range(len(names))), tuple(names),
                       ("a photo of a {}, a type of pet.",))  # KgCoOp's CUSTOM_TEMPLATES["OxfordPets"]
    cls = DePTKgCoOp if base == "kgcoop" else DePTCoOp
    method = cls(method_config(cls, {"logit_scale": data["logit_scale"]}), Context(parity_backbone, classes, CPU, 1, 1))
    method._build()
    ours = {"context": method.context, **{f"head.{k}": p for k, p in method.head.named_parameters()}}
    with torch.no_grad():
        for official_name, name in DEPT_NAMES.items():
            ours[name].copy_(data["init"][official_name])
    loss = method.loss(data["images"], data["labels"])
    loss.backward()
    assert math.isclose(loss.item(), data["loss"], rel_tol=1e-5)
    # the official KgCoOp prompt learner's meta_net and bias_vectors require grad but never get one
    assert set(data["grads"]) == set(DEPT_NAMES)
    assert_grads({k: ours[DEPT_NAMES[k]].grad for k in data["grads"]}, data["grads"])


@torch.no_grad()
def test_dept_fuses_on_fitted_classes_and_uses_similarity_on_unseen_ones(tiny, synthetic):
    ctx = Context(tiny, synthetic, CPU, seed=1, shots=1)
    method = DePTCoOp(method_config(DePTCoOp, {}), ctx)
    method._build()
    method._finish()
    x = tiny.model.encode_image(_images(tiny))
    sim = 100 * F.normalize(x, dim=-1) @ F.normalize(method.text, dim=-1).T
    lp = method.head.linear(x)  # cwT starts as the identity
    torch.testing.assert_close(method.logits(x), 0.3 * sim + 0.7 * lp)
    names = tuple(f"unseen {n}" for n in synthetic.classnames[:2])
    ctx.classes = ClassSet("synthetic", "other", (0, 1), names, ("a photo of a {}.",))
    method.retarget()
    torch.testing.assert_close(method.logits(x), 100 * F.normalize(x, dim=-1) @ F.normalize(method.text, dim=-1).T)
    assert method.logits(x).shape == (3, 2)


@torch.no_grad()
def test_dept_on_maple_uses_maples_prompted_features(tiny, synthetic):
    """DePT on MaPLe: the cosine part is MaPLe's (same prompts, same learner); the head reads the prompted,
    unnormalised image feature; fitted classes fuse 0.3 / 0.7."""
    from fsbench.methods.maple import MaPLe

    ctx = Context(tiny, synthetic, CPU, seed=1, shots=1)
    dept = DePTMaPLe(method_config(DePTMaPLe, {}), ctx)
    dept._build()
    maple = MaPLe(method_config(MaPLe, {}), ctx)
    maple._build()
    maple.learner.load_state_dict(dept.learner.state_dict())
    assert dept.config.depth == maple.config.depth == 2
    torch.testing.assert_close(F.normalize(dept.text_raw(), dim=-1), maple.text_features())
    images = _images(tiny)
    image = dept.image_raw(images)
    torch.testing.assert_close(F.normalize(image, dim=-1), maple.image_features(images))
    dept._finish()
    sim = 100 * F.normalize(image, dim=-1) @ F.normalize(dept.text, dim=-1).T
    torch.testing.assert_close(dept.logits(images), 0.3 * sim + 0.7 * dept.head.linear(image))


def dept_maple_init(shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """The official tensors' values as the fixture's harness set them (tests/fixtures/dept/README.md): one
    `Generator().manual_seed(4)`, sorted names, `randn` x 0.1 (cwT, around 1 for scales; head weight), 0.01 (biases),
    512^-0.5 (projection weights), 0.02 (prompts)."""
    def scale(name: str) -> float:
        if "film" in name:
            return 0.1
        if name.endswith("bias"):
            return 0.01
        if "proj" in name and name.endswith("weight"):
            return 512 ** -0.5
        return 0.02 if "prompt" in name or name.endswith("ctx") else 0.1

    g = torch.Generator().manual_seed(4)
    return {n: (1.0 if n.endswith("scale") else 0.0) + scale(n) * torch.randn(shapes[n], generator=g)
            for n in sorted(shapes)}


def dept_maple_tensor(method: DePTMaPLe, name: str) -> torch.Tensor:
    """fsbench's tensor for an official DePT-on-MaPLe parameter name (trainers/elp_maple.py, trainers/maple.py)."""
    learner, head = method.learner, method.head
    parts = name.split(".")
    if parts[0] == "prompt_learner":
        if parts[1] == "ctx":
            return learner.context
        if parts[1] == "proj":
            return getattr(learner.proj, parts[2])
        if parts[1] == "compound_prompts_text":
            return learner.deep_text[int(parts[2])]
        return getattr(learner.deep_proj[int(parts[2])], parts[3])
    module = {"film_lp_img": head.image, "film_lp_text": head.text, "linear_probe_proj": head.linear}[parts[0]]
    return getattr(module, parts[1])


def test_dept_maple_loss_gradients_and_logits_equal_the_official_code(tiny):
    """DePT on MaPLe against the official ExtrasLinearProbeMaPLe model on a random CLIP with ViT-B/16's widths
    (the official MaPLe projection is hard-coded 512 -> 768), depth 9, 2 tokens."""
    data = torch.load(FIXTURES / "dept" / "official_loss_maple.pt", weights_only=False)
    bb = parity_model_backbone(data, tiny)
    method = DePTMaPLe(method_config(DePTMaPLe, {"logit_scale": data["logit_scale"]}),
                       parity_context(bb, "oxford_pets", data["classnames"]))
    method._build()
    assert method.config.depth == 9 and method.trainable_params() == sum(math.prod(s) for s in data["shapes"].values())
    init = dept_maple_init(data["shapes"])
    assert all(math.isclose(float(v.double().sum()), data["init_check"][n], rel_tol=1e-9) for n, v in init.items())
    with torch.no_grad():
        for name, value in init.items():
            dept_maple_tensor(method, name).copy_(value)
    loss = method.loss(data["images"], data["labels"])
    loss.backward()
    assert math.isclose(loss.item(), data["loss"], rel_tol=1e-5)
    want = {n: (g["u"] @ g["vh"]).float() if isinstance(g, dict) else g for n, g in data["grads"].items()}
    deep_text = method.learner.deep_text.grad
    got = {n: deep_text[int(n.split(".")[-1])] if "compound_prompts_text" in n else dept_maple_tensor(method, n).grad
           for n in want}
    assert set(want) == set(data["shapes"])
    assert_grads(got, want)
    method._finish()
    torch.testing.assert_close(method.logits(data["images"]), data["logits"], rtol=1e-5, atol=1e-5)
