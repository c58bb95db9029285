"""Config flow: defaults < bench.toml < --set, type-checked, unknown keys rejected."""

from __future__ import annotations

import pytest

from fsbench.config import BenchConfig, apply_sets, load_bench, method_config, parse_value
from fsbench.errors import ConfigError
from fsbench.methods.lora import CLIPLoRA


def test_defaults_are_the_paper_study():
    cfg = BenchConfig()
    assert cfg.study.shots == [1, 2, 4, 8, 16] and cfg.study.seeds == [1, 2, 3]
    assert cfg.study.backbones == ["ViT-B/16", "ViT-B/32", "ViT-L/14"] and len(cfg.study.datasets) == 11


def test_toml_then_set_override(tmp_path):
    path = tmp_path / "bench.toml"
    path.write_text('[study]\nshots = [1, 4]\n\n[methods.lora]\nrank = 8\n')
    cfg = apply_sets(load_bench(path), ["lora.rank=4", "lora.matrices=['q','v']", "runtime.device=cpu"])
    assert cfg.study.shots == [1, 4] and cfg.runtime.device == "cpu"
    lora = method_config(CLIPLoRA, cfg.methods["lora"])
    assert lora.rank == 4 and lora.matrices == ["q", "v"] and lora.alpha == 1.0


def test_unknown_key_names_file_line_and_valid_keys(tmp_path):
    path = tmp_path / "bench.toml"
    path.write_text('[study]\nshots = [1]\nshot = [2]\n')
    with pytest.raises(ConfigError) as err:
        load_bench(path)
    msg = str(err.value)
    assert f"{path}:3" in msg and "'shot'" in msg and "did you mean 'shots'" in msg and "seeds" in msg


@pytest.mark.parametrize("text", ['[study]\nshots = "many"\n', '[runtime]\ndevice = "tpu"\n',
                                  '[nonsense]\na = 1\n', 'study = 3\n', '[study\n'])
def test_bad_toml_is_a_config_error(tmp_path, text):
    path = tmp_path / "bench.toml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_bench(path)


def test_unknown_method_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="valid keys: rank, alpha"):
        method_config(CLIPLoRA, {"rnak": 4})


def test_set_values_parse_as_toml_or_fall_back_to_strings():
    assert parse_value("4") == 4 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("vision") == "vision" and parse_value('["q", "v"]') == ["q", "v"]
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        apply_sets(BenchConfig(), ["rank=4"])


_RECIPE = ["lr", "weight_decay", "betas", "batch_size", "iters_per_shot", "eta_min"]
_END_TO_END = ["logit_scale", "crop_scale", "augment", "text_buckets"]
_DASSL = ["lr", "momentum", "weight_decay", "batch_size", "epochs", "warmup_epochs", "warmup_lr"]
_SCHEDULE = ["batch_size", "epochs", "warmup_epochs", "warmup_lr"]
# Stored before the configs were composed from the toolkit's pieces (fsbench.training.DasslSchedule, DasslRecipe,
# LoRARecipe, EndToEnd; fsbench.tuners.LoRALayerConfig, TargetsConfig): keys in stored order and the default
# config's method identity (which joins every result's identity).
STORED_CONFIGS = {
    "lora": (["rank", "alpha", "dropout", *_RECIPE, "matrices", "encoder", "position", *_END_TO_END],
             "9e473dd8dd413298"),
    "peft": (["config", "encoder", "merge", *_RECIPE, *_END_TO_END], "e76e1d3b73da4ef7"),
    # the presets' identities changed once, on purpose: they hashed abc.py as plug-in source (module "abc")
    "lora_dora": (["config", "encoder", "merge", *_RECIPE, *_END_TO_END], "58fbfb77e9ef40cc"),
    "lora_vera": (["config", "encoder", "merge", *_RECIPE, *_END_TO_END], "00c3218f53ff71a4"),
    "clip_svd": ([*_RECIPE, "matrices", "encoder", "position", *_END_TO_END], "3fc96e6005543aa2"),
    "clap": (["constraint", "multipliers", "adaptive", "augment_views", "crop_scale", "view_seed", "lr", "momentum",
              *_SCHEDULE, "logit_scale"], "40110a1df647ff88"),
    "taskres": (["scale", "lr", "weight_decay", "betas", *_SCHEDULE, "logit_scale"], "47e2a68d144acbb3"),
    "coop": ([*_DASSL, "n_ctx", "init", "logit_scale", "crop_scale"], "ecb3ff3631051cbf"),
    "clip_adapter": ([*_DASSL, "reduction", "ratio", "ratios", "logit_scale"], "2518e20743988992"),
    "maple": ([*_DASSL, "n_ctx", "init", "depth", "coupling", "logit_scale", "crop_scale"], "bb11113ffa06bd99"),
}


@pytest.mark.parametrize("name", sorted(STORED_CONFIGS))
def test_composed_configs_store_what_they_stored_before(name):
    """Composing configs from pieces must not re-run stored results: same keys, same order, same identity."""
    import dataclasses

    from fsbench.identity import method_identity
    from fsbench.method import METHODS

    cls = METHODS.get(name)
    stored = dataclasses.asdict(method_config(cls, {}))
    keys, identity = STORED_CONFIGS[name]
    assert list(stored) == keys and method_identity(cls, stored) == identity

