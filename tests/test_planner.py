"""The planner of issue 19: protocols from the entry-point group `fsbench.protocols`, validation sized by
the protocol, the episode's validation images in a result's identity, and planning without torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EP_MODULE = '''
from fsbench.protocols import FewShot, register_protocol


@register_protocol("ep_fewshot")
class EntryPointFewShot(FewShot):
    """The few-shot protocol under another name, installed through an entry point."""

    summary = "few-shot, from an installed package's entry point"
    title = "Entry-point few-shot"

    def folder(self, source):
        return self.name
'''


def _fsbench(args: list[str], cwd: Path, pythonpath: list[Path] = ()) -> subprocess.CompletedProcess:
    """`python -m fsbench ARGS` in a fresh interpreter (registries and entry points as a user's shell has them)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "250",
           "PYTHONPATH": os.pathsep.join(map(str, [*pythonpath, ROOT]))}
    return subprocess.run([sys.executable, "-m", "fsbench", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _installed_package(root: Path) -> Path:
    """A package installed as pip would: its module and a `.dist-info` declaring the entry point."""
    site = root / "site"
    (site / "ep_protocols.py").parent.mkdir(parents=True)
    (site / "ep_protocols.py").write_text(EP_MODULE)
    info = site / "ep_protocols-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-protocols\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fsbench.protocols]\nep_fewshot = ep_protocols\n")
    return site


def test_protocols_load_from_the_entry_point_group(tmp_path, synthetic_root):
    site = _installed_package(tmp_path)
    listed = _fsbench(["ls", "protocols"], tmp_path, [site])
    assert listed.returncode == 0, listed.stderr
    assert "ep_fewshot" in listed.stdout and "Entry-point few-shot" in listed.stdout
    plan = _fsbench(["sweep", "--methods", "zero_shot", "--protocols", "ep_fewshot", "--backbones", "test-tiny",
                     "--datasets", "synthetic", "--shots", "1", "--seeds", "1", "--data-root", str(synthetic_root),
                     "--results", str(tmp_path / "results"), "--dry-run"], tmp_path, [site])
    assert plan.returncode == 0, plan.stderr
    assert "1 runs to do" in plan.stdout
    absent = _fsbench(["ls", "protocols"], tmp_path)  # not installed: not listed
    assert absent.returncode == 0 and "ep_fewshot" not in absent.stdout


# ---- validation is sized by the protocol; a method only asks -------------------------------------------------
def _resolver(tmp_path: Path, data_root: Path, *sets: str):
    from fsbench.config import BenchConfig, apply_sets
    from fsbench.resolve import Resolver

    paths = [f'runtime.results="{tmp_path / "results"}"', f'runtime.cache_dir="{tmp_path / "cache"}"',
             f'runtime.data_root="{data_root}"', 'runtime.device="cpu"']
    return Resolver(apply_sets(BenchConfig(), [*paths, *sets]), writable=False)


def _val_per_class(prep, data) -> set[int]:
    from collections import Counter

    items = data.split(prep.episode.val_split)
    return set(Counter(items[i].label for i in prep.episode.val).values())


def test_the_protocol_sizes_validation_and_the_method_only_asks(tmp_path, synthetic_root, synthetic, monkeypatch):
    from fsbench.protocols import PROTOCOLS, FewShot
    from fsbench.spec import RunSpec

    class OneValidationShot(FewShot):
        def val_shots(self, shots, request="default"):
            return 1  # whatever the method asks

    monkeypatch.setattr(OneValidationShot, "name", "one_val")
    monkeypatch.setitem(PROTOCOLS._items, "one_val", OneValidationShot)
    planner = _resolver(tmp_path, synthetic_root)  # clip_lora's draw: K validation shots exist here
    sizes = {(m, p): _val_per_class(planner.prepare(RunSpec(m, "test-tiny", "synthetic", 8, 1, protocol=p)),
                                    synthetic)
             for m in ("linear_probe", "lp_plus_plus") for p in ("fewshot", "one_val")}
    assert sizes == {("linear_probe", "fewshot"): {4}, ("lp_plus_plus", "fewshot"): {8},  # min(K, 4); K asked
                     ("linear_probe", "one_val"): {1}, ("lp_plus_plus", "one_val"): {1}}


def test_a_method_written_with_val_shots_still_asks_for_k():
    from fsbench.method import Method

    class Old(Method):
        val_shots = "shots"  # the attribute's name before the protocol sized validation

        def fit(self, train, val):
            pass

        def logits(self, x):
            return x

    assert Old.val_request == "shots" and Method.val_request == "default"


# ---- the images an episode validates on are part of its results' identity -----------------------------------
PLUGINS = Path(__file__).parent / "plugins"
KNOWN = {"protocol", "method", "weights", "classes", "train_list", "val_list", "fewshot", "flags", "files", "sampler"}


def test_built_in_episodes_keep_their_identity_components(tmp_path, synthetic_root):
    """The draw's images of the fitted classes add no component: results stored before it keep their identity."""
    from fsbench.spec import RunSpec

    planner = _resolver(tmp_path, synthetic_root)
    for protocol in ("fewshot", "base2new", "test_time", "transductive"):
        for method in ("linear_probe", "lp_plus_plus"):
            prep = planner.prepare(RunSpec(method, "test-tiny", "synthetic", 8, 1, protocol=protocol))
            (ident,) = prep.identities.values()
            seeded = {"order"} if protocol == "test_time" else set()  # its test order is drawn per seed
            assert {k for k in ident if not k.startswith("eval:")} == KNOWN | seeded, (protocol, method)


def test_validation_images_taken_elsewhere_are_in_the_identity(tmp_path, synthetic_root):
    import shutil

    from fsbench import identity
    from fsbench.registry import load_plugin
    from fsbench.spec import RunSpec

    for name in ("protocol_wholeval.py", "protocol_carved.py"):
        load_plugin(PLUGINS / name)
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    specs = {p: RunSpec("linear_probe", "test-tiny", "synthetic", 2, 1, protocol=p)
             for p in ("fewshot", "wholeval", "carved")}
    before = {p: _resolver(tmp_path, root).prepare(s) for p, s in specs.items()}
    whole, carved = before["wholeval"].identities["synthetic"], before["carved"].identities["synthetic"]
    assert "val_images" in whole and "train_images" not in whole  # fits on the draw, validates on the whole split
    assert {"val_images", "train_images"} <= set(carved)  # both come out of the drawn shots

    data = _resolver(tmp_path, root).dataset("synthetic")
    undrawn = next(i for i in range(len(data.val)) if i not in before["fewshot"].split.val)
    image = data.image_root / data.val[undrawn].path
    image.write_bytes(image.read_bytes() + b"\0")  # another content: a validation image replaced in place
    after = {p: _resolver(tmp_path, root).prepare(s) for p, s in specs.items()}
    assert after["fewshot"].identity_hash("synthetic") == before["fewshot"].identity_hash("synthetic")
    assert after["carved"].identity_hash("synthetic") == before["carved"].identity_hash("synthetic")
    changed = identity.describe_change(whole, after["wholeval"].identities["synthetic"])
    assert changed == "the episode's validation images"


# ---- planning imports no torch ----------------------------------------------------------------------------------
PROBE = ("import sys; from fsbench.cli import main; rc = main(sys.argv[1:]); "
         "print('torch loaded:', 'torch' in sys.modules, file=sys.stderr); sys.exit(rc)")


def test_a_dry_run_plans_without_torch_and_agrees_with_the_runs(tmp_path, synthetic_root):
    """`run --dry-run`, `sweep --dry-run` and `ablate --dry-run` import no torch, yet see the results a real sweep
    stored as done (the identities the static catalog gives are the live methods')."""
    from fsbench.cli import main

    study = tmp_path / "bench.toml"
    study.write_text(f'[study]\nmethods = ["zero_shot", "linear_probe"]\nbackbones = ["test-tiny"]\n'
                     'datasets = ["synthetic"]\nshots = [1]\nseeds = [1]\n\n'
                     f'[runtime]\ndata_root = "{synthetic_root}"\n'
                     f'results = "{tmp_path / "results"}"\ncache_dir = "{tmp_path / "cache"}"\ndevice = "cpu"\n'
                     'workers = 0\n\n[methods.linear_probe]\nmax_iter = 20\nweight_decays = [0.01]\n')
    assert main(["sweep", str(study), "--methods", "zero_shot"]) == 0  # one stored result, one run to do
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "250", "PYTHONPATH": str(ROOT)}
    for args in (["sweep", str(study), "--dry-run"], ["run", "--config", str(study), "--dry-run"],
                 ["ablate", str(study), "--dry-run", "--datasets", "synthetic", "--backbones", "test-tiny", "--seeds",
                  "1"]):
        out = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0 and "torch loaded: False" in out.stderr, out.stderr
        assert ("runs to do" if args[0] == "ablate" else "1 runs to do, 1 already done") in out.stdout, out.stdout


