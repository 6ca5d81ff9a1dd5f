"""The example plugin package: loaded through its entry point and through a recipe's ``plugins:`` key.

It registers the router ``cyclic`` and the merge strategy ``median``; the tests use both by name.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import mergekit_video as mv
from mergekit_video import registry as reg_mod
from mergekit_video.registry import MERGES, REGISTRIES, ROUTERS, import_plugins, load_entry_point_plugins

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "plugins" / "mergekit-video-example"
MODULE = "mergekit_video_example"


def _plugin_src() -> Path:
    """The plugin's ``src`` folder, or a copy of its module alone when ``pip install plugins/mergekit-video-example``
    left an egg-info there: on ``sys.path`` that egg-info declares the entry point, and every registry lookup would
    load the plugin before the tests that import it another way (two failed after such an install)."""
    src = PLUGIN_DIR / "src"
    if not any(src.glob("*.egg-info")):
        return src
    import atexit
    import tempfile

    copy = Path(tempfile.mkdtemp(prefix="mkv-plugin-src-"))
    atexit.register(shutil.rmtree, copy, ignore_errors=True)
    shutil.copytree(src / MODULE, copy / MODULE, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


PLUGIN_SRC = _plugin_src()


def _forget_plugin() -> None:
    for name in [m for m in sys.modules if m == MODULE or m.startswith(MODULE + ".")]:
        del sys.modules[name]
    reg_mod._imported_plugin_modules.discard(MODULE)


@pytest.fixture()
def clean_registries(monkeypatch):
    """Registries without the plugin's parts, entry points not yet loaded; restored afterwards."""
    for r in REGISTRIES.values():
        r.names()  # built-ins in
    saved = {k: dict(r._entries) for k, r in REGISTRIES.items()}
    _forget_plugin()
    ROUTERS._entries.pop("cyclic", None)
    MERGES._entries.pop("median", None)
    monkeypatch.setattr(reg_mod, "_entry_points_loaded", False)
    importlib.invalidate_caches()
    yield
    for k, r in REGISTRIES.items():
        if k in saved:
            r._entries.clear()
            r._entries.update(saved[k])
    _forget_plugin()


