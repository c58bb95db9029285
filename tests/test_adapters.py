"""Saving, reloading and exporting what methods learned (`fsbench.adapters`, `--save-adapter`).

The save/reload round trip of every registered method is part of tests/test_method_contract.py.
"""

from __future__ import annotations

import json

import open_clip
import pytest
import torch

from fsbench.adapters import META, TENSORS, export_merged, load_adapter, save_adapter
from fsbench.attention import split_attention
from fsbench.backbones import TEST_TINY
from fsbench.cli import main
from fsbench.config import method_config
from fsbench.errors import ConfigError
from fsbench.method import METHODS, Context
from fsbench.results import read_result
from fsbench.spec import RunSpec

CPU = torch.device("cpu")


def test_run_saves_adapters_under_backbone_dataset_method_run(tmp_path, monkeypatch, synthetic_root):
    monkeypatch.chdir(tmp_path)
    args = ["run", "-m", "tip_adapter,zero_shot", "-b", "test-tiny", "-d", "synthetic", "-k", "1", "-s", "1,2",
            "--workers", "0", "--device", "cpu", "--data-root", str(synthetic_root), "--save-adapter", "adapters"]
    assert main(args) == 0
    run = tmp_path / "adapters/test-tiny/synthetic/tip_adapter/shots1_seed2"
    assert sorted(p.name for p in run.iterdir()) == [META, TENSORS]
    meta = json.loads((run / META).read_text())
    assert (meta["method"], meta["backbone"], meta["dataset"], meta["shots"], meta["seed"]) == (
        "tip_adapter", "test-tiny", "synthetic", 1, 2)
    assert meta["config"]["augment_views"] == 10 and len(meta["classnames"]) == 10
    assert set(meta["tensors"]) == {"keys", "values", "text", "alpha", "beta"}
    assert (tmp_path / "adapters/test-tiny/synthetic/zero_shot/shots1_seed1" / TENSORS).is_file()


def test_a_finished_run_is_redone_only_when_its_adapter_is_missing(tmp_path, monkeypatch, synthetic_root):
    monkeypatch.chdir(tmp_path)
    base = ["run", "-m", "zero_shot", "-b", "test-tiny", "-d", "synthetic", "-k", "1", "-s", "1", "--workers", "0",
            "--device", "cpu", "--data-root", str(synthetic_root)]
    result = tmp_path / "results/runs/test-tiny/synthetic/zero_shot/shots1_seed1.json"
    assert main(base) == 0
    first = read_result(result).created_at
    assert main([*base, "--save-adapter", "a"]) == 0  # no adapter yet: run again to save it
    assert (tmp_path / "a/test-tiny/synthetic/zero_shot/shots1_seed1" / META).is_file()
    second = read_result(result).created_at
    assert main([*base, "--save-adapter", "a"]) == 0  # adapter saved: the run is reused
    assert read_result(result).created_at == second and second >= first


@pytest.fixture
def saved(tmp_path, tiny, synthetic):
    ctx = Context(tiny, synthetic, CPU, 1, 1)
    method = METHODS.get("zero_shot")(method_config(METHODS.get("zero_shot"), {}), ctx)
    method.fit(None, None)
    return save_adapter(method, tmp_path / "zs", RunSpec("zero_shot", "test-tiny", "synthetic", 1, 1)), ctx


def test_load_refuses_other_classes_other_weights_and_missing_files(saved, tmp_path):
    directory, ctx = saved
    meta = json.loads((directory / META).read_text())
    (directory / META).write_text(json.dumps({**meta, "classnames": meta["classnames"][::-1]}))
    with pytest.raises(ConfigError, match="classes"):
        load_adapter(directory, ctx)
    (directory / META).write_text(json.dumps({**meta, "backbone_key": "ViT-B-16|openai"}))
    with pytest.raises(ConfigError, match="ViT-B-16"):
        load_adapter(directory, ctx)
    with pytest.raises(ConfigError, match="no saved adapter"):
        load_adapter(tmp_path / "nowhere", ctx)


def _adapted(name: str, tiny, synthetic, **overrides):
    """A lora-family method with random, non-zero updates, merged as after `fit`."""
    cls = METHODS.get(name)
    method = cls(method_config(cls, overrides), Context(tiny, synthetic, CPU, 1, 1))
    method.prepare()
    g = torch.Generator().manual_seed(0)
    for param in method.params:
        param.data = torch.randn(param.shape, generator=g) * 0.1
    method.finish()
    return method


@pytest.mark.parametrize(("name", "overrides"), [("lora", {}), ("lora", {"matrices": ["q", "v", "o"]}),
                                                 ("peft", {}), ("peft", {"encoder": "text"})])
def test_exported_merged_weights_load_into_plain_open_clip(name, overrides, tiny, synthetic, tmp_path):
    method = _adapted(name, tiny, synthetic, **overrides)
    path = export_merged(method, tmp_path / "merged.safetensors")
    plain = open_clip.CLIP(**TEST_TINY, quick_gelu=True)
    open_clip.load_checkpoint(plain, str(path))  # open_clip's own loader, strict
    split_attention(plain)
    plain.eval()
    images = torch.randn(2, 3, tiny.image_size, tiny.image_size, generator=torch.Generator().manual_seed(1))
    tokens = tiny.tokenize(["a photo of a cat.", "a red square"])
    vision_adapted = overrides.get("encoder", "both") != "text"
    with torch.no_grad():
        for encode, x, adapted in (("encode_image", images, vision_adapted), ("encode_text", tokens, True)):
            ours = getattr(method.model, encode)(x)
            torch.testing.assert_close(getattr(plain, encode)(x), ours, rtol=1e-5, atol=1e-5)
            assert adapted != torch.allclose(ours, getattr(tiny.model, encode)(x), atol=1e-4)


def test_export_needs_a_method_that_changes_weights(saved, tmp_path):
    directory, ctx = saved
    with pytest.raises(ConfigError, match="nothing to merge"):
        export_merged(load_adapter(directory, ctx), tmp_path / "x.safetensors")
