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