def _declared_entry_points() -> str:
    """The ``[project.entry-points."mergekit_video.plugins"]`` table of the plugin's pyproject, as entry_points.txt."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    meta = tomllib.loads((PLUGIN_DIR / "pyproject.toml").read_text())
    group = meta["project"]["entry-points"][reg_mod.PLUGIN_ENTRY_POINT_GROUP]
    return f"[{reg_mod.PLUGIN_ENTRY_POINT_GROUP}]\n" + "".join(f"{k} = {v}\n" for k, v in group.items())


def _fake_install(site: Path, entry_points: str, name: str = "mergekit_video_example") -> None:
    """A minimal installed distribution: a .dist-info folder with METADATA and entry_points.txt."""
    info = site / f"{name}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(entry_points)


def _use_plugin_parts() -> None:
    """Use both plugin parts by name through the public API."""
    router = ROUTERS.build("cyclic", num_experts=3)
    x = torch.zeros(2, 4)
    assert [int(router(x).indices) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    median = MERGES.get("median")
    assert torch.equal(median([torch.tensor([1.0]), torch.tensor([9.0]), torch.tensor([2.0])]), torch.tensor([2.0]))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    assert mv.add_experts(model, ["0", "2"], 3, router="cyclic", merge="median") == ["0", "2"]
    model.train()(x)
    assert int(model[0].last_routing.indices) == 0


def test_plugin_pyproject_declares_the_entry_point():
    assert _declared_entry_points() == "[mergekit_video.plugins]\nexample = mergekit_video_example\n"


def test_recipe_plugins_key_path(clean_registries, monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_SRC))
    assert "cyclic" not in ROUTERS and "median" not in MERGES
    import_plugins([MODULE])
    assert "cyclic" in ROUTERS.names() and "median" in MERGES.names()
    _use_plugin_parts()


def test_recipe_loader_imports_listed_plugins(clean_registries, monkeypatch):
    """The recipe layer hands its ``plugins:`` list to import_plugins."""
    from mergekit_video.config import load_recipe_plugins

    monkeypatch.syspath_prepend(str(PLUGIN_SRC))
    recipe = {"output_dir": "runs/x", "plugins": [MODULE], "model": {"router": "cyclic", "merge": "median"}}
    assert load_recipe_plugins(recipe) == [MODULE]
    assert ROUTERS.build(recipe["model"]["router"], num_experts=2).num_experts == 2
    assert MERGES.get(recipe["model"]["merge"]) is sys.modules[MODULE].median


def test_entry_point_path(clean_registries, monkeypatch, tmp_path):
    _fake_install(tmp_path, _declared_entry_points())
    monkeypatch.syspath_prepend(str(PLUGIN_SRC))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "cyclic" not in ROUTERS._entries
    # the first registry use loads every installed plugin, once per process
    assert "cyclic" in ROUTERS.names()
    assert MODULE in sys.modules
    assert ROUTERS.doc("cyclic").startswith("Round-robin routing")
    assert MERGES.doc("median").startswith("Coordinate-wise median")
    assert load_entry_point_plugins() == []  # already done
    _use_plugin_parts()


def test_broken_entry_point_is_logged_and_skipped(clean_registries, monkeypatch, tmp_path, caplog):
    _fake_install(tmp_path, _declared_entry_points())
    _fake_install(tmp_path, "[mergekit_video.plugins]\nbroken = mkv_no_such_plugin_module\n", name="mkv_broken_plugin")
    monkeypatch.syspath_prepend(str(PLUGIN_SRC))
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="mergekit_video.registry"):
        loaded = load_entry_point_plugins()
    assert "example" in loaded and "broken" not in loaded
    said = [r.getMessage() for r in caplog.records if "plugin 'broken'" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(
        "plugin 'broken' (mkv_no_such_plugin_module) failed to load and is skipped: ModuleNotFoundError: "
        "No module named 'mkv_no_such_plugin_module'")
    assert "importlib" not in said[0]  # a module that is not there has no line of its own to name
    assert "cyclic" in ROUTERS  # the good plugin still works


def test_a_plugin_calling_sys_exit_is_named_not_the_end_of_the_command(clean_registries, monkeypatch, tmp_path, caplog):
    """sys.exit() while a plugin imports is its failure like any other: an entry point is logged and skipped, a recipe
    plugin is the ImportError naming it (a bare SystemExit ended every mergevid command with no message)."""
    (tmp_path / "mkv_exits.py").write_text("from mergekit_video.registry import MERGES\n"
                                           "MERGES.register('mkv_exits_merge', lambda tensors, *, base=None: tensors[0])\n"
                                           "import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ImportError, match=rf"^plugin module 'mkv_exits' failed while importing: SystemExit: 3 "
                                              rf"\({tmp_path / 'mkv_exits.py'}:4\)$"):
            reg_mod.import_plugins(["mkv_exits"])
        assert "mkv_exits_merge" not in MERGES
        sys.modules.pop("mkv_exits", None)
        _fake_install(tmp_path, "[mergekit_video.plugins]\nexits = mkv_exits\n", name="mkv_exits_plugin")
        monkeypatch.setattr(reg_mod, "_entry_points_loaded", False)
        importlib.invalidate_caches()
        with caplog.at_level(logging.WARNING, logger="mergekit_video.registry"):
            assert "exits" not in load_entry_point_plugins()
        assert "plugin 'exits' (mkv_exits) failed to load and is skipped: SystemExit: 3" in caplog.text
        assert "mkv_exits_merge" not in MERGES and "mean" in MERGES  # the registries still answer
    finally:
        sys.modules.pop("mkv_exits", None)


HALF_FAILING = """import functools
from mergekit_video.registry import MERGES


@MERGES.register("mkv_half_first")
def first(tensors, *, base=None):
    return tensors[0]
MERGES.register("mkv_half_partial", functools.partial(first))  # its __module__ is functools: the registering module counts
@MERGES.register("mean")  # taken by the built-in: fails here, line 9
def again(tensors, *, base=None):
    return tensors[0]
