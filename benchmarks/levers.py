"""Each speed lever of the CLIP-LoRA step on its own, on the real ViT-B/16 architecture.

    PYTHONPATH=. python benchmarks/levers.py --device cpu

Text side (forward + backward through LoRA on q/k/v, `--prompts` ImageNet prompts, an even
subset of the 1,000): reference modules on 77 tokens -> fsbench modules (factored LoRA, fused
SDPA) on 77 tokens -> truncated to the longest prompt -> bucketed by length. Vision side
(forward + backward, `--batch` images): reference vs fsbench modules. Data: tokenising 1,000
prompts; one batch of augmentation three ways; decoding JPEGs on one thread vs a pool. Eval:
LoRA merged vs unmerged. CPU only, for information: bf16 autocast (fsbench runs fp32 on CPU).
Every lever is timed `--repeats` times; the table shows each time and the median. The last
line is the text side's reference / bucketed ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import device_arg, imagenet_classes, machine, median, speedup_line, timed, write_images
from reference import reference_batches, reference_model

from fsbench.augment import augment, to_uint8_tensor, train_transform
from fsbench.backbones import BackboneSpec, build_backbone
from fsbench.methods.lora import LoRAConfig
from fsbench.text import bucket_tokens, encode_buckets, encode_token_embeddings
from fsbench.training import all_steps, image_batches
from fsbench.tuners import inject_lora


def full_length(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """fsbench's text forward without truncation: all 77 positions (causal SDPA)."""
    return encode_token_embeddings(model, model.token_embedding(tokens), tokens.argmax(dim=-1))


def text_levers(spec: BackboneSpec, args: argparse.Namespace, device: torch.device) -> dict[str, Callable]:
    backbone = build_backbone(spec, device)
    model = backbone.model
    inject_lora(model, LoRAConfig())
    ref = reference_model(spec, LoRAConfig(), device)
    tokens = backbone.tokenize([f"a photo of a {c}." for c in imagenet_classes(args.prompts)]).to(device)
    lengths = (tokens.argmax(-1) + 1).tolist()
    b1, b4 = bucket_tokens(tokens, 1), bucket_tokens(tokens, 4)
    tag = f"{len(lengths)} prompts"
    return {
        f"text {tag}: reference modules, 77 tokens ({77 * len(lengths)} positions)":
            lambda: ref.encode_text(tokens).sum().backward(),
        f"text {tag}: fsbench modules, 77 tokens": lambda: full_length(model, tokens).sum().backward(),
        f"text {tag}: truncated ({b1.tokens} positions)": lambda: encode_buckets(model, b1).sum().backward(),
        f"text {tag}: 4 length buckets ({b4.tokens} positions)": lambda: encode_buckets(model, b4).sum().backward(),
    }


def vision_levers(spec: BackboneSpec, args: argparse.Namespace, device: torch.device) -> dict[str, Callable]:
    backbone = build_backbone(spec, device)
    model = backbone.model
    layers = inject_lora(model, LoRAConfig())
    ref = reference_model(spec, LoRAConfig(), device)
    x = torch.randn(args.batch, 3, backbone.image_size, backbone.image_size, device=device)

    def merged(flag: bool) -> Callable:
        def run() -> None:
            for layer in layers:
                layer.merge() if flag else layer.unmerge()
            with torch.no_grad():
                model.encode_image(x)
        return run

    def bf16() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.encode_image(x).float().sum().backward()

    levers = {
        f"vision {args.batch} images: reference modules": lambda: ref.encode_image(x).sum().backward(),
        f"vision {args.batch} images: fsbench modules": lambda: model.encode_image(x).sum().backward(),
        f"vision {args.batch} images: fsbench modules, CPU bf16 autocast (not used)": bf16,
        f"eval {args.batch} images: LoRA unmerged": merged(False),
        f"eval {args.batch} images: LoRA merged": merged(True),
    }
    if device.type != "cpu":
        levers = {k: v for k, v in levers.items() if "CPU bf16" not in k}
    return levers


def data_levers(args: argparse.Namespace, device: torch.device, folder: Path) -> dict[str, Callable]:
    items = write_images(folder, 32, 1000)
    backbone = build_backbone(BackboneSpec("test-tiny"))  # for the tokenizer only
    prompts = [f"a photo of a {c}." for c in imagenet_classes(1000)]
    tf = train_transform(224, backbone.mean, backbone.std, [0.08, 1.0])
    disk = reference_batches(items, folder, tf, 32, device, 0, torch.Generator().manual_seed(0))
    memory = image_batches(items, folder, tf, 32, torch.Generator().manual_seed(0), all_steps(len(items), 32))
    next(memory)  # decodes once
    stored = to_uint8_tensor(items, folder, device)
    g = torch.Generator().manual_seed(0)
    return {
        "tokenise 1,000 prompts (reference: every step; fsbench: once)": lambda: backbone.tokenize(prompts),
        "augment 32 images: PIL, read + decode every step (reference)": lambda: next(disk),
        "augment 32 images: PIL on images decoded once": lambda: next(memory),
        f"augment 32 images: fsbench.augment on {device.type}": lambda: augment(stored, 224, backbone.mean,
                                                                                backbone.std, g),
        "decode 32 JPEGs: one thread": lambda: to_uint8_tensor(items, folder, device, threads=1),
        "decode 32 JPEGs: thread pool": lambda: to_uint8_tensor(items, folder, device),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--backbone", default="ViT-B/16")
    p.add_argument("--prompts", type=int, help="text-side prompts (default 1000 on GPU, 100 on CPU)")
    p.add_argument("--batch", type=int, help="vision images (default 32 on GPU, 8 on CPU)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    device = device_arg(args.device)
    args.prompts = args.prompts or (1000 if device.type == "cuda" else 100)
    args.batch = args.batch or (32 if device.type == "cuda" else 8)
    spec = BackboneSpec(args.backbone, pretrained="none")
    print(f"machine: {machine(device)}; {time.strftime('%Y-%m-%d')}; {args.backbone}, random weights")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for group in (data_levers(args, device, Path(tmp)), text_levers(spec, args, device),
                      vision_levers(spec, args, device)):
            for name, fn in group.items():
                if device.type == "cuda":
                    fn()  # warm-up (kernel selection, allocator)
                results[name] = [timed(fn, device) for _ in range(args.repeats)]
                print(f"{name:<78} {' '.join(f'{t:9.4f}' for t in results[name])}  median "
                      f"{median(results[name]):9.4f} s", flush=True)
    text = [k for k in results if k.startswith("text")]
    print(speedup_line(median(results[text[0]]) / median(results[text[-1]])))


if __name__ == "__main__":
    main()
