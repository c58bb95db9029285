"""The LoRA family and the full-weight alternatives (issue 22): the shared tuner toolkit, CLIP-SVD against
its official code (tests/fixtures/clip_svd), CLIPFit's parameter selection, the LoRA presets, 2SFS's
schedule, and a sweep of the new methods on the tiny backbone."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fsbench.attention import split_attention
from fsbench.backbones import TEST_TINY
from fsbench.method import METHODS
from fsbench.methods.clip_svd import CLIPSVDConfig
from fsbench.methods.clipfit import SHORT_SCHEDULE, STRONG_KD, CLIPFit, CLIPFitConfig, clipfit_parameters
from fsbench.methods.two_stage import TwoStage, TwoStageConfig, block_norms
from fsbench.report.ablation import LORA_VARIANTS, lora_variants_table
from fsbench.report.write import write_report
from fsbench.results import load_results
from fsbench.text import bucket_tokens, encode_buckets
from fsbench.tuners import SVDLinear, block_targets, inject_adapter, merged_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
# the tiny CLIP of tests/fixtures/clip_svd/README.md: OpenAI's layout, one head per tower (OpenAI's CLIP class
# sets vision heads = width // 64)
TINY_OPENAI = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=64, head_width=64, patch_size=8),
                   text_cfg=dict(context_length=16, vocab_size=64, width=64, heads=1, layers=2))


def fixture_weights(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The random weights both sides load (the same function is in the fixture's README)."""
    g = torch.Generator().manual_seed(0)
    w = {}
    for k in sorted(shapes):
        t = torch.randn(shapes[k], generator=g)
        w[k] = 1 + 0.1 * t if (".ln_" in k or k.startswith("ln_")) and k.endswith("weight") else 0.1 * t
    return w


def tiny_openai_clip() -> torch.nn.Module:
    model = open_clip.CLIP(**TINY_OPENAI, quick_gelu=True)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in ("logit_scale", "attn_mask")}
    assert not model.load_state_dict(fixture_weights(shapes), strict=False).unexpected_keys
    split_attention(model)
    return model.requires_grad_(False)  # frozen, as fsbench's backbones are


def official_name(name: str) -> str:
    """fsbench's module name -> the official one (`PlainMultiHeadAttention` calls the output `proj`)."""
    return name.replace("attn.out_proj.", "attn.proj.")


# ---- CLIP-SVD against the official code ---------------------------------------------------------


@pytest.fixture(scope="module")
def official_svd():
    meta = json.loads((FIXTURES / "clip_svd" / "official.json").read_text())
    return meta, load_file(str(FIXTURES / "clip_svd" / "official.safetensors"))


def svd_model() -> tuple[torch.nn.Module, list[SVDLinear]]:
    model = tiny_openai_clip()
    cfg = CLIPSVDConfig()
    layers = inject_adapter(block_targets(model, cfg.encoder, cfg.position, cfg.matrices, "clip_svd"), SVDLinear)
    return model, layers


def test_clip_svd_fixture_weights_are_the_ones_the_official_code_saw(official_svd):
    meta, _ = official_svd
    shapes = {k: tuple(v.shape) for k, v in open_clip.CLIP(**TINY_OPENAI).state_dict().items()
              if k not in ("logit_scale", "attn_mask")}
    w = fixture_weights(shapes)
    flat = torch.cat([w[k].flatten() for k in sorted(w)]).double()
    assert flat.sum().item() == pytest.approx(meta["weights_sum"], rel=1e-9)
    assert flat.abs().sum().item() == pytest.approx(meta["weights_abs_sum"], rel=1e-9)


def test_clip_svd_trains_the_official_singular_values(official_svd):
    meta, _ = official_svd
    model, layers = svd_model()
    names = sorted(official_name(n) for n, p in model.named_parameters() if p.requires_grad)
    assert names == meta["trainable"]
    assert sum(layer.vector_S.numel() for layer in layers) == meta["trainable_count"]


