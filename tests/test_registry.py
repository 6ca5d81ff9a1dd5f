"""Registry: registration, lookup, every error message, plugin-module import, ``mergevid ls``."""

from __future__ import annotations

import sys
import textwrap

import pytest

from mergekit_video import registry as reg_mod
from mergekit_video.registry import (
    MERGES,
    REGISTRIES,
    REGULARIZERS,
    ROUTERS,
    Registry,
    RegistryError,
    add_registry,
    callable_name,
    get_registry,
)

BUILTINS = {
    "routers": ["fixed", "multinomial", "random", "topk"],
    "merges": ["dare", "ensemble", "mean", "slerp", "task_arithmetic", "temperature_softmax", "ties", "weighted"],
    "regularizers": ["feature_mse", "load_balance", "weight_merging"],
}


def _double(*, x: int) -> int:
    """Doubles x.

    More text that is not part of the one-line doc.
    """
    return 2 * x


def test_register_build_names_doc():
    reg = Registry("widget")
    assert reg.register("double", _double) is _double  # direct form returns the object

    @reg.register("triple")
    def triple(*, x: int) -> int:
        return 3 * x

    assert triple(x=1) == 3  # decorator form returns the function unchanged
    assert reg.build("double", x=4) == 8
    assert reg.build("triple", x=4) == 12
    assert reg.names() == ["double", "triple"]
    assert reg.items() == [("double", _double), ("triple", triple)]
    assert reg.doc("double") == "Doubles x."
    assert reg.doc("triple") == ""  # no docstring
    assert "double" in reg and "quadruple" not in reg
    assert repr(reg) == "Registry('widget', 2 entries)"


def test_duplicate_name_error_and_override():
    reg = Registry("widget")
    reg.register("double", _double)
    reg.register("double", _double)  # the same object again (module re-import) is fine
    with pytest.raises(RegistryError) as err:
        reg.register("double", lambda **kw: 0)
    assert str(err.value) == (
        f"widget 'double' is already registered (by {__name__}); pass override=True to replace it"
    )
    assert reg.get("double") is _double  # the failed registration changed nothing

    def other(*, x: int) -> int:
        return -x

    reg.register("double", other, override=True)
    assert reg.build("double", x=3) == -3


@pytest.mark.parametrize("bad", ["", None, 3])
def test_empty_or_non_string_name(bad):
    with pytest.raises(ValueError, match=r"widget name must be a non-empty string, got"):
        Registry("widget").register(bad, _double)


def test_unknown_name_lists_close_matches():
    with pytest.raises(RegistryError) as err:
        ROUTERS.get("multinomal")
    assert str(err.value) == (
        "unknown router 'multinomal'; did you mean 'multinomial'? "
        "(registered: " + ", ".join(ROUTERS.names()) + ")"
    )
    with pytest.raises(RegistryError) as err:
        MERGES.build("tie", tensors=[])
    assert "unknown merge strategy 'tie'; did you mean 'ties'" in str(err.value)
    # nothing close: no "did you mean", but the registered names are listed
    with pytest.raises(RegistryError) as err:
        REGULARIZERS.get("zzzzzz")
    assert str(err.value) == "unknown regularizer 'zzzzzz' (registered: " + ", ".join(REGULARIZERS.names()) + ")"
    # RegistryError is a KeyError whose str() is not quoted
    assert isinstance(err.value, KeyError) and not str(err.value).startswith("'")


def test_build_non_callable_is_type_error():
    reg = Registry("widget")
    reg.register("constant", 42)
    assert reg.get("constant") == 42
    with pytest.raises(TypeError, match=r"widget 'constant' is not callable and cannot be built"):
        reg.build("constant")


@pytest.mark.parametrize("kind", sorted(BUILTINS))
def test_builtin_names(kind):
    names = get_registry(kind).names()
    assert set(BUILTINS[kind]) <= set(names)
    assert all(get_registry(kind).doc(n) for n in BUILTINS[kind])  # every built-in has a one-line doc


