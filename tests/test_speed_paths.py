"""The fast paths compute what the plain paths compute.

SplitAttention vs nn.MultiheadAttention, the official-style reference attention, the batched
device augmentation vs torchvision's PIL pipeline, and one CLIP-LoRA loss through fsbench's
path vs the reference-style path of benchmarks/reference.py.
"""

from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from fsbench.attention import SplitAttention
from fsbench.augment import RATIO, augment, crop_params, device_batches
from fsbench.backbones import Backbone, BackboneSpec, build_backbone, resolve_factory
from fsbench.data.base import DatasetSplits
from fsbench.method import Context
from fsbench.methods.lora import CLIPLoRA, LoRAConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference import (  # noqa: E402
    ReferenceAttention,
    copy_lora,
    reference_lora_layers,
    reference_loss,
    reference_model,
)

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
CLASSES = ["tench", "goldfish", "great white shark", "a class with a much longer name than the others"]
BACKBONES = ["test-tiny", pytest.param("ViT-B/16", marks=pytest.mark.slow)]
CPU = torch.device("cpu")


@functools.cache
def models(name: str) -> tuple[Backbone, nn.Module]:
    """fsbench's backbone (unfused attention) and open_clip's own model with the same weights."""
    spec = BackboneSpec(name, pretrained="none")
    return build_backbone(spec), resolve_factory(spec.name)(spec).eval()


def _attention_inputs(plain: nn.Module, tower: str, length: int) -> tuple[nn.MultiheadAttention, torch.Tensor]:
    mha = (plain.visual.transformer if tower == "vision" else plain.transformer).resblocks[0].attn
    x = torch.randn(3, length, mha.embed_dim, generator=torch.Generator().manual_seed(0))
    return mha, x


@pytest.mark.parametrize(("tower", "length"), [("vision", 17), ("text", 77), ("text", 9)])
def test_split_and_reference_attention_equal_multihead_attention(tower: str, length: int) -> None:
    _, plain = models("test-tiny")
    mha, x = _attention_inputs(plain, tower, length)
    mask = plain.attn_mask[:length, :length] if tower == "text" else None
    with torch.no_grad():
        expected = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        split = SplitAttention.from_mha(mha, causal=tower == "text")(x, attn_mask=mask)[0]
        ref = ReferenceAttention(mha, LoRAConfig()).eval()(x, x, x, attn_mask=mask)[0]  # B = 0: no update
    torch.testing.assert_close(split, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", BACKBONES)
def test_split_model_equals_open_clip_model(name: str) -> None:
    backbone, plain = models(name)
    images = torch.randn(2, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(backbone.model.encode_image(images), plain.encode_image(images),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("height", "width"), [(300, 500), (500, 300), (224, 224), (40, 1000)])
@pytest.mark.parametrize("scale", [(0.08, 1.0), (2.0, 3.0)])  # (2, 3): every try fails -> centre fallback
def test_crop_params_are_torchvision_draws(height: int, width: int, scale: tuple[float, float]) -> None:
    for seed in range(20):
        torch.manual_seed(seed)
        expected = transforms.RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale), list(RATIO))
        got = crop_params(height, width, scale, RATIO, torch.Generator().manual_seed(seed))
        assert got == tuple(expected)


