"""Every family on its seeded tiny config: SigLIP, SigLIP 2, EVA-CLIP, ConvNeXt-CLIP, MetaCLIP 2.

Unfused attention computes open_clip's function; LoRA at init is the base model exactly and exports
back to open_clip's layout; text truncation equals the full pass where it is enabled and is off
(and would be wrong) where it is not; the method contract holds on a SigLIP-family and an
EVA-family config; `fsbench run --method lora --pretrained none` runs offline with a stand-in
tokenizer; `fsbench ls backbones` says what applies.
"""

from __future__ import annotations

import copy
import functools
import json

import open_clip
import pytest
import timm
import torch
from test_method_contract import N_TEST, SEED, SHOTS, fitted, scores

from fsbench.adapters import load_adapter, save_adapter
from fsbench.attention import _split_tree, attention_layers, fused_state_dict
from fsbench.backbones import Backbone, BackboneSpec, attention_counts, build_backbone, describe, resolve_factory
from fsbench.cli import main
from fsbench.errors import ConfigError, WeightsError
from fsbench.images import image_loader
from fsbench.method import METHODS
from fsbench.methods.lora import LoRAConfig
from fsbench.prompts import build_prompts, encode_prompts
from fsbench.spec import RunSpec
from fsbench.text import bucket_tokens, encode_token_embeddings, encode_tokens, text_tower, truncate_tokens
from fsbench.tokenizers import StandInTokenizer, load_tokenizer
from fsbench.tuners import inject_lora, merged_state_dict

FAMILIES = ["test-tiny-siglip", "test-tiny-siglip2", "test-tiny-eva", "test-tiny-convnext", "test-tiny-metaclip2"]
TRUNCATABLE = {"test-tiny-eva", "test-tiny-convnext", "test-tiny-metaclip2"}  # causal, argmax / eos pooling
PROMPTS = ["a photo of a cat.", "dog", "a centered satellite photo of a river with a very long name."]
@functools.cache
def backbone(name: str) -> Backbone:
    return build_backbone(BackboneSpec(name))


def plain(name: str) -> torch.nn.Module:
    """open_clip's own model with the same seeded weights (fused attention, full text pass)."""
    return resolve_factory(name)(BackboneSpec(name)).eval()