def _without_plugins(monkeypatch) -> None:
    """As in a process without `--plugin` files: those other tests loaded send every name to the live registry."""
    for name in [m for m in sys.modules if m.startswith("fsbench_plugin_")]:
        monkeypatch.delitem(sys.modules, name)


def test_the_static_catalog_gives_the_live_identities(tmp_path, synthetic_root, monkeypatch):
    """Every method the catalog can plan gets the same result identity from its stand-in as from its class."""
    from fsbench.catalog import index, method_class, static_methods
    from fsbench.spec import RunSpec

    _without_plugins(monkeypatch)

    overrides = {"lora": {"rank": 4, "matrices": ["q", "v"], "lr": 1e-3}, "linear_probe": {"max_iter": 20}}
    planner = _resolver(tmp_path, synthetic_root)
    planned = [n for n, record in index()["methods"].items() if record["plan"]]
    assert "lora" in planned and "plot_pp" not in planned  # PLOT++'s shared stage needs its code
    for name in planned:
        spec = RunSpec(name, "test-tiny", "synthetic", 8, 1, overrides=overrides.get(name, {}), protocol="base2new")
        live = planner.prepare(spec)
        with static_methods():
            static = planner.prepare(spec)
            assert getattr(method_class(name), "static", False)
        assert static.identities == live.identities and static.split == live.split, name


def test_static_settings_are_checked_for_keys_and_types(monkeypatch):
    import pytest

    from fsbench.catalog import static_methods
    from fsbench.config import BenchConfig, apply_sets
    from fsbench.errors import ConfigError

    _without_plugins(monkeypatch)
    with static_methods():
        assert apply_sets(BenchConfig(), ["lora.rank=4"]).methods["lora"] == {"rank": 4}
        with pytest.raises(ConfigError, match=r"unknown key 'rnak' \(did you mean 'rank'\?\)"):
            apply_sets(BenchConfig(), ["lora.rnak=4"])
        with pytest.raises(ConfigError, match=r"\[methods.lora\].rank: expected int, got .four."):
            apply_sets(BenchConfig(), ['lora.rank="four"'])
        with pytest.raises(ConfigError, match="did you mean 'lora'"):
            apply_sets(BenchConfig(), ["lroa.rank=4"])
