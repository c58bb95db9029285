"""Backbones: the seeded tiny CLIP, local checkpoints, and a clear error when offline."""

from __future__ import annotations

import open_clip
import pytest
import torch

from fsbench.attention import SplitAttention
from fsbench.backbones import TEST_TINY, BackboneSpec, build_backbone
from fsbench.cli import main
from fsbench.errors import UnknownNameError, WeightsError


def test_test_tiny_is_a_real_clip_seeded_and_frozen(tiny):
    again = build_backbone(BackboneSpec("test-tiny"))
    for (n, a), (_, b) in zip(tiny.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    other = build_backbone(BackboneSpec("test-tiny", seed=1))
    assert not torch.equal(other.model.visual.conv1.weight, tiny.model.visual.conv1.weight)
    assert not any(p.requires_grad for p in tiny.model.parameters())
    attn = [m for m in tiny.model.modules() if isinstance(m, SplitAttention)]
    assert len(attn) == 4 and sum(a.causal for a in attn) == 2  # 2 vision + 2 causal text blocks


def test_checkpoint_file_round_trip(tmp_path, tiny):
    other = build_backbone(BackboneSpec("test-tiny", seed=7))
    path = tmp_path / "tiny.pt"
    torch.save(open_clip.CLIP(**TEST_TINY, quick_gelu=True).state_dict(), path)
    loaded = build_backbone(BackboneSpec("test-tiny", checkpoint=str(path), seed=7))
    assert not torch.equal(loaded.model.visual.conv1.weight, other.model.visual.conv1.weight)
    assert loaded.key.startswith("test-tiny|file:")


@pytest.mark.parametrize("spec, match", [
    (BackboneSpec("test-tiny", checkpoint="/no/such/file.pt"), "checkpoint file not found"),
    (BackboneSpec("ViT-B/32"), "could not fetch weights for ViT-B-32"),
])
def test_weight_errors_are_clear(spec, match):
    with pytest.raises(WeightsError, match=match):
        build_backbone(spec)


def test_offline_weights_error_through_cli_is_one_line(tmp_path, monkeypatch, capsys, synthetic_root):
    monkeypatch.chdir(tmp_path)
    rc = main(["run", "--method", "zero_shot", "--backbone", "ViT-B/32", "--dataset", "synthetic",
               "--shots", "1", "--seed", "1", "--data-root", str(synthetic_root), "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 4 and "--checkpoint" in err and len(err.splitlines()) == 1


def test_unknown_backbone_suggests_a_name():
    with pytest.raises(UnknownNameError, match="did you mean"):
        build_backbone(BackboneSpec("test-tiyn"))