def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", FAMILIES)
def test_unfused_model_computes_open_clips_function(name):
    bb, ref = backbone(name), plain(name)
    tokens = bb.tokenize(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(bb.model.encode_image(images()), ref.encode_image(images()), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(encode_tokens(bb.model, tokens), ref.encode_text(tokens, normalize=True),
                                   atol=1e-5, rtol=1e-5)
    vision, text = attention_counts(bb.model)
    assert (vision, text) == ((0, 2) if name == "test-tiny-convnext" else (2, 2))
    assert not any(p.requires_grad for p in bb.model.parameters())


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_at_init_is_the_base_model_exactly_and_exports_to_open_clip(name):
    bb, x = backbone(name), images()
    tokens = bb.tokenize(PROMPTS)
    model = copy.deepcopy(bb.model)
    layers = inject_lora(model, LoRAConfig(matrices=["q", "k", "v", "o"]))
    assert len(layers) == 4 * (2 if name == "test-tiny-convnext" else 4)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), bb.model.encode_image(x))
        assert torch.equal(encode_tokens(model, tokens), encode_tokens(bb.model, tokens))
        for layer in layers:
            torch.nn.init.normal_(layer.lora_B, std=0.1)
        adapted = model.encode_image(x), encode_tokens(model, tokens)
        exported = plain(name)
        exported.load_state_dict(merged_state_dict(model), strict=True)
        torch.testing.assert_close(exported.encode_image(x), adapted[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(exported.encode_text(tokens, normalize=True), adapted[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_text_truncation_is_exact_where_enabled_and_off_elsewhere(name):
    bb = backbone(name)
    tokens = bb.tokenize(PROMPTS)
    pooling, tower = bb.text_pooling, text_tower(bb.model)
    assert pooling.truncatable == (name in TRUNCATABLE)
    cut = truncate_tokens(tokens, bb.model)
    with torch.no_grad():
        full = encode_token_embeddings(bb.model, tower.token_embedding(tokens), pooling.index(tokens))
        short = encode_token_embeddings(bb.model, tower.token_embedding(cut), pooling.index(cut))
        if name in TRUNCATABLE:
            assert cut.shape[1] < tokens.shape[1] // 2
            torch.testing.assert_close(short, full, atol=1e-6, rtol=1e-6)
            assert len(bucket_tokens(tokens, 2, bb.model).groups) == 2
        else:  # bidirectional, pooled at the last position: every padding token counts
            assert torch.equal(cut, tokens) and len(bucket_tokens(tokens, 4, bb.model).groups) == 1
            length = bb.prompt_layout.words(tokens[-1]) + 1  # what an EOT cut would keep
            naive = encode_token_embeddings(bb.model, tower.token_embedding(tokens[:, :length]), None)
            assert not torch.allclose(naive, full, atol=1e-3), "truncation would change SigLIP's features"


@pytest.fixture(scope="module")
def contract_runner(tmp_path_factory, make_runner):
    return make_runner(tmp_path_factory.mktemp("families"))


def contract_inputs(runner, bb: Backbone, synthetic) -> dict[str, torch.Tensor]:
    feats = runner.executor.features.split(bb, synthetic, "test").x[:N_TEST]
    loader = image_loader(synthetic.test[:N_TEST], synthetic.image_root, bb.preprocess, N_TEST,
                          torch.device("cpu"), workers=0)
    return {"features": feats, "images": next(iter(loader))[0]}


@pytest.mark.parametrize("family", ["test-tiny-siglip2", "test-tiny-eva"])
@pytest.mark.parametrize("name", METHODS.names())
def test_method_contract_on_siglip2_and_eva(family, name, contract_runner, synthetic, tmp_path):
    """tests/test_method_contract.py's contract on another family, or a one-line reason it cannot apply."""
    bb = backbone(family)
    inputs = contract_inputs(contract_runner, bb, synthetic)
    frozen = {k: v.clone() for k, v in bb.model.state_dict().items()}
    try:
        first = fitted(name, contract_runner, bb, synthetic)
    except ConfigError as exc:  # the method cannot apply to this backbone: it says why, on one line
        assert len(str(exc).splitlines()) == 1 and family in str(exc)
        return
    logits = scores(first, inputs)
    assert logits.shape == (N_TEST, len(synthetic.classnames)) and torch.isfinite(logits).all()
    assert torch.equal(scores(fitted(name, contract_runner, bb, synthetic), inputs), logits)
    assert all(torch.equal(bb.model.state_dict()[k], v) for k, v in frozen.items())
    reloaded = load_adapter(save_adapter(first, tmp_path, RunSpec(name, family, synthetic.name, SHOTS, SEED)),
                            first.ctx)
    assert torch.equal(scores(reloaded, inputs), logits)


@pytest.mark.parametrize("family", ["test-tiny-siglip2", "test-tiny-eva"])
def test_coop_prompt_with_init_words_reproduces_the_written_prompt(family, synthetic):
    """CoOp's [SOS?] ctx [CLASS]. split matches each tokenizer: no SOS for SigLIP, full length when bidirectional."""
    bb = backbone(family)
    prompts = build_prompts(bb, synthetic.classnames, 16, "a photo of a", torch.device("cpu"), torch.Generator())
    assert prompts.init.shape[0] == 4 and prompts.prefix.shape[1] == bb.prompt_layout.bos
    with torch.no_grad():
        learned = encode_prompts(bb.model, prompts, prompts.init)
        written = encode_tokens(bb.model, bb.tokenize([f"a photo of a {c}." for c in synthetic.classnames]))
    torch.testing.assert_close(learned, written)


@pytest.mark.parametrize("family, trainable", [
    # blocks x q,k,v x rank 2 x (in + out): vision width 64; text width 32 (SigLIP 2), 64 (EVA), 16 (MetaCLIP 2)
    ("test-tiny-siglip2", 2 * 3 * 2 * (64 + 64) + 2 * 3 * 2 * (32 + 32)),
    ("test-tiny-eva", 2 * 3 * 2 * (64 + 64) + 2 * 3 * 2 * (64 + 64)),
    ("test-tiny-metaclip2", 2 * 3 * 2 * (64 + 64) + 2 * 3 * 2 * (16 + 16)),
])
def test_cli_runs_lora_offline_with_random_weights(family, trainable, tmp_path, monkeypatch, capsys,
                                                    synthetic_root):
    monkeypatch.chdir(tmp_path)
    rc = main(["run", "--method", "lora", "--backbone", family, "--pretrained", "none", "--dataset", "synthetic",
               "--shots", "1", "--seed", "1", "--workers", "0", "--device", "cpu",
               "--data-root", str(synthetic_root), "--set", "lora.iters_per_shot=2"])
    err = capsys.readouterr().err
    assert rc == 0
    result = json.loads(next(tmp_path.glob(f"results/runs/{family}/synthetic/lora/**/*.json")).read_text())
    assert result["status"] == "ok" and result["trainable_params"] == trainable
    stand_in = [line for line in err.splitlines() if "stand-in" in line]
    assert len(stand_in) == (0 if family == "test-tiny-eva" else 1)


def test_stand_in_tokenizer_only_for_random_weights(monkeypatch, capsys):
    def offline(name):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files. Check your connection")
    monkeypatch.setattr(open_clip, "get_tokenizer", offline)
    with pytest.raises(WeightsError, match="tokenizer of ViT-B-16-SigLIP2") as err:
        load_tokenizer("ViT-B-16-SigLIP2", stand_in_ok=False)
    assert len(str(err.value).splitlines()) == 1
    tok, stand_in = load_tokenizer("ViT-B-16-SigLIP2", stand_in_ok=True)
    assert stand_in and isinstance(tok, StandInTokenizer)
    assert (tok.vocab_size, tok.context_length, tok.pad_id, tok.eos_id) == (256000, 64, 0, 1)
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    ids = tok(["A photo of a cat.", ""])
    assert ids.shape == (2, 64) and int(ids.max()) < 256000 and torch.equal(ids, tok(["a photo of a cat.", ""]))
    assert ids[0, :7].tolist()[-1] == 1 and (ids[0, 7:] == 0).all() and ids[1, 0] == 1


def test_fused_timm_attention_of_other_families_splits_exactly():
    """EVA02-E / EVA01 (EvaAttention with a fused qkv and q/v biases) and PE (AttentionRope)."""
    for arch, extra in (("eva02_base_patch16_clip_224", {"qkv_fused": True}), ("vit_pe_core_base_patch16_224", {})):
        torch.manual_seed(0)
        model = timm.create_model(arch, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=8,
                                  ref_feat_shape=(4, 4), **extra).eval()
        for m in model.modules():
            if getattr(m, "q_bias", None) is not None:
                torch.nn.init.normal_(m.q_bias)
                torch.nn.init.normal_(m.v_bias)
        split = copy.deepcopy(model)
        assert _split_tree(split, causal=False) == 2 and len(attention_layers(split)) == 2
        with torch.no_grad():
            torch.testing.assert_close(split(images()), model(images()), atol=1e-5, rtol=1e-5)
            fresh = copy.deepcopy(model)
            fresh.load_state_dict(fused_state_dict(split), strict=True)
            assert torch.equal(fresh(images()), model(images()))


def test_convnext_lora_adapts_the_text_tower_only():
    bb = backbone("test-tiny-convnext")
    model = copy.deepcopy(bb.model)
    inject_lora(model, LoRAConfig())
    names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert names and not any(n.startswith("visual.") for n in names)
    with pytest.raises(ConfigError, match="vision tower of this backbone has no attention"):
        inject_lora(copy.deepcopy(bb.model), LoRAConfig(encoder="vision"))
    assert "text tower only" in METHODS.get("lora").supports(describe("ConvNeXt-B"))
    assert METHODS.get("lora").supports(describe("SigLIP2-B/16")) is None


def test_aliases_scales_and_prompt_layouts():
    assert BackboneSpec("SigLIP2-B/16").resolved() == ("ViT-B-16-SigLIP2", "webli")
    assert BackboneSpec("eva02-l/14", pretrained="none").resolved() == ("EVA02-L-14", "none")
    assert describe("MetaCLIP2-H/14").text.pool == "eos" and describe("SigLIP-B/16").logit_bias
    siglip, eva = backbone("test-tiny-siglip"), backbone("test-tiny-eva")
    assert siglip.logit_bias == -10.0 and eva.logit_bias is None and eva.logit_scale == pytest.approx(1 / 0.07)
    assert (siglip.prompt_layout.bos, eva.prompt_layout.bos, backbone("test-tiny-metaclip2").prompt_layout.bos) == (
        0, 1, 1)


def test_ls_backbones_marks_what_applies(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one table row per line
    assert main(["ls", "backbones"]) == 0
    out = capsys.readouterr().out
    for name in ("SigLIP2-B/16", "EVA02-L/14", "MetaCLIP-B/16", "DFN-H/14", "test-tiny-siglip2", "text tower only"):
        assert name in out