@pytest.fixture
def one_thread():
    """The fixtures were made on one CPU thread: float32 sums in another order (more threads) move single
    gradient entries by up to ~1e-3 relative, which is not what the parity check is about."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_clip_svd_loss_and_gradients_match_the_official_code(official_svd, one_thread):
    _, ref = official_svd
    model, _ = svd_model()
    model.train()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), ref[f"S.{official_name(name)}"], rtol=1e-5, atol=1e-5)
    text = F.normalize(model.encode_text(ref["tokens"]), dim=-1)
    image = F.normalize(model.encode_image(ref["images"]), dim=-1)
    logits = 100 * image @ text.t()
    loss = F.cross_entropy(logits, ref["labels"])
    loss.backward()
    torch.testing.assert_close(logits.detach(), ref["logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss.detach(), ref["loss"], rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[f"grad.{official_name(name)}"], rtol=1e-4, atol=1e-5)


def test_svd_layer_is_the_base_layer_at_init_and_merges(tiny):
    model = copy.deepcopy(tiny.model)
    images = torch.randn(2, 3, tiny.image_size, tiny.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model.encode_image(images)
        layers = inject_adapter(block_targets(model, "both", "all", ["q", "k", "v", "o", "mlp"], "clip_svd"),
                                SVDLinear)
        torch.testing.assert_close(model.encode_image(images), base, rtol=1e-4, atol=1e-5)
        for layer in layers:
            layer.vector_S.mul_(1.1)
        factored = model.encode_image(images)
        for layer in layers:
            layer.merge()
        torch.testing.assert_close(model.encode_image(images), factored, rtol=1e-4, atol=1e-5)
        exported = open_clip.CLIP(**TEST_TINY, quick_gelu=True)
        exported.load_state_dict(merged_state_dict(model), strict=True)
        torch.testing.assert_close(exported.encode_image(images), factored, rtol=1e-4, atol=1e-5)
        for layer in layers:
            layer.unmerge()
        torch.testing.assert_close(model.encode_image(images), factored, rtol=1e-4, atol=1e-5)
    assert len(layers) == 6 * 2 * 2  # q, k, v, o, c_fc, c_proj x 2 blocks x 2 towers


def test_clip_svd_defaults_are_the_official_few_shot_recipe():
    cfg = METHODS.get("clip_svd").Config()
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.iters_per_shot, cfg.eta_min) == (5e-4, 1e-2, 32, 200, 1e-6)
    assert cfg.matrices == ["q", "k", "v", "o", "mlp"] and cfg.encoder == "both" and cfg.position == "all"


@pytest.mark.slow
def test_clip_svd_vit_b16_trainable_count_is_the_official_one(official_svd):
    from fsbench.backbones import BackboneSpec, build_backbone

    meta, _ = official_svd
    model = build_backbone(BackboneSpec("ViT-B/16", pretrained="none")).model
    layers = inject_adapter(block_targets(model, "both", "all", ["q", "k", "v", "o", "mlp"], "clip_svd"), SVDLinear)
    assert sum(layer.vector_S.numel() for layer in layers) == meta["vit_b16_trainable_count"] == 92_160


# ---- CLIPFit against the official code ----------------------------------------------------------


def test_clipfit_loss_and_gradients_match_the_official_code(one_thread):
    meta = json.loads((FIXTURES / "clipfit" / "official.json").read_text())
    ref = load_file(str(FIXTURES / "clipfit" / "official.safetensors"))
    frozen = tiny_openai_clip()
    model = copy.deepcopy(frozen)
    params = clipfit_parameters(model)
    assert sorted(params) == meta["trainable"]
    gp = torch.Generator().manual_seed(2)
    with torch.no_grad():  # the fixture's move off the initial point (the KD gradient is zero there)
        for name in sorted(params):
            params[name].add_(0.05 * torch.randn(params[name].shape, generator=gp))
    for p in params.values():
        p.requires_grad_(True)
    method = CLIPFit.__new__(CLIPFit)  # the method's own loss, without a run context
    method.config, method.model = CLIPFitConfig(lambda_=meta["lambda"]), model
    method._tokens = bucket_tokens(ref["tokens"], 4, model)
    with torch.no_grad():
        method._frozen = F.normalize(encode_buckets(frozen, method._tokens, normalize=False), dim=-1)
    loss = method.loss(ref["images"], ref["labels"])
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref["loss"], rtol=1e-5, atol=1e-5)
    for name, p in params.items():
        torch.testing.assert_close(p.grad, ref[f"grad.{name}"], rtol=1e-4, atol=1e-5)
    assert all(ref[f"grad.{name}"].abs().sum() > 0 for name in params)


# ---- 2SFS against the official code -------------------------------------------------------------


def test_two_stage_selection_and_both_stages_gradients_match_the_official_code(one_thread):
    meta = json.loads((FIXTURES / "two_stage" / "official.json").read_text())
    ref = load_file(str(FIXTURES / "two_stage" / "official.safetensors"))
    model = tiny_openai_clip()
    norms = block_norms(model, "both")
    assert sorted(norms) == meta["trained"] and len(meta["listed"]) > len(meta["trained"])  # ln_pre/post/final
    for p in norms.values():
        p.requires_grad_(True)
    method = TwoStage.__new__(TwoStage)  # the method's own losses, without a run context
    method.config, method.model, method._frozen_text = TwoStageConfig(), model, None
    method.ctx = SimpleNamespace(device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", enabled=False))
    method._tokens = bucket_tokens(ref["tokens"], 4, model)
    method.train_loss(ref["images"], ref["labels"]).backward()  # stage 1 (fs/twostage.py train_epoch)
    for name, p in norms.items():
        torch.testing.assert_close(p.grad, ref[f"grad1.{name}"], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        method.classifier = torch.nn.Parameter(method._text().float())  # stage 2's initialisation
    torch.testing.assert_close(method.classifier.detach(), ref["classifier_init"], rtol=1e-5, atol=1e-5)
    method.classifier_loss(ref["images"], ref["labels"]).backward()  # train_epoch_second_stage
    torch.testing.assert_close(method.classifier.grad, ref["grad2.classifier"], rtol=1e-4, atol=1e-5)


# ---- CLIPFit, 2SFS, the presets ---------------------------------------------------------------------


def test_clipfit_trains_text_ffn_output_biases_and_vision_layernorms(tiny):
    params = clipfit_parameters(copy.deepcopy(tiny.model))
    text = sorted(n for n in params if not n.startswith("visual."))
    assert text == [f"transformer.resblocks.{i}.mlp.c_proj.bias" for i in range(2)]
    vision = {n.rsplit(".", 1)[0] for n in params if n.startswith("visual.")}
    assert vision == {"visual.ln_pre", "visual.ln_post", *(f"visual.transformer.resblocks.{i}.ln_{j}"
                                                          for i in range(2) for j in (1, 2))}


def test_clipfit_lambda_follows_the_readme_per_dataset():
    cfg = METHODS.get("clipfit").Config()
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size, cfg.warmup_lr) == (0.002, 0.9, 5e-4, 32, 1e-5)
    assert cfg.lambda_ == -1.0 and STRONG_KD == ("dtd", "sun397") and SHORT_SCHEDULE == ("imagenet", "food101")


def test_two_stage_trains_the_block_layernorms_only_as_the_official_code_does(tiny):
    """ln_pre, ln_post and ln_final are switched off again by the official selection (model_utils.py:12-37)."""
    norms = block_norms(copy.deepcopy(tiny.model), "both")
    assert {n.rsplit(".", 1)[0] for n in norms} == {f"{t}transformer.resblocks.{i}.ln_{j}" for t in ("visual.", "")
                                                    for i in range(2) for j in (1, 2)}


@pytest.mark.parametrize("shots, stage1", [(1, 180), (4, 720), (16, 2880)])
def test_two_stage_splits_m_times_k_steps_at_alpha(shots, stage1):
    cls = METHODS.get("two_stage")
    method = cls(cls.Config(), SimpleNamespace(shots=shots))
    assert method.total_steps() == stage1 == int(300 * shots * 0.6)


def test_presets_change_only_the_variant():
    base = json.loads(METHODS.get("peft").Config().config)
    for name, extra in (("lora_dora", {"use_dora": True}), ("lora_pissa", {"init_lora_weights": "pissa"})):
        assert json.loads(METHODS.get(name).Config().config) == {**base, **extra}
    vera = json.loads(METHODS.get("lora_vera").Config().config)
    assert vera["r"] == base["r"] and vera["target_modules"] == base["target_modules"]


# ---- the new methods through the CLI sweep ---------------------------------------------------------

NEW = ("clip_svd", "clipfit", "lora_dora", "lora_pissa", "lora_vera", "two_stage")
SMALL = ["clip_svd.iters_per_shot=3", "clipfit.epochs=2", "lora_dora.iters_per_shot=3",
         "lora_pissa.iters_per_shot=3", "lora_vera.iters_per_shot=3", "two_stage.iters_per_shot=5",
         "lora.iters_per_shot=3"]


def test_sweep_runs_every_new_method_and_reports_the_lora_variants(tmp_path, synthetic_root, monkeypatch):
    from fsbench.cli import main
    from fsbench.results import iter_results

    monkeypatch.chdir(tmp_path)  # no ./bench.toml: built-in defaults
    sets = [a for s in [*SMALL, f"runtime.cache_dir={tmp_path / 'cache'}"] for a in ("--set", s)]
    code = main(["sweep", "--methods", ",".join(("lora", *NEW)), "--backbones", "test-tiny", "--datasets", "synthetic",
                 "--shots", "1,2", "--seeds", "1", "--data-root", str(synthetic_root),
                 "--results", str(tmp_path / "results"), "--device", "cpu", *sets])
    results = iter_results(tmp_path / "results")
    assert code == 0
    assert sorted((r.method, r.shots) for r in results) == sorted((m, k) for m in ("lora", *NEW) for k in (1, 2))
    assert all(r.status == "ok" and 0 <= r.top1 <= 100 and r.trainable_params > 0 for r in results)
    # the report's "LoRA variants" table: every method, the dataset-mean per shot count, the parameters
    df = load_results(tmp_path / "results")
    table = lora_variants_table(df, "test-tiny")
    assert list(table["method"]) == [m for m in LORA_VARIANTS if m in ("lora", *NEW)]
    one_shot = df[df["shots"] == 1].set_index("method")["top1"]
    assert table.set_index("method")["1-shot (1 datasets)"].to_dict() == pytest.approx(one_shot.to_dict())
    write_report(df, tmp_path / "report", formats="md")
    assert "## LoRA variants" in (tmp_path / "report" / "report.md").read_text()