"""


def test_a_plugin_that_fails_half_way_registers_nothing_and_is_named_with_its_line(clean_registries, monkeypatch, tmp_path, caplog):
    """Any failure of a plugin module (not only ImportError) is the plugins.N error naming the module and its own line;
    what it registered before failing is dropped (an entry-point plugin 'skipped' kept half its parts)."""
    (tmp_path / "mkv_half.py").write_text(HALF_FAILING)
    (tmp_path / "mkv_boom.py").write_text("import mkv_helper_parts\nraise RuntimeError('boom')\n")
    # a module the failing plugin imports registers a part: it imported fine and is not imported again, so its part stays
    (tmp_path / "mkv_helper_parts.py").write_text("from mergekit_video.registry import MERGES\n"
                                                  "MERGES.register('mkv_helper_merge', lambda tensors, *, base=None: tensors[0])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ImportError) as info:
            reg_mod.import_plugins(["mkv_half"])
        assert str(info.value) == (f"plugin module 'mkv_half' failed while importing: RegistryError: merge strategy 'mean' is already "
                                   f"registered (by mergekit_video.merging); pass override=True to replace it ({tmp_path / 'mkv_half.py'}:9)")
        assert "mkv_half_first" not in MERGES and "mkv_half_partial" not in MERGES and MERGES.get("mean").__module__ == "mergekit_video.merging"
        with pytest.raises(ImportError, match=rf"^plugin module 'mkv_boom' failed while importing: RuntimeError: boom \({tmp_path / 'mkv_boom.py'}:2\)$"):
            reg_mod.import_plugins(["mkv_boom"])
        assert "mkv_helper_merge" in MERGES
        assert MERGES.owner("mkv_helper_merge") == "mkv_helper_parts"  # not the failed plugin, which a load could not import
        # the same module as an installed entry point: logged with its line, skipped whole
        sys.modules.pop("mkv_half", None)
        _fake_install(tmp_path, "[mergekit_video.plugins]\nhalf = mkv_half\n", name="mkv_half_plugin")
        monkeypatch.setattr(reg_mod, "_entry_points_loaded", False)  # the lookups above loaded the (other) entry points
        importlib.invalidate_caches()
        with caplog.at_level(logging.WARNING, logger="mergekit_video.registry"):
            assert "half" not in load_entry_point_plugins()
        assert "plugin 'half' (mkv_half) failed to load and is skipped: RegistryError: merge strategy 'mean'" in caplog.text
        assert f"({tmp_path / 'mkv_half.py'}:9)" in caplog.text and "mkv_half_first" not in MERGES
    finally:
        for name in ("mkv_half", "mkv_boom", "mkv_helper_parts"):
            sys.modules.pop(name, None)
        MERGES._entries.pop("mkv_helper_merge", None)


def _can_build_offline() -> bool:
    """setuptools ≥ 61 (PEP 621) that builds wheels itself (≥ 70.1) or has ``wheel`` beside it."""
    try:
        from importlib.metadata import version

        major, minor = (int(p) for p in version("setuptools").split(".")[:2])
    except Exception:  # noqa: BLE001 - not installed or odd version string
        return False
    return (major, minor) >= (70, 1) or ((major, minor) >= (61, 0) and importlib.util.find_spec("wheel") is not None)


@pytest.mark.skipif(not _can_build_offline(), reason="needs setuptools (and wheel, for setuptools < 70.1) to build offline")
def test_pip_install_then_entry_point(clean_registries, monkeypatch, tmp_path):
    """A real ``pip install`` of the plugin package (offline, into a target folder)."""
    src = tmp_path / "src-copy"
    shutil.copytree(PLUGIN_DIR, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(target), str(src)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    assert (target / MODULE / "__init__.py").is_file()
    monkeypatch.syspath_prepend(str(target))
    assert "median" in MERGES.names()
    assert Path(sys.modules[MODULE].__file__).is_relative_to(target)
    _use_plugin_parts()


def test_mergevid_ls_lists_plugin_parts(clean_registries, monkeypatch):
    from typer.testing import CliRunner

    from mergekit_video.cli.main import app

    monkeypatch.syspath_prepend(str(PLUGIN_SRC))
    import_plugins([MODULE])
    for kind, name, doc in (("routers", "cyclic", "Round-robin routing"), ("merges", "median", "Coordinate-wise median")):
        result = CliRunner().invoke(app, ["ls", kind], env={"COLUMNS": "400"})
        assert result.exit_code == 0
        row = [ln for ln in result.output.splitlines() if f" {name} " in ln]
        assert row and doc in row[0]


# -- behaviour of the plugin parts -------------------------------------------------------------------


@pytest.fixture()
def plugin(clean_registries, monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_SRC))
    import_plugins([MODULE])
    return sys.modules[MODULE]


def test_cyclic_router(plugin):
    r = ROUTERS.build("cyclic", num_experts=4, offset=2)
    x = torch.zeros(3, 5, 8)  # [B, T, D]
    assert [int(r(x).indices) for _ in range(5)] == [2, 3, 0, 1, 2]  # (2 + t) mod 4
    s = ROUTERS.build("cyclic", num_experts=4, granularity="sample")
    assert s(x).indices.view(-1).tolist() == [0, 1, 2]
    assert s(x).indices.view(-1).tolist() == [3, 0, 1]  # continues where the last forward stopped
    t = ROUTERS.build("cyclic", num_experts=4, granularity="token")
    counts = torch.bincount(t(torch.zeros(4, 10, 8)).indices.view(-1), minlength=4)
    assert counts.tolist() == [10, 10, 10, 10]  # every expert gets exactly its share
    assert not plugin.CyclicRouter.stochastic
    assert repr(r) == "CyclicRouter(num_experts=4, granularity='batch', offset=2, step=5)"


def test_cyclic_router_state_survives_a_checkpoint(plugin):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    mv.add_experts(model, "0", 3, router="cyclic")
    x = torch.zeros(2, 4)
    for _ in range(4):
        model.train()(x)
    sd = model.state_dict()
    assert sd["0.router._extra_state"] == {"step": 4}
    fresh = nn.Sequential(nn.Linear(4, 4))
    mv.add_experts(fresh, "0", 3, router="cyclic")
    fresh.load_state_dict(sd)
    fresh.train()(x)
    assert int(fresh[0].last_routing.indices) == 4 % 3


def test_cyclic_router_under_gradient_checkpointing(plugin):
    from mergekit_video.experts import checkpoint_routed
    from mergekit_video.surgery import warn_plain_checkpointing

    def make() -> nn.Module:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
        mv.add_experts(m, ["0", "2"], 3, router="cyclic")
        return m.train()

    plain, ckpt = make(), make()
    x = torch.randn(5, 4)
    for _ in range(2):  # the second step runs expert 1: the replayed step is not the initial one
        plain(x).square().sum().backward()
        checkpoint_routed(ckpt, ckpt, x).square().sum().backward()
    def grad(p: torch.Tensor) -> torch.Tensor:
        return torch.full_like(p, float("nan")) if p.grad is None else p.grad

    for (k, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.equal(grad(p), grad(q)) or (p.grad is None and q.grad is None), k
    assert ckpt[0].experts[1].weight.grad.abs().sum() > 0 and ckpt[0].experts[2].weight.grad is None
    assert [ckpt[0].router.step, ckpt[2].router.step] == [2, 2]  # the recomputation did not advance it
    ckpt.grad_checkpointing = True  # a plain torch.utils.checkpoint would advance the step again
    with pytest.warns(UserWarning, match="stochastic or stateful routers"):
        warn_plain_checkpointing(ckpt)


def test_median_merge_by_hand(plugin):
    median = MERGES.get("median")
    a, b, c, d = (torch.tensor(v) for v in ([1.0, -2.0], [5.0, 0.0], [2.0, 7.0], [4.0, 100.0]))
    assert torch.equal(median([a, b, c]), torch.tensor([2.0, 0.0]))  # middle of {1, 2, 5} and {−2, 0, 7}
    # even N: mean of the two middle values: {1, 2, 4, 5} → (2 + 4)/2, {−2, 0, 7, 100} → (0 + 7)/2
    assert torch.equal(median([a, b, c, d]), torch.tensor([3.0, 3.5]))
    assert torch.equal(median([a, b, c], base=torch.zeros(2)), median([a, b, c]))  # base does not matter
    assert median([a.bfloat16(), b.bfloat16(), c.bfloat16()]).dtype == torch.bfloat16
    # robust to one outlying expert, unlike the mean
    outlier = [torch.zeros(3), torch.zeros(3), torch.full((3,), 1e3)]
    assert torch.equal(median(outlier), torch.zeros(3))
    with pytest.raises(ValueError, match=r"^median merge needs at least one tensor$"):
        median([])
    with pytest.raises(ValueError, match=r"^cannot merge tensor 'w': cannot merge tensors of different shapes"):
        mv.merge_state_dicts([{"w": a}, {"w": torch.zeros(3)}], "median")


def test_median_as_container_merge_and_collapse(plugin):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 4))
    plain = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 4))
    mv.add_experts(model, ["0", "2"], 3, merge="median")
    x = torch.randn(5, 4)
    model.eval()
    y = model(x)
    c = model[0]
    sds = [e.state_dict() for e in c.experts]
    merged = mv.merge_state_dicts(sds, "median")
    assert torch.equal(merged["weight"], torch.stack([sd["weight"] for sd in sds]).median(dim=0).values)
    dense = nn.Linear(4, 6)
    dense.load_state_dict(merged)
    assert (c(x) - dense(x)).abs().max().item() <= 1e-6
    mv.collapse_experts(model, "median")
    plain.load_state_dict(model.state_dict(), strict=True)
    assert (plain(x) - y).abs().max().item() <= 1e-6


def test_a_video_model_with_a_stateful_plugin_router_saves_and_loads(clean_registries, monkeypatch, tmp_path):
    """The cyclic router's step (``router._extra_state``, not a tensor) survives save_model/load and a trainer checkpoint."""
    from mergekit_video.models import build_video_clip, load, save_model
    from mergekit_video.training.checkpoint import CheckpointManager

    monkeypatch.syspath_prepend(str(PLUGIN_SRC))
    import_plugins([MODULE])
    torch.manual_seed(0)
    model = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=2, num_experts=3, router="cyclic").train()
    for _ in range(2):
        model.head(torch.randn(2, 4, 64), torch.randn(5, 64))
    steps = [m.router.step for m in model.head.modules() if hasattr(m, "router")]
    assert steps == [2, 2]
    save_model(model, tmp_path / "model")
    manager = CheckpointManager(directory=tmp_path / "checkpoints")
    manager.save(step=1, epoch=0, model_state=model.state_dict(), extra={"model_config": model.config})
    for path in (tmp_path / "model", tmp_path / "checkpoints" / "step_00000001"):
        back = load(path)
        assert [m.router.step for m in back.head.modules() if hasattr(m, "router")] == steps, path
        assert "non_tensor_state" not in back.config
        frames, classes = torch.randn(2, 4, 3, 32, 32), torch.randn(5, 64)
        with torch.no_grad():
            assert torch.equal(back(frames, classes), model.eval()(frames, classes))