def test_get_registry_and_add_registry_errors():
    with pytest.raises(RegistryError) as err:
        get_registry("router")
    assert str(err.value) == "unknown registry 'router'; did you mean 'routers'? (known: " + ", ".join(REGISTRIES) + ")"
    extra = Registry("sampler")
    try:
        assert add_registry("samplers", extra) is extra
        assert get_registry("samplers") is extra
        assert add_registry("samplers", extra) is extra  # the same registry again is fine
        with pytest.raises(RegistryError, match=r"^registry 'samplers' already exists$"):
            add_registry("samplers", Registry("sampler"))
    finally:
        REGISTRIES.pop("samplers", None)


def test_override_registered_before_builtins_load(tmp_path, monkeypatch):
    """An override registered before the first lookup survives the built-in module's import."""
    (tmp_path / "mkv_probe_builtins.py").write_text(
        textwrap.dedent(
            """
            from mergekit_video.registry import REGISTRIES
            REGISTRIES["_probe"].register("a", "builtin a")
            REGISTRIES["_probe"].register("b", "builtin b")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    probe = Registry("probe", builtin_module="mkv_probe_builtins")
    monkeypatch.setitem(REGISTRIES, "_probe", probe)
    probe.register("a", "user a", override=True)
    assert probe.get("a") == "user a"
    assert probe.get("b") == "builtin b"
    # a plain (non-override) registration of a built-in name is refused at once
    with pytest.raises(RegistryError, match=r"probe 'b' is already registered"):
        probe.register("b", "user b")
    monkeypatch.delitem(sys.modules, "mkv_probe_builtins")


def test_import_plugins_error_and_once(tmp_path, monkeypatch):
    with pytest.raises(ImportError) as err:
        reg_mod.import_plugins(["mkv_no_such_plugin"])
    assert str(err.value).startswith(
        "plugin module 'mkv_no_such_plugin' could not be imported: No module named 'mkv_no_such_plugin' (install its package, "
        "or put the folder that holds mkv_no_such_plugin/ or mkv_no_such_plugin.py on PYTHONPATH"
    )
    # a module the plugin imports is missing: its own error, without the PYTHONPATH hint
    (tmp_path / "mkv_plugin_needing_x.py").write_text("import mkv_not_installed_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError) as err:
        reg_mod.import_plugins(["mkv_plugin_needing_x"])
    assert str(err.value) == ("plugin module 'mkv_plugin_needing_x' could not be imported: "
                              "No module named 'mkv_not_installed_dependency'")
    (tmp_path / "mkv_counting_plugin.py").write_text("import builtins\nbuiltins.MKV_COUNT = getattr(builtins, 'MKV_COUNT', 0) + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import builtins

    try:
        reg_mod.import_plugins(["mkv_counting_plugin", "mkv_counting_plugin"])
        reg_mod.import_plugins(["mkv_counting_plugin"])
        assert builtins.MKV_COUNT == 1
    finally:
        del builtins.MKV_COUNT
        sys.modules.pop("mkv_counting_plugin", None)
        reg_mod._imported_plugin_modules.discard("mkv_counting_plugin")


def test_callable_name():
    assert callable_name(_double) == f"{__name__}._double"
    assert callable_name(Registry.build) == "mergekit_video.registry.Registry.build"


def test_import_is_light():
    """``import mergekit_video`` (and its registry) pulls in neither torch nor open_clip/timm/decord."""
    import subprocess

    code = (
        "import sys, mergekit_video, mergekit_video.registry;"
        "heavy = [m for m in ('torch', 'open_clip', 'timm', 'decord') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("kind", sorted(BUILTINS))
def test_mergevid_ls_prints_every_name_with_doc(kind):
    from typer.testing import CliRunner

    from mergekit_video.cli.main import app

    result = CliRunner().invoke(app, ["ls", kind], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    reg = get_registry(kind)
    lines = result.output.splitlines()
    for name in reg.names():
        row = [ln for ln in lines if ln.startswith(f"│ {name} ")]
        assert row, f"{name} missing from `mergevid ls {kind}`"
        assert reg.doc(name) in row[0]


def test_mergevid_ls_all_and_unknown_kind(capsys):
    from typer.testing import CliRunner

    from mergekit_video.cli.main import app, main

    result = CliRunner().invoke(app, ["ls"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    for names in BUILTINS.values():
        for name in names:
            assert f" {name} " in result.output
    capsys.readouterr()
    assert main(["ls", "merge"]) == 1  # one-line error through the CLI's error handler
    assert "unknown registry 'merge'; did you mean 'merges'?" in capsys.readouterr().err


def test_build_names_the_part_and_its_arguments_on_a_typo():
    from mergekit_video.registry import ROUTERS

    with pytest.raises(TypeError, match=r"^router 'multinomial' got an unexpected argument 'temprature' \(did you mean 'temperature'\?\) "
                                        r"\(accepted arguments: num_experts, temperature, granularity, generator, seed\)$"):
        ROUTERS.build("multinomial", num_experts=2, temprature=2.0)


def _positional_only_alpha(tensors, alpha, /, base=None):
    return tensors[0] * alpha


def test_a_merge_that_cannot_be_called_as_a_merge_is_refused_at_registration():
    from mergekit_video.registry import MERGES

    contract = "a merge strategy is fn(tensors, *, base=None, <keyword arguments>) -> Tensor"
    cases = [
        (lambda tensors: tensors[0], "merge strategy 'mkv_bad' does not accept base="),
        (lambda tensors, base: tensors[0], "merge strategy 'mkv_bad' requires base; give it a default (base=None)"),
        (lambda *, base=None: None, "merge strategy 'mkv_bad' takes no positional argument for the tensors"),
        (lambda *tensors, base=None: tensors[0], "merge strategy 'mkv_bad' takes *tensors, but the tensors come as one list argument"),
    ]
    for fn, message in cases:
        with pytest.raises(TypeError) as info:
            MERGES.register("mkv_bad", fn)
        assert str(info.value) == f"{message}; {contract}"
        assert "mkv_bad" not in MERGES
    MERGES.register("mkv_ok", lambda tensors, *, base=None, scale=1.0: tensors[0] * scale)
    # a required argument that is not positional-only comes by keyword: fine (fn(tensors, base=..., alpha=...))
    MERGES.register("mkv_ok_alpha", lambda tensors, alpha, base=None: tensors[0] * alpha)
    MERGES._entries.pop("mkv_ok_alpha")
    with pytest.raises(TypeError, match="requires positional-only argument 'alpha' besides the tensors"):
        MERGES.register("mkv_bad", _positional_only_alpha)
    MERGES.register("mkv_ok_kw", lambda tensors, **kw: tensors[0], override=True)  # base through **kw
    for name in ("mkv_ok", "mkv_ok_kw"):
        MERGES._entries.pop(name)


def test_a_merge_result_of_another_shape_is_named_and_another_dtype_is_cast():
    import torch

    from mergekit_video.merging import merge_state_dicts

    def reduce_all(tensors, *, base=None):
        return torch.stack(list(tensors)).mean()

    def in_float64(tensors, *, base=None):
        return torch.stack([t.double() for t in tensors]).mean(0)

    sds = [{"w": torch.ones(3, 2)}, {"w": torch.zeros(3, 2)}]
    with pytest.raises(ValueError) as info:
        merge_state_dicts(sds, reduce_all)
    assert str(info.value) == ("cannot merge tensor 'w': merge strategy 'reduce_all' returned shape () for inputs of shape (3, 2); "
                               "a merge returns one tensor of the inputs' shape")
    out = merge_state_dicts(sds, in_float64)["w"]
    assert out.dtype == torch.float32 and torch.equal(out, torch.full((3, 2), 0.5))
