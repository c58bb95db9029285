"""Method configs check their numeric ranges when they are resolved, before any model or data is
loaded, and a method section naming an unregistered method is a one-line error (issues 11 and 14)."""

from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing

import pytest

from fsbench.cli import main
from fsbench.config import BenchConfig, apply_sets, load_bench, method_config
from fsbench.errors import ConfigError
from fsbench.method import METHODS


@pytest.mark.parametrize(("setting", "message"), [
    ("lora.lr=nan", "lora.lr must be a finite number > 0, got nan"),
    ("lora.lr=-1", "lora.lr must be a finite number > 0, got -1.0"),
    ("lora.betas=[2,3]", "lora.betas must be two numbers in [0, 1), e.g. [0.9, 0.999], got [2.0, 3.0]"),
    ("lora.crop_scale=[1.0,0.08]", "lora.crop_scale must be [low, high] with 0 < low <= high <= 1"),
    ("lora.crop_scale=[0.5]", "lora.crop_scale must be [low, high] with 0 < low <= high <= 1"),
    ("lora.batch_size=0", "lora.batch_size must be an integer >= 1, got 0"),
    ("lora.dropout=1.0", "lora.dropout must be a number in [0, 1), got 1.0"),
    ("clip_adapter.lr=-1", "clip_adapter.lr must be a finite number > 0, got -1.0"),
    ("clip_adapter.ratio=1.5", "clip_adapter.ratio must be a number in [0, 1], got 1.5"),
    ("coop.momentum=1.5", "coop.momentum must be a number in [0, 1), got 1.5"),
    ("cocoop.epochs=0", "cocoop.epochs must be an integer >= 1, got 0"),
    ("taskres.betas=[0.9,1.0]", "taskres.betas must be two numbers in [0, 1)"),
    ("taskres.lr=inf", "taskres.lr must be a finite number > 0, got inf"),
    ("tip_adapter.search_scale=[7,-3]", "tip_adapter.search_scale must be a list of 2 numbers > 0"),
    ("tip_adapter_f.lr=0", "tip_adapter_f.lr must be a finite number > 0, got 0.0"),
    ("tip_adapter_f.crop_scale=[0,1]", "tip_adapter_f.crop_scale must be [low, high]"),
    ("linear_probe.c_grid=[]", "linear_probe.c_grid must be a non-empty list of numbers > 0, got []"),
    ("linear_probe.max_iter=0", "linear_probe.max_iter must be an integer >= 1, got 0"),
    ("lp_plus_plus.momentum=-0.1", "lp_plus_plus.momentum must be a number in [0, 1), got -0.1"),
    ("lroa.rank=4", "unknown method 'lroa' in --set; did you mean 'lora'?"),
    ("tip_adaptor.search=false", "unknown method 'tip_adaptor' in --set; did you mean 'tip_adapter'?"),
])
def test_bad_method_settings_fail_at_config_resolution(setting, message):
    with pytest.raises(ConfigError) as err:
        apply_sets(BenchConfig(), [setting])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_unknown_method_table_in_bench_toml_names_the_line(tmp_path):
    path = tmp_path / "bench.toml"
    path.write_text('[study]\nshots = [1]\n\n[methods.tip_adaptor]\nsearch = false\n')
    with pytest.raises(ConfigError, match=rf"{path}:4: unknown method 'tip_adaptor' in \[methods.tip_adaptor\]; "
                                          r"did you mean 'tip_adapter'\?"):
        load_bench(path)


def test_bad_value_in_a_method_table_names_the_file(tmp_path):
    path = tmp_path / "bench.toml"
    path.write_text("[methods.lora]\nrank = 2\nlr = -1.0\n")
    with pytest.raises(ConfigError, match=rf"^{path}:1: lora.lr must be a finite number > 0, got -1.0$"):
        load_bench(path)


def test_cli_refuses_before_loading_anything(tmp_path, monkeypatch, capsys):
    import fsbench.execute as execute
    import fsbench.resolve as resolve

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(execute, "build_backbone", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setattr(resolve, "load_dataset", lambda *a, **k: pytest.fail("data loaded"))
    for setting in ("lora.lr=nan", "lora.betas=[2,3]", "clip_adapter.lr=-1", "lroa.rank=4"):
        rc = main(["run", "-m", "lora", "-b", "test-tiny", "-d", "synthetic", "--device", "cpu",
                   "--data-root", str(tmp_path), "--set", setting])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error:") and "\n" not in err, err


def _methods() -> list[str]:
    names = METHODS.names()
    return [n for n in names if n != "peft" or importlib.util.find_spec("peft") is not None]


def _is_float(tp: typing.Any) -> bool:
    """`float` or `float | None`."""
    return tp is float or (typing.get_origin(tp) in (typing.Union, types.UnionType) and float in typing.get_args(tp))


@pytest.mark.parametrize("name", _methods())
def test_every_method_config_rejects_non_finite_numbers(name):
    """Every float field of every registered method's config refuses nan and inf; the defaults are valid."""
    cls = METHODS.get(name)
    method_config(cls, {})
    hints = typing.get_type_hints(cls.Config)
    checked = 0
    for f in dataclasses.fields(cls.Config):
        for bad in (float("nan"), float("inf")) if _is_float(hints[f.name]) else ():
            with pytest.raises(ConfigError, match=rf"{name}\.{f.name} must be"):
                method_config(cls, {f.name: bad})
            checked += 1
    assert checked == 2 * sum(_is_float(hints[f.name]) for f in dataclasses.fields(cls.Config))


@pytest.mark.parametrize("name", _methods())
def test_every_batch_size_and_learning_rate_is_checked(name):
    cls = METHODS.get(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    for key, bad in (("batch_size", 0), ("lr", -1.0), ("betas", [2.0, 3.0]), ("crop_scale", [1.0, 0.08]),
                     ("crop_scale", [0.5]), ("momentum", 1.0), ("epochs", -1), ("weight_decay", -1.0)):
        if key in fields:
            with pytest.raises(ConfigError, match=rf"{name}\.{key} must be"):
                method_config(cls, {key: bad})