def test_a_saved_model_lists_the_module_that_registers_its_parts(clean_registries, monkeypatch, tmp_path):
    """The defining module was listed ('functools' for a partial, a helper module for an imported class): a later
    load imported those and still met 'unknown merge strategy'. A part a script registers is a warning."""
    import warnings

    from mergekit_video.models import build_video_clip

    (tmp_path / "mkv_helpers_for_plugin.py").write_text(
        "import torch\nfrom mergekit_video.routers import RandomRouter\n"
        "class HelperRouter(RandomRouter):\n    pass\n"
        "def scaled_mean(tensors, *, base=None, s=1.0):\n    return s * sum(tensors) / len(tensors)\n")
    (tmp_path / "mkv_registering_plugin.py").write_text(
        "import functools\nfrom mergekit_video.registry import MERGES, ROUTERS\n"
        "from mkv_helpers_for_plugin import HelperRouter, scaled_mean\n"
        "ROUTERS.register('mkv_helper_router', HelperRouter)\n"
        "MERGES.register('mkv_halfmean', functools.partial(scaled_mean, s=1.0))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import_plugins(["mkv_registering_plugin"])
    try:
        torch.manual_seed(0)
        model = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=2,
                                 router="mkv_helper_router", merge="mkv_halfmean")
        assert model.config["plugins"] == ["mkv_registering_plugin"]
        MERGES.register("mkv_script_merge", MERGES.get("mean"))  # this test module is no __main__: pretend
        MERGES._owners["mkv_script_merge"] = "__main__"
        model.head.transformer.resblocks[0].mlp.set_merge("mkv_script_merge")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert model.config["plugins"] == ["mkv_registering_plugin"]
        assert any("merge strategy 'mkv_script_merge' is registered by the running script (__main__): a later load cannot import it"
                   in str(w.message) for w in caught)
    finally:
        for name in ("mkv_registering_plugin", "mkv_helpers_for_plugin"):
            sys.modules.pop(name, None)
            reg_mod._imported_plugin_modules.discard(name)