def _images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        h, w = (int(v) for v in rng.integers(60, 160, size=2))
        small = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        out.append(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    return out


def _tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


def test_device_augmentation_matches_the_pil_pipeline() -> None:
    """Same boxes and flips as torchvision's PIL transforms; pixels differ by rounding only."""
    images = _images(6)
    pil = transforms.Compose([
        transforms.RandomResizedCrop(32, interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    torch.manual_seed(7)
    expected = torch.stack([pil(img) for img in images])
    got = augment([_tensor(img) for img in images], 32, MEAN, STD, torch.Generator().manual_seed(7))
    levels = (got - expected).abs() * torch.tensor(STD).view(1, 3, 1, 1) * 255
    assert levels.max() <= 3.0 and levels.mean() < 0.1


def test_device_augmentation_shapes_ranges_and_determinism() -> None:
    images = [_tensor(img) for img in _images(5)]
    a = augment(images, 24, MEAN, STD, torch.Generator().manual_seed(1))
    b = augment(images, 24, MEAN, STD, torch.Generator().manual_seed(1))
    c = augment(images, 24, MEAN, STD, torch.Generator().manual_seed(2))
    assert a.shape == (5, 3, 24, 24) and a.dtype == torch.float32
    lo = (-torch.tensor(MEAN) / torch.tensor(STD)).view(1, 3, 1, 1)
    hi = ((1 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1)
    assert (a >= lo - 1e-6).all() and (a <= hi + 1e-6).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_device_batches_keep_labels_with_their_images() -> None:
    """Flat images whose grey level encodes the label: every batch must decode to its labels."""
    images = [torch.full((3, 50 + 7 * i, 80 - 5 * i), 20 * i, dtype=torch.uint8) for i in range(7)]
    labels = torch.arange(7)
    batches = device_batches(images, labels, 3, 16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.08, 1.0),
                             torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    seen = []
    for _ in range(3):  # one epoch: batches of 3, 3, 1
        x, y = next(batches)
        torch.testing.assert_close(x.mean(dim=(1, 2, 3)) * 255 / 20, y.float(), atol=1e-3, rtol=0)
        seen += y.tolist()
    assert sorted(seen) == list(range(7))


def test_images_decode_once_to_uint8_and_bad_files_are_all_named(tmp_path: Path) -> None:
    from fsbench.augment import to_uint8_tensor
    from fsbench.data.base import Item
    from fsbench.errors import DataError

    images = _images(3)
    for i, img in enumerate(images):
        img.save(tmp_path / f"{i}.png")
    items = [Item(f"{i}.png", i) for i in range(3)]
    decoded = to_uint8_tensor(items, tmp_path, CPU, threads=2)
    for img, t in zip(images, decoded, strict=True):
        assert t.dtype == torch.uint8 and torch.equal(t, _tensor(img))
    for name in ("bad1.png", "bad2.jpg"):
        (tmp_path / name).write_bytes(b"not an image")
    with pytest.raises(DataError, match="2 unreadable images under .*bad1.png, bad2.jpg"):
        to_uint8_tensor([*items, Item("bad1.png", 0), Item("bad2.jpg", 1)], tmp_path, CPU)


def _fast_and_reference(name: str) -> tuple[CLIPLoRA, nn.Module, Backbone]:
    """fsbench's CLIPLoRA (prepared, random B) and the reference model with the same LoRA weights."""
    backbone, _ = models(name)
    data = DatasetSplits("x", Path("."), CLASSES, ["a photo of a {}."], [], [], [])
    cfg = LoRAConfig(dropout=0.0)
    method = CLIPLoRA(cfg, Context(backbone, data, CPU, seed=0, shots=1))
    method.prepare()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in method.layers:
            layer.lora_B.copy_(0.05 * torch.randn(layer.lora_B.shape, generator=g))
    ref = reference_model(BackboneSpec(name, pretrained="none"), cfg, CPU)
    copy_lora(method.layers, reference_lora_layers(ref))
    return method, ref, backbone


@pytest.mark.parametrize("name", BACKBONES)
def test_lora_step_loss_and_gradients_equal_the_reference_step(name: str) -> None:
    method, ref, backbone = _fast_and_reference(name)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, backbone.image_size, backbone.image_size, generator=g)
    labels = torch.tensor([1, 3])
    method.model.train()
    fast = method.train_loss(images, labels)
    fast.backward()
    tokens = backbone.tokenize([f"a photo of a {c}." for c in CLASSES])
    slow = reference_loss(ref, images, tokens, labels)
    torch.testing.assert_close(fast.detach(), slow, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(method.layers, reference_lora_layers(ref), strict=True):
        torch.testing.assert_close(mine.lora_A.grad, theirs.w_lora_A.grad, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(mine.lora_B.grad, theirs.w_lora_B.grad, rtol=1e-3, atol=1e-5)


def test_merged_evaluation_equals_the_reference_eval_mode() -> None:
    method, ref, backbone = _fast_and_reference("test-tiny")
    images = torch.randn(3, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(2))
    method.model.eval()
    for layer in method.layers:
        layer.merge()
    ref.eval()  # the official layers add B A to W in eval mode
    with torch.no_grad():
        torch.testing.assert_close(method.model.encode_image(images), ref.encode_image(images),
                                   rtol=1e-5, atol=1e-5)


def test_chunked_reference_text_with_one_chunk_is_the_reference_step() -> None:
    method, ref, backbone = _fast_and_reference("test-tiny")
    images = torch.randn(2, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(3))
    tokens = backbone.tokenize([f"a photo of a {c}." for c in CLASSES])
    labels = torch.tensor([0, 2])
    whole = reference_loss(ref, images, tokens, labels)
    grads = [layer.w_lora_A.grad.clone() for layer in reference_lora_layers(ref)]
    ref.zero_grad()
    chunked = reference_loss(ref, images, tokens, labels, text_chunk=len(CLASSES))
    torch.testing.assert_close(chunked, whole)
    for layer, grad in zip(reference_lora_layers(ref), grads, strict=True):
        torch.testing.assert_close(layer.w_lora_A.grad, grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("augment_path", ["device", "pil"])
def test_lora_trains_with_either_augmentation(tiny: Backbone, synthetic: DatasetSplits, augment_path: str) -> None:
    from fsbench.method import FewShotData

    items = synthetic.train[::8]
    train = FewShotData(items, torch.tensor([it.label for it in items]), synthetic.image_root)
    ctx = Context(tiny, synthetic, CPU, seed=0, shots=1)
    method = CLIPLoRA(LoRAConfig(iters_per_shot=2, batch_size=4, augment=augment_path), ctx)
    method.fit(train, train)
    x = torch.randn(2, 3, tiny.image_size, tiny.image_size)
    assert method.logits(x).shape == (2, len(synthetic.classnames))


@pytest.mark.gpu
def test_device_augmentation_on_cuda_matches_cpu() -> None:
    images = [_tensor(img) for img in _images(4)]
    cpu = augment(images, 32, MEAN, STD, torch.Generator().manual_seed(3))
    gpu = augment([t.cuda() for t in images], 32, MEAN, STD, torch.Generator().manual_seed(3))
    levels = (gpu.cpu() - cpu).abs() * torch.tensor(STD).view(1, 3, 1, 1) * 255
    assert levels.max() <= 2.0


@pytest.mark.gpu
def test_lora_loss_under_cuda_autocast_is_close_to_fp32() -> None:
    from fsbench.device import amp_dtype

    backbone = build_backbone(BackboneSpec("test-tiny"), "cuda")
    data = DatasetSplits("x", Path("."), CLASSES, ["a photo of a {}."], [], [], [])
    dev = torch.device("cuda")
    losses = []
    for dtype in (None, amp_dtype(dev)):
        method = CLIPLoRA(LoRAConfig(dropout=0.0), Context(backbone, data, dev, 0, 1, amp_dtype=dtype))
        torch.manual_seed(0)
        method.prepare()
        images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)).cuda()
        losses.append(method.train_loss(images, torch.tensor([0, 1])).item())
    assert losses[1] == pytest.approx(losses[0], rel=2e-2, abs=2e-2)


def test_fast_path_leaves_the_shared_backbone_untouched(tiny: Backbone) -> None:
    before = copy.deepcopy(tiny.model.state_dict())
    data = DatasetSplits("x", Path("."), CLASSES, ["a photo of a {}."], [], [], [])
    method = CLIPLoRA(LoRAConfig(), Context(tiny, data, CPU, 0, 1))
    method.prepare()
    method.train_loss(torch.randn(2, 3, 32, 32), torch.tensor([0, 1])).backward()
    for key, value in tiny.model.state_dict().items():
        assert torch.equal(value, before[key])