def test_a_saved_model_records_its_plugin_and_loading_imports_it(clean_registries, monkeypatch, tmp_path):
    """config.json lists the plugin module of the experts' router/merge: load() imports it (a later process
    would otherwise meet 'unknown merge strategy median'), or says what to install."""
    from mergekit_video.models import build_video_clip, load, save_model
    from mergekit_video.models.checkpoint import read_model_config

    monkeypatch.syspath_prepend(str(PLUGIN_SRC))
    import_plugins([MODULE])
    torch.manual_seed(0)
    model = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=3, router="cyclic", merge="median")
    assert model.config["plugins"] == [MODULE]
    save_model(model, tmp_path / "model")
    assert read_model_config(tmp_path / "model")["plugins"] == [MODULE]
    plain = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=3)
    assert "plugins" not in plain.config  # built-in parts only

    # a new process: the plugin is not imported and its names are not registered
    _forget_plugin()
    ROUTERS._entries.pop("cyclic", None)
    MERGES._entries.pop("median", None)
    back = load(tmp_path / "model")
    assert back.head.config["merge"] == "median" and "median" in MERGES.names()
    frames, classes = torch.randn(2, 4, 3, 32, 32), torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(back(frames, classes), model.eval()(frames, classes))

    # export --strategy names the plugin's merge before the model is read: the model's plugins are imported first
    from mergekit_video.cli.main import main as cli_main

    _forget_plugin()
    ROUTERS._entries.pop("cyclic", None)
    MERGES._entries.pop("median", None)
    assert cli_main(["export", str(tmp_path / "model"), str(tmp_path / "dense"), "--dense", "--strategy", "median"]) == 0
    with torch.no_grad():
        assert torch.allclose(load(tmp_path / "dense")(frames, classes), model.eval()(frames, classes), atol=1e-5)
    # so does the validation of a recipe that evaluates the model, for eval.compare.merges entries naming them
    _forget_plugin()
    ROUTERS._entries.pop("cyclic", None)
    MERGES._entries.pop("median", None)
    recipe = tmp_path / "compare.yaml"
    recipe.write_text(f"runner: compare\noutput_dir: {tmp_path / 'cmp'}\ncheckpoint: {tmp_path / 'model'}\n"
                      "eval:\n  compare:\n    merges: [{name: median}]\n")
    assert cli_main(["validate", str(recipe)]) == 0

    # without the plugin on the path: what to install, not an unknown name
    _forget_plugin()
    ROUTERS._entries.pop("cyclic", None)
    MERGES._entries.pop("median", None)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(PLUGIN_SRC)])
    with pytest.raises(ImportError, match=rf"model was saved with experts whose router or merge strategy comes from the plugin "
                                          rf"module '{MODULE}', which cannot be imported here .*install that plugin package"):
        load(tmp_path / "model")


def test_a_saved_models_plugin_that_fails_while_importing_is_named_with_its_error_not_install_advice(tmp_path, monkeypatch):
    """A plugin that is installed but raises on import was reported as 'cannot be imported here (needs CUDA 99):
    install that plugin package', dropping the error's type and place and advising to install what is installed."""
    from mergekit_video.models.video_clip import import_model_plugins

    (tmp_path / "crashing_plugin_mod.py").write_text("raise RuntimeError('needs CUDA 99')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError) as info:
        import_model_plugins({"plugins": ["crashing_plugin_mod"]}, source="the model")
    message = str(info.value)
    assert "RuntimeError: needs CUDA 99" in message and "crashing_plugin_mod.py" in message
    assert message.endswith("fix the plugin (or install what it needs) so that it imports") and "install that plugin package" not in message
    with pytest.raises(ImportError, match=r"install that plugin package, or put its folder on PYTHONPATH$"):
        import_model_plugins({"plugins": ["no_such_plugin_mod_xyz"]}, source="the model")


# a plugin package whose parts are registered by a function of another (top-level) module it calls
TWO_MODULE_HELPERS = """import torch
from mergekit_video.registry import MERGES, ROUTERS
from mergekit_video.routers import RandomRouter


class TwoModRouter(RandomRouter):
    '''A random router defined in the helper module.'''


def two_mod_mean(tensors, *, base=None):
    return torch.stack([t.float() for t in tensors]).mean(0)


def register_all(fail: bool = False):
    ROUTERS.register("mkv_twomod_router")(TwoModRouter)
    MERGES.register("mkv_twomod_merge", two_mod_mean)
    if fail:
        raise RuntimeError("half-way")
"""


def _write_two_module_plugin(folder: Path, name: str = "mkv_twomod", *, fail: bool = False) -> None:
    (folder / "mkv_twomod_helpers.py").write_text(TWO_MODULE_HELPERS)
    (folder / name).mkdir()
    (folder / name / "__init__.py").write_text(f"import mkv_twomod_helpers\nmkv_twomod_helpers.register_all(fail={fail})\n")


def _forget_two_module_plugin(*names: str) -> None:
    for name in ("mkv_twomod_helpers", *names):
        sys.modules.pop(name, None)
        reg_mod._imported_plugin_modules.discard(name)
    ROUTERS._entries.pop("mkv_twomod_router", None)
    MERGES._entries.pop("mkv_twomod_merge", None)


def _fresh_python(code: str, tmp_path: Path) -> str:
    """Run ``code`` in a new interpreter with ``tmp_path`` (the plugins written there) and the package on its path;
    return its stdout, stripped."""
    package_root = str(Path(mv.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{package_root}"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_a_plugin_that_registers_through_a_helper_module_is_recorded_and_loads_in_a_new_process(clean_registries, monkeypatch, tmp_path):
    """The helper module whose function called register() was recorded (mkv_twomod_helpers): a new process imported
    it, which registers nothing, and met 'unknown router'. The plugin module that was imported is recorded."""
    from mergekit_video.models import build_video_clip, save_model
    from mergekit_video.models.checkpoint import read_model_config

    _write_two_module_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import_plugins(["mkv_twomod"])
        assert ROUTERS.owner("mkv_twomod_router") == MERGES.owner("mkv_twomod_merge") == "mkv_twomod"
        torch.manual_seed(0)
        model = build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=2,
                                 router="mkv_twomod_router", merge="mkv_twomod_merge").eval()
        assert model.config["plugins"] == ["mkv_twomod"]
        save_model(model, tmp_path / "model")
        assert read_model_config(tmp_path / "model")["plugins"] == ["mkv_twomod"]
        frames, classes = torch.randn(2, 4, 3, 32, 32), torch.randn(5, 64)
        with torch.no_grad():
            torch.save({"frames": frames, "classes": classes, "out": model(frames, classes)}, tmp_path / "io.pt")
    finally:
        _forget_two_module_plugin("mkv_twomod")
    code = ("import sys, torch\nfrom mergekit_video.models import load\nfrom mergekit_video.registry import ROUTERS\n"
            f"io = torch.load({str(tmp_path / 'io.pt')!r})\nback = load({str(tmp_path / 'model')!r}).eval()\n"
            "assert back.head.config['merge'] == 'mkv_twomod_merge', back.head.config\n"
            "assert ROUTERS.owner('mkv_twomod_router') == 'mkv_twomod'\n"
            "with torch.no_grad():\n    assert torch.equal(back(io['frames'], io['classes']), io['out'])\n"
            "print('loaded', sorted(m for m in sys.modules if m.startswith('mkv_twomod')))\n")
    assert _fresh_python(code, tmp_path) == "loaded ['mkv_twomod', 'mkv_twomod_helpers']"


def test_a_plugin_that_fails_after_a_helper_registered_for_it_keeps_none_of_those_parts(clean_registries, monkeypatch, tmp_path):
    """What a helper function registered for the plugin during its (failed) import is dropped with the plugin: it
    was kept, owned by the helper module, although importing the plugin again would register it again."""
    _write_two_module_plugin(tmp_path, "mkv_twomod_broken", fail=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ImportError, match=r"^plugin module 'mkv_twomod_broken' failed while importing: RuntimeError: half-way"):
            import_plugins(["mkv_twomod_broken"])
        assert "mkv_twomod_router" not in ROUTERS and "mkv_twomod_merge" not in MERGES
        assert ROUTERS.owner("mkv_twomod_router") is None
        # an override the failed plugin made is undone with its owner: the built-in is back, recorded as the built-in's
        (tmp_path / "mkv_override_fails.py").write_text(
            "from mergekit_video.registry import MERGES\n"
            "MERGES.register('mean', lambda tensors, *, base=None: tensors[0], override=True)\nraise RuntimeError('late')\n")
        with pytest.raises(ImportError, match=r"^plugin module 'mkv_override_fails' failed while importing: RuntimeError: late"):
            import_plugins(["mkv_override_fails"])
        assert MERGES.get("mean").__module__ == "mergekit_video.merging" and MERGES.owner("mean") == "mergekit_video.merging"
    finally:
        _forget_two_module_plugin("mkv_twomod_broken", "mkv_override_fails")


def test_built_in_parts_a_plugin_loads_on_import_are_not_recorded_as_the_plugins(tmp_path):
    """A plugin that imports mergekit_video.runners (in a new process) loads the built-in runners while it imports:
    they stay the built-in module's, not the plugin's."""
    (tmp_path / "mkv_uses_runners.py").write_text("import mergekit_video.runners as r\nr.RUNNERS.names()\n")
    code = ("import sys\nfrom mergekit_video.registry import import_plugins\nassert 'mergekit_video.runners' not in sys.modules\n"
            "import_plugins(['mkv_uses_runners'])\nfrom mergekit_video.runners import RUNNERS\n"
            "print(sorted({RUNNERS.owner(n) for n in RUNNERS.names()}))\n")
    assert _fresh_python(code, tmp_path) == "['mergekit_video.runners.builtin']"


def test_ls_eval_and_export_import_the_plugin_option(clean_registries, monkeypatch, tmp_path, capsys):
    """``--plugin MODULE`` imports a plugin that is not an installed package (they had no way to): ls lists its parts,
    eval (a recipe: added to its plugins; a model directory) and export use them; a failing one is one error naming it."""
    from mergekit_video.cli import commands
    from mergekit_video.cli.main import main as cli_main
    from mergekit_video.models import build_video_clip, save_model

    def forget() -> None:
        _forget_plugin()
        ROUTERS._entries.pop("cyclic", None)
        MERGES._entries.pop("median", None)

    monkeypatch.syspath_prepend(str(PLUGIN_SRC))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "mkv_cli_noop.py").write_text("")
    (tmp_path / "mkv_cli_half.py").write_text("from mergekit_video.registry import MERGES\n"
                                              "MERGES.register('mkv_cli_half_merge', lambda tensors, *, base=None: tensors[0])\n"
                                              "raise RuntimeError('half')\n")
    torch.manual_seed(0)
    model = tmp_path / "model"  # built-in parts only: it records no plugin
    save_model(build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=3), model)
    ran: list[dict] = []
    monkeypatch.setattr(commands, "_run_validated", lambda cfg, **kw: ran.append(cfg))
    try:
        assert cli_main(["ls", "merges"]) == 0 and " median " not in capsys.readouterr().out
        assert cli_main(["ls", "merges", "--plugin", MODULE]) == 0 and " median " in capsys.readouterr().out
        forget()

        recipe = tmp_path / "compare.yaml"
        recipe.write_text(f"runner: compare\noutput_dir: {tmp_path / 'cmp'}\ncheckpoint: {model}\nplugins: [mkv_cli_noop]\n"
                          "eval:\n  compare:\n    merges: [{name: median}]\n")
        assert cli_main(["eval", str(recipe)]) == 1 and "'median'" in capsys.readouterr().err
        assert cli_main(["eval", str(recipe), "--plugin", MODULE, "--plugin", "mkv_cli_noop"]) == 0
        assert ran[-1]["plugins"] == ["mkv_cli_noop", MODULE]
        forget()

        (tmp_path / "list.txt").write_text("a.mp4 0\n")
        (tmp_path / "classes.csv").write_text("id,name\n0,a\n")
        args = ["eval", str(model), "--list", str(tmp_path / "list.txt"), "--classes", str(tmp_path / "classes.csv"), "--root",
                str(tmp_path), "--compare", "--output-dir", str(tmp_path / "ev"), "eval.compare.merges=[{name: median}]"]
        assert cli_main(args) == 1 and "'median'" in capsys.readouterr().err
        assert cli_main([*args, "--plugin", MODULE, "--plugin", MODULE]) == 0
        assert ran[-1]["plugins"] == [MODULE] and ran[-1]["eval"]["compare"]["merges"][0]["name"] == "median"
        forget()

        export = ["export", str(model), str(tmp_path / "dense"), "--dense", "--strategy", "median"]
        assert cli_main(export) == 1 and "unknown merge strategy 'median'" in capsys.readouterr().err
        assert cli_main([*export, "--plugin", MODULE]) == 0 and (tmp_path / "dense" / "config.json").is_file()
        capsys.readouterr()

        # one error naming the module, the recipe key's message; what a half-failed plugin registered is dropped
        assert cli_main(["ls", "--plugin", "mkv_no_such_plugin_xyz"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and err[0].startswith(
            "error: --plugin: plugin module 'mkv_no_such_plugin_xyz' could not be imported: No module named 'mkv_no_such_plugin_xyz' "
            "(install its package, or put the folder that holds mkv_no_such_plugin_xyz/ or mkv_no_such_plugin_xyz.py on PYTHONPATH")
        for command in (["export", str(model), str(tmp_path / "out")], ["eval", str(recipe)], ["eval", *args[1:]]):
            assert cli_main([*command, "--plugin", "mkv_cli_half"]) == 1, command
            err = " ".join(capsys.readouterr().err.split())
            assert err.startswith("error: --plugin: plugin module 'mkv_cli_half' failed while importing: RuntimeError: half "
                                  f"({tmp_path / 'mkv_cli_half.py'}:3)"), err
        assert "mkv_cli_half_merge" not in MERGES and not (tmp_path / "out").exists()
    finally:
        for name in ("mkv_cli_noop", "mkv_cli_half"):
            sys.modules.pop(name, None)
            reg_mod._imported_plugin_modules.discard(name)


def test_a_package_imported_plainly_that_registers_through_a_helper_is_the_owner(clean_registries, monkeypatch, tmp_path):
    """``import mkv_twomod`` in a user's script (not plugins:, an entry point or --plugin): the package whose import
    ran the registration is recorded, not the helper module whose function called register() (which, imported alone
    in a new process, registers nothing). A registration from a script's own top level stays the script's caller's."""
    import importlib

    _write_two_module_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        importlib.import_module("mkv_twomod")
        assert ROUTERS.owner("mkv_twomod_router") == "mkv_twomod" and MERGES.owner("mkv_twomod_merge") == "mkv_twomod"
    finally:
        _forget_two_module_plugin("mkv_twomod")
    code = ("import mkv_twomod_helpers\nmkv_twomod_helpers.register_all(fail=False)\n"
            "from mergekit_video.registry import ROUTERS\nprint(ROUTERS.owner('mkv_twomod_router'))\n")
    assert _fresh_python(code, tmp_path) == "mkv_twomod_helpers"  # called from __main__: the helper is all there is to name
