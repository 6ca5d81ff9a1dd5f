"""Recipes: YAML loading, overrides, interpolation, instantiation, validation, saving."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
import uuid

import pytest

from mergekit_video.config import (
    Component,
    ConfigError,
    Field,
    InstantiationError,
    Section,
    ValidationError,
    apply_overrides,
    dump_recipe,
    instantiate,
    iter_schema,
    load_recipe,
    load_recipe_plugins,
    parse_override,
    resolve_interpolations,
    save_resolved_recipe,
    select,
    validate_recipe,
    with_defaults,
)


# ---------------------------------------------------------------------------------------------
# a plugin module written per test session: components for instantiate() and a registered router
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    name = f"cfgtest_plugin_{uuid.uuid4().hex[:8]}"
    root = tmp_path_factory.mktemp("plugin")
    (root / f"{name}.py").write_text(textwrap.dedent('''
        from mergekit_video.registry import ROUTERS

        class Head:
            """A toy head."""
            def __init__(self, *, dim, scale=1.0, layers=()):
                self.dim, self.scale, self.layers = dim, scale, list(layers)

        def make_model(*, head, name="m", blocks=()):
            return {"head": head, "name": name, "blocks": list(blocks)}

        def add(*, a, b):
            return a + b

        def explode(*, x):
            raise RuntimeError(f"boom {x}")

        class Nested:
            class Inner:
                def __init__(self, *, v):
                    self.v = v

        @ROUTERS.register("cfgtest_router", override=True)
        def cfgtest_router(*, num_experts):
            return ("router", num_experts)
    '''))
    sys.path.insert(0, str(root))
    yield name
    sys.path.remove(str(root))


# ---------------------------------------------------------------------------------------------
# overrides
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, op, key, value",
    [
        ("train.epochs=3", "set", "train.epochs", 3),
        ("train.lr=5e-5", "set", "train.lr", 5e-5),
        ("train.lr=1.5E+3", "set", "train.lr", 1500.0),
        ("model.routers=[a,b]", "set", "model.routers", ["a", "b"]),
        ("data.root=null", "set", "data.root", None),
        ("name='007'", "set", "name", "007"),
        ("name=007", "set", "name", 7),
        ("flag=true", "set", "flag", True),
        ("opt={lr: 0.1, betas: [0.9, 0.99]}", "set", "opt", {"lr": 0.1, "betas": [0.9, 0.99]}),
        ("data.root=/tmp/a b", "set", "data.root", "/tmp/a b"),
        ("expr=a=b", "set", "expr", "a=b"),
        ("~model.tfm", "delete", "model.tfm", None),
        ("+train.new=1", "add", "train.new", 1),
        ("layers.0.dim=8", "set", "layers.0.dim", 8),
        ("data.root='/tmp/a #1'", "set", "data.root", "/tmp/a #1"),  # quoted: the text, '#' and all
        ("url=http://x.org/a#b", "set", "url", "http://x.org/a#b"),  # '#' without a space before it is no comment
        ("a=~", "set", "a", None),
        ('output_dir="${output_dir}/run #1"', "set", "output_dir", "${output_dir}/run #1"),  # the suggested form
        ('name="it\'s #1"', "set", "name", "it's #1"),
    ],
)
def test_parse_override(text, op, key, value):
    ov = parse_override(text)
    assert (ov.op, ov.key, ov.value) == (op, key, value)
    assert type(ov.value) is type(value)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("train.epochs", "neither 'key=value' nor '~key'"),
        ("~a=1", "takes no value"),
        ("a=", "has no value"),
        ("a..b=1", "not a dotted key"),
        ("a=[1,2", "cannot parse value"),
        ("a=[64, ${b}]", "as YAML (expected ',' or ']', but got '{'); quote an interpolation inside [ ] or { }, e.g. [64, \"${data.num_frames}\"]"),
        # YAML would silently turn these paths into something else: a comment dropped, a mapping, an anchor's null
        # (the quoted form: YAML double quotes inside shell single quotes, so the shell expands no $ either)
        ("output_dir=/tmp/a #x", "' #' starts a YAML comment, which would drop '#x'; quote the value: 'output_dir=\"/tmp/a #x\"'"),
        ("output_dir=/tmp/x: y", "YAML reads '/tmp/x: y' as a mapping (write one as {key: value}); quote the value for text: 'output_dir=\"/tmp/x: y\"'"),
        ("output_dir=&x", "YAML reads '&x' as null (write null for None); quote the value for text: 'output_dir=\"&x\"'"),
        ("name=it's #1", "quote the value: 'name=\"it'\"'\"'s #1\"'"),
    ],
)
def test_parse_override_errors(text, needle):
    with pytest.raises(ConfigError, match="override") as e:
        parse_override(text)
    assert needle in str(e.value)


def test_apply_overrides_set_add_delete_and_list_indices():
    cfg = {"train": {"epochs": 30, "lr": 1e-3}, "layers": [{"dim": 4}, {"dim": 5}], "model": {"tfm": True, "d": 1}}
    out = apply_overrides(
        cfg, ["train.epochs=3", "train.new.deep=1", "layers.1.dim=7", "~layers.0", "~model.tfm", "+extra=[1, 2]"]
    )
    assert out == {
        "train": {"epochs": 3, "lr": 1e-3, "new": {"deep": 1}},
        "layers": [{"dim": 7}],
        "model": {"d": 1},
        "extra": [1, 2],
    }
    assert cfg["train"]["epochs"] == 30 and len(cfg["layers"]) == 2  # input untouched
    # negative index and a whole-list replacement
    assert apply_overrides({"l": [1, 2, 3]}, ["l.-1=9"]) == {"l": [1, 2, 9]}
    assert apply_overrides({"l": [1, 2, 3]}, ["l=[]"]) == {"l": []}


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.epochs.x=1", "cannot go into 'train.epochs', which is an integer (30), not a mapping"),
        ("data.x=1", "cannot go into 'data', which is null"),
        ("~train.epoch", "key 'train.epoch' does not exist; did you mean 'epochs'?"),
        ("~nope.x", "key 'nope' does not exist"),
        ("+train.epochs=2", "'train.epochs' already exists; drop the '+'"),
        ("layers.5.dim=1", "out of range"),
        ("layers.x=1", "use an integer index"),
        ("train.groups.0.lr=1", "'train.groups' does not exist, so it has no item 0; set the whole list instead, e.g. train.groups=[{...}]"),
    ],
)
def test_apply_overrides_errors_name_the_key(override, needle):
    cfg = {"train": {"epochs": 30}, "data": None, "layers": [{"dim": 4}]}
    with pytest.raises(ConfigError) as e:
        apply_overrides(cfg, [override])
    assert needle in str(e.value)
    assert override in str(e.value)


def test_select():
    cfg = {"a": {"b": [10, {"c": 3}]}}
    assert select(cfg, "a.b.1.c") == 3
    assert select(cfg, "a.b.0") == 10
    assert select(cfg, "a.x", default=None) is None
    with pytest.raises(KeyError, match="a.x"):
        select(cfg, "a.x")


# ---------------------------------------------------------------------------------------------
# YAML + interpolation
# ---------------------------------------------------------------------------------------------
def test_load_recipe_yaml_floats_overrides_then_interpolation(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent("""
        output_dir: runs/a
        data:
          root: ${output_dir}/data
          frames: 8
        train:
          lr: 5e-5
          clip_lr: 3.0e-6
          wd: 1e2
          frames: ${data.frames}
          name: run-${data.frames}f
    """))
    cfg = load_recipe(p, ["output_dir=/tmp/x", "data.frames=16"])
    assert cfg["data"]["root"] == "/tmp/x/data"  # interpolation sees the overridden value
    assert cfg["train"]["lr"] == 5e-5 and isinstance(cfg["train"]["lr"], float)
    assert cfg["train"]["clip_lr"] == 3e-6
    assert cfg["train"]["wd"] == 100.0 and isinstance(cfg["train"]["wd"], float)
    assert cfg["train"]["frames"] == 16 and isinstance(cfg["train"]["frames"], int)
    assert cfg["train"]["name"] == "run-16f"


def test_yaml_merge_keys_and_aliases_load_as_independent_copies(tmp_path):
    """``<<: *anchor`` was refused as "not valid YAML"; an alias shared one dict with its anchor, so an
    override of one place (``d.c.x=5``) changed every place the alias reached."""
    (tmp_path / "m.yaml").write_text(textwrap.dedent("""\
        base: &b
          a: 1
          c: {x: 2}
        d:
          <<: *b
          a: 3
        e:
          - <<: [*b]
            z: 1
        g: *b
        """))
    cfg = load_recipe(tmp_path / "m.yaml", ["d.c.x=5", "e.0.a=9"])
    assert cfg == {
        "base": {"a": 1, "c": {"x": 2}},
        "d": {"a": 3, "c": {"x": 5}},  # explicit keys override merged ones
        "e": [{"a": 9, "c": {"x": 2}, "z": 1}],
        "g": {"a": 1, "c": {"x": 2}},
    }
    (tmp_path / "dup.yaml").write_text("b: &b {a: 1}\nd:\n  <<: *b\n  a: 2\n  a: 3\n")
    with pytest.raises(ConfigError, match="duplicate key 'a' at line 5"):
        load_recipe(tmp_path / "dup.yaml")
    (tmp_path / "rec.yaml").write_text("a: &x\n  b: *x\n")
    with pytest.raises(ConfigError, match="recursive anchor"):
        load_recipe(tmp_path / "rec.yaml")


def test_quickstart_with_a_merge_key_in_eval_datasets_validates(tmp_path):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml").read_text()
    old = "    - name: val\n      kind: close_set\n"
    assert old in text
    text = text.replace(old, "    - &val_set\n      name: val\n      kind: close_set\n")
    old = "    - name: novel\n      kind: zero_shot\n      root: ${output_dir}/data\n"
    assert old in text
    text = text.replace(old, "    - <<: *val_set\n      name: novel\n      kind: zero_shot\n")  # root comes from the merge
    (tmp_path / "qs.yaml").write_text(text)
    from mergekit_video.cli.main import main as cli_main

    assert cli_main(["validate", str(tmp_path / "qs.yaml"), f"output_dir={tmp_path}/run"]) == 0
    novel = load_recipe(tmp_path / "qs.yaml")["eval"]["datasets"][1]
    assert novel["kind"] == "zero_shot" and novel["num_clips"] == 3 and novel["root"] == "runs/quickstart/data"


def test_load_recipe_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "dup.yaml").write_text("a: 1\nb: 2\na: 3\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(tmp_path / "dup.yaml")
    assert str(info.value) == f"recipe {tmp_path / 'dup.yaml'}: duplicate key 'a' at line 3 (first defined at line 1)"
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_recipe(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_recipe(tmp_path / "bad.yaml")
    assert f'in "{tmp_path / "bad.yaml"}", line 1, column 4' in str(info.value) and "<unicode string>" not in str(info.value)
    assert load_recipe(_write(tmp_path / "empty.yaml", "")) == {}


def _write(path, text):
    path.write_text(text)
    return path


def test_interpolation_types_lists_env_and_escapes(monkeypatch):
    monkeypatch.setenv("CFGTEST_ROOT", "/data/k400")
    monkeypatch.delenv("CFGTEST_UNSET", raising=False)
    cfg = {
        "dims": [512, 768],
        "model": {"width": "${dims.1}", "layers": "${dims}", "copy": "${model.width}"},
        "root": "${env:CFGTEST_ROOT}/train",
        "fallback": "${env:CFGTEST_UNSET,4}",
        "fallback_str": "${env:CFGTEST_UNSET,/x}",
        "literal": "\\${not.a.ref}",
        "ok": True,
        "mixed": "flag=${ok} w=${model.width}",
        "alias": "${model}",
        "through": "${alias.width}",
    }
    out = resolve_interpolations(cfg)
    assert out["model"] == {"width": 768, "layers": [512, 768], "copy": 768}
    assert out["root"] == "/data/k400/train"
    assert out["fallback"] == 4 and out["fallback_str"] == "/x"
    assert out["literal"] == "${not.a.ref}"
    assert out["mixed"] == "flag=true w=768"
    assert out["alias"] == out["model"] and out["alias"] is not out["model"]
    assert out["through"] == 768
    assert cfg["model"]["width"] == "${dims.1}"  # input untouched


@pytest.mark.parametrize(
    "cfg, needle",
    [
        ({"a": "${b}", "b": "${c}", "c": "${a}"}, "interpolation cycle: a -> b -> c -> a"),
        ({"a": {"b": "${a}"}}, "interpolation cycle: a -> a.b -> a"),
        ({"data": {"root": 1}, "x": "${data.rot}"}, "x: '${data.rot}' refers to a missing key 'data.rot'; did you mean 'data.root'"),
        ({"l": [1], "x": "${l.3}"}, "x: '${l.3}' refers to a missing key"),
        ({"d": {"k": 1}, "x": "p/${d}"}, "x: '${d}' is dict and cannot be formatted"),
        ({"x": "${env:CFGTEST_SURELY_UNSET_VAR}"}, "environment variable 'CFGTEST_SURELY_UNSET_VAR' is not set"),
        ({"x": "${oc:foo}"}, "unknown interpolation resolver 'oc'"),
    ],
)
def test_interpolation_errors(cfg, needle):
    with pytest.raises(ConfigError) as e:
        resolve_interpolations(cfg)
    assert needle in str(e.value)


# ---------------------------------------------------------------------------------------------
# instantiate
# ---------------------------------------------------------------------------------------------
def test_instantiate_dotted_paths_nested_lists_and_kwargs(plugin):
    node = {
        "_component_": f"{plugin}.make_model",
        "name": "tiny",
        "head": {"_component_": f"{plugin}.Head", "dim": 8, "layers": [{"_component_": f"{plugin}.add", "a": 1, "b": 2}, 5]},
        "blocks": [{"_component_": f"{plugin}:Nested.Inner", "v": 3}, {"plain": {"_component_": f"{plugin}.add", "a": 2, "b": 2}}],
    }
    out = instantiate(node, _path="model", name="override")
    assert out["name"] == "override"  # caller kwargs win over recipe keys
    assert out["head"].dim == 8 and out["head"].scale == 1.0 and out["head"].layers == [3, 5]
    assert out["blocks"][0].v == 3
    assert out["blocks"][1] == {"plain": 4}  # plain mappings stay dicts, their components are built
    assert instantiate(None) is None


def test_instantiate_partial_and_registry_refs(plugin):
    fn = instantiate({"_component_": f"{plugin}.add", "_partial_": True, "a": 40})
    assert isinstance(fn, functools.partial) and fn(b=2) == 42
    assert instantiate({"_component_": "routers:cfgtest_router", "num_experts": 4}) == ("router", 4)
    router = instantiate({"_component_": "routers:fixed", "num_experts": 4, "expert": 2}, _path="model.router")
    assert type(router).__name__ == "FixedRouter" and router.expert == 2 and router.num_experts == 4


@pytest.mark.parametrize(
    "node, needle",
    [
        ({"_component_": "{p}.Head", "dim": 8, "dimm": 3},
         "model.head.dimm: unknown argument 'dimm' for {p}.Head; did you mean 'dim'? (allowed: dim, scale, layers)"),
        ({"_component_": "{p}.Head"}, "model.head: missing required argument 'dim' for {p}.Head (allowed: dim, scale, layers)"),
        ({"_component_": "{p}.Hed", "dim": 1}, "model.head._component_: '{p}' has no attribute 'Hed' (from '{p}.Hed'); did you mean 'Head'?"),
        ({"_component_": "cfgtest_no_such_pkg.x.Y"}, "model.head._component_: cannot import 'cfgtest_no_such_pkg.x.Y'"),
        ({"_component_": "routers:multinomal"}, "model.head._component_: unknown router 'multinomal'; did you mean 'multinomial'?"),
        ({"_component_": "routerz:fixed"}, "model.head._component_: unknown registry 'routerz'; did you mean 'routers'?"),
        ({"_component_": "{p}"}, "is a module, not a callable"),
        ({"_component_": "{p}.Head", "_partial_": "yes", "dim": 1}, "model.head._partial_: must be true or false"),
        ({"dim": 1}, "model.head: expected a mapping with a '_component_' key"),
    ],
)
def test_instantiate_errors_name_key_path(plugin, node, needle):
    node = {k: v.format(p=plugin) if isinstance(v, str) else v for k, v in node.items()}
    with pytest.raises(ConfigError) as e:
        instantiate(node, _path="model.head")
    assert needle.format(p=plugin) in str(e.value)


def test_instantiate_wraps_target_errors_with_key_path(plugin):
    node = {"_component_": "{p}.make_model", "head": {"_component_": "{p}.explode", "x": 7}}
    node = {"_component_": f"{plugin}.make_model", "head": {"_component_": f"{plugin}.explode", "x": 7}}
    with pytest.raises(InstantiationError) as e:
        instantiate(node, _path="model")
    assert str(e.value) == f"model.head: building {plugin}.explode failed: RuntimeError: boom 7"
    assert isinstance(e.value.__cause__, RuntimeError)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
SCHEMA = {
    "train": Section(
        {
            "epochs": Field(int, required=True, min=1, doc="training epochs"),
            "lr": Field(float, min=0, exclusive_min=True, default=5e-5),
            "precision": Field(str, choices=["auto", "bf16", "fp16", "fp32"], default="auto"),
            "dropout": Field(float, min=0, max=1, nullable=True, default=None),
            "groups": Field(list, item=Section({"name": Field(str, required=True), "lr": Field(float)}), default=[]),
        },
        required=True,
    ),
    "optimizer": Component(runtime_kwargs=("params",)),
    "seed": Field(int, default=0),
}


def test_validate_lists_all_problems_with_key_and_allowed_values(plugin):
    cfg = {
        "trian": {},
        "plugins": [plugin, "cfgtest_missing_plugin"],
        "train": {"epochs": "ten", "lr": 0.0, "precision": "bf61", "dropout": 1.5, "groups": [{"lr": 1}, {"name": "x", "lrr": 1}]},
        "optimizer": {"_component_": "torch.optim.AdamW", "lrr": 0.1},
        "head": {"_component_": f"{plugin}.Head", "dim": 1, "width": 2},
        "router": {"_component_": "routers:cfgtest_router", "num_experts": 2},
        "seed": True,
    }
    with pytest.raises(ValidationError) as e:
        validate_recipe(cfg, SCHEMA, source="r.yaml")
    got = {p.path: p.message for p in e.value.problems}
    assert got == {
        "plugins.1": "plugin module 'cfgtest_missing_plugin' could not be imported: "
        "No module named 'cfgtest_missing_plugin' (install its package, or put the folder that holds cfgtest_missing_plugin/ "
        "or cfgtest_missing_plugin.py on PYTHONPATH: the working directory is not searched by the mergevid command)",
        "output_dir": "is required (every file a run produces is written under this folder)",
        "train.epochs": "expected int, got str ('ten')",
        "train.lr": "must be > 0, got 0.0",
        "train.precision": "'bf61' is not one of: 'auto', 'bf16', 'fp16', 'fp32'; did you mean 'bf16'?",
        "train.dropout": "must be <= 1, got 1.5",
        "train.groups.0.name": "is required",
        "train.groups.1.lrr": "unknown key; did you mean 'lr'? (known keys here: name, lr)",
        "optimizer.lrr": "unknown argument 'lrr' for torch.optim.adamw.AdamW; did you mean 'lr'? (allowed: params, lr, "
        "betas, eps, weight_decay, amsgrad, maximize, foreach, capturable, differentiable, fused)",
        "trian": "unknown key; did you mean 'train'? (known keys here: output_dir, plugins, train, optimizer, seed)",
        "head": "unknown key (known keys here: output_dir, plugins, train, optimizer, seed)",
        "router": "unknown key (known keys here: output_dir, plugins, train, optimizer, seed)",
        "seed": "expected int, got bool (True)",
        "head.width": f"unknown argument 'width' for {plugin}.Head (allowed: dim, scale, layers)",
    }
    text = str(e.value)
    assert text.startswith("recipe r.yaml is invalid (14 problems):\n  - ")
    assert isinstance(e.value, ValueError)


def test_validate_component_required_args_and_runtime_kwargs(plugin):
    base = {"output_dir": "o", "train": {"epochs": 1}}
    validate_recipe({**base, "optimizer": {"_component_": "torch.optim.SGD", "lr": 0.1}}, SCHEMA)  # params at runtime
    with pytest.raises(ValidationError) as e:
        validate_recipe({**base, "optimizer": {"_component_": f"{plugin}.add", "a": 1}}, SCHEMA)
    assert [str(p) for p in e.value.problems] == [
        f"optimizer: missing required argument 'b' for {plugin}.add (allowed: a, b)"
    ]
    with pytest.raises(ValidationError) as e:
        validate_recipe({**base, "optimizer": {"_component_": "torch.optim.Adamw"}}, SCHEMA)
    assert e.value.problems[0].path == "optimizer._component_"
    assert "did you mean 'AdamW'?" in e.value.problems[0].message


def test_validate_without_schema_checks_output_dir_plugins_and_components(plugin):
    validate_recipe({"output_dir": "o", "anything": {"goes": 1}})
    with pytest.raises(ValidationError) as e:
        validate_recipe({"output_dir": " ", "plugins": "x", "m": [{"_component_": "routers:nope"}]})
    assert [p.path for p in e.value.problems] == ["plugins", "output_dir", "m.0._component_"]
    assert e.value.problems[0].message == "expected list, got str ('x')"


def test_plugins_make_registered_parts_valid(plugin):
    cfg = {"output_dir": "o", "plugins": [plugin], "r": {"_component_": "routers:cfgtest_router", "num_experts": 3}}
    validate_recipe(cfg)
    assert instantiate(cfg["r"]) == ("router", 3)
    assert load_recipe_plugins(cfg) == [plugin]
    with pytest.raises(ConfigError, match="plugins.1: plugin module 'cfgtest_nope'"):
        load_recipe_plugins({"plugins": [plugin, "cfgtest_nope"]})


def test_with_defaults_and_iter_schema():
    out = with_defaults({"output_dir": "o", "train": {"epochs": 2, "lr": 1e-3}}, SCHEMA)
    assert out["train"] == {"epochs": 2, "lr": 1e-3, "precision": "auto", "dropout": None, "groups": []}
    assert out["seed"] == 0
    validate_recipe(out, SCHEMA)
    keys = [k for k, _ in iter_schema(Section(SCHEMA))]
    assert keys == ["train", "train.epochs", "train.lr", "train.precision", "train.dropout", "train.groups",
                    "train.groups.*.name", "train.groups.*.lr", "optimizer", "seed"]


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------
def test_save_resolved_recipe_round_trip_and_no_overwrite(tmp_path):
    # strings a recipe reads as floats (5e-5 without a dot: YAML 1.2) are written quoted, so they stay strings
    cfg = {"output_dir": "o", "lr": 5e-5, "lit": "${not_a_ref}", "l": [1, None, True], "d": {"k": "v"},
           "names": ["1e3", "5e-5", ".5", "-.inf"]}
    path = tmp_path / "out" / "recipe.yaml"
    save_resolved_recipe(cfg, path)
    assert load_recipe(path) == cfg
    mtime = path.stat().st_mtime_ns
    save_resolved_recipe(cfg, path)  # same content: no-op
    assert path.stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save_resolved_recipe({**cfg, "lr": 1.0}, path)
    assert load_recipe(path)["lr"] == 5e-5
    save_resolved_recipe({**cfg, "lr": 1.0}, path, overwrite=True)
    assert load_recipe(path)["lr"] == 1.0
    assert "\\${not_a_ref}" in dump_recipe(cfg)
    assert not [p for p in path.parent.iterdir() if p.name != "recipe.yaml"]  # no temp files left
    # what a run recorded is told from what a person wrote, a literal ${ (escaped when recorded) included
    from mergekit_video.config import is_recorded_recipe

    assert is_recorded_recipe(path.read_text()) and "\\${" in path.read_text()
    assert not is_recorded_recipe("# my run\n" + path.read_text())
    assert not is_recorded_recipe("runner: mote\noutput_dir: ${x}\n") and not is_recorded_recipe("a: [unclosed\n")


def test_import_is_light():
    code = "import sys, mergekit_video.config; bad = {'torch', 'open_clip', 'timm', 'decord'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_check_paths_names_missing_files_and_folders(tmp_path):
    from mergekit_video.config import Field, Section, check_paths

    (tmp_path / "list.txt").write_text("")
    schema = Section(
        {
            "root": Field(str, path="dir"),
            "list": Field(str, path="file"),
            "ckpt": Field(str, path="exists", nullable=True),
            "name": Field(str),
            "splits": Field(list, item=Section({"list": Field(str, path="file")})),
        }
    )
    cfg = {
        "root": str(tmp_path / "list.txt"),
        "list": str(tmp_path / "list.txt"),
        "ckpt": None,
        "name": "/not/a/path/check",
        "splits": [{"list": str(tmp_path / "list.txt")}, {"list": str(tmp_path / "missing.txt")}],
    }
    problems = [str(p) for p in check_paths(cfg, schema)]
    assert problems == [
        f"root: {tmp_path / 'list.txt'} is a file; a folder is expected here",
        f"splits.1.list: file not found: {tmp_path / 'missing.txt'}",
    ]
    # open_clip tags and the words of train.resume are not paths; files named there are checked
    weights = Section({"pretrained": Field(str, path="weights"), "resume": Field(str, path="checkpoint")})
    for pretrained, resume in (("openai", "auto"), ("laion2b_s34b_b79k", "never"), (str(tmp_path / "list.txt"), str(tmp_path))):
        assert check_paths({"pretrained": pretrained, "resume": resume}, weights) == []
    problems = [str(p) for p in check_paths({"pretrained": "vit_b16.pt", "resume": str(tmp_path / "run" / "checkpoints")}, weights)]
    assert problems == ["pretrained: weights file not found: vit_b16.pt", f"resume: checkpoint not found: {tmp_path / 'run' / 'checkpoints'}"]



def test_check_paths_model_kind_wants_a_saved_model_folder(tmp_path):
    """``path="model"`` (an evaluate recipe's ``checkpoint``): an existing folder that holds no saved
    model is a problem, and a run folder names its trained model/."""
    from mergekit_video.config import Field, Section, check_paths

    schema = Section({"checkpoint": Field(str, path="model")})
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / "config.json").write_text("{}")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "state.json").write_text("{}")
    (tmp_path / "other").mkdir()
    assert check_paths({"checkpoint": str(tmp_path / "run" / "model")}, schema) == []
    assert check_paths({"checkpoint": str(tmp_path / "ckpt")}, schema) == []
    problems = [str(p) for p in check_paths({"checkpoint": str(tmp_path / "run")}, schema)]
    assert problems == [f"checkpoint: {tmp_path / 'run'} holds a run's outputs, not a saved model: its trained model is {tmp_path / 'run' / 'model'}"]
    problems = [str(p) for p in check_paths({"checkpoint": str(tmp_path / "other")}, schema)]
    assert problems == [f"checkpoint: {tmp_path / 'other'} is not a saved model or trainer checkpoint (no config.json or state.json in it)"]
    problems = [str(p) for p in check_paths({"checkpoint": str(tmp_path / "nope")}, schema)]
    assert problems == [f"checkpoint: saved model not found: {tmp_path / 'nope'}"]

def test_unknown_argument_of_a_class_passing_kwargs_to_its_base_is_named():
    """The routers take ``**kw`` for their base class: a typo is checked against the whole chain."""
    from mergekit_video.config import ConfigError, instantiate

    with pytest.raises(ConfigError, match=r"unknown argument 'temperatur' for mergekit_video.routers.MultinomialRouter; "
                                          r"did you mean 'temperature'.*\(allowed: num_experts, temperature, granularity, generator, seed\)"):
        instantiate({"_component_": "routers:multinomial", "num_experts": 4, "temperatur": 1})
    router = instantiate({"_component_": "routers:multinomial", "num_experts": 4, "temperature": 2.0, "seed": 3})
    assert router.num_experts == 4


def test_validate_explain_lists_every_key_with_its_value_default_and_allowed_values(capsys):
    from mergekit_video.cli.main import main as cli_main
    from mergekit_video.config.schema import explain_schema
    from mergekit_video.runners.schema import SCHEMAS

    rows = {r["key"]: r for r in explain_schema(SCHEMAS["mote"])}
    assert rows["seed"] == {"key": "seed", "type": "int", "default": "0", "allowed": ">= 0, <= 4294967295", "doc": rows["seed"]["doc"]}
    assert rows["text.templates"]["type"] == "str or list of str" and rows["text.templates"]["default"] == '"mote"'
    assert rows["eval.datasets.*.num_crops"]["allowed"] == "one of 1, 3"
    assert rows["output_dir"]["default"] == "required"
    assert rows["model.num_experts"]["allowed"] == ">= 0, <= 1024"  # a component's checked arguments are listed too
    assert rows["eval.clip_blend"]["allowed"] == "> 0, <= 1" and rows["eval.clip_blend"]["type"] == "float or null"
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    assert cli_main(["validate", str(recipe), "--explain", "data.batch_size=7"]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if "│ data.batch_size " in row)
    assert [c.strip() for c in line.split("│")[1:5]] == ["data.batch_size", "7", "int", "144"]
    assert "2 entries" in out  # a list of mappings: counted, its keys have rows of their own

    def cells(key):
        line = next(row for row in out.splitlines() if f"│ {key} " in row)
        return [c.strip() for c in line.split("│")[1:5]]

    # a section the recipe sets is not shown as its null default; one it leaves out has no values (not its keys' defaults)
    assert cells("objective.wmr")[:2] == ["objective.wmr", "(set: its keys follow)"] and cells("objective.wmr.beta")[1] == "0.6"
    assert cli_main(["validate", str(recipe.parent / "mote_vitb16.yaml"), "--explain"]) == 0
    out = capsys.readouterr().out
    assert cells("data.synthetic.frames")[1:4] == ["", "int", "32"] and cells("data.few_shot.seed")[1] == ""
    assert cells("data.batch_size")[1] == "144"


@pytest.mark.parametrize("columns", [None, "90", "80"])
def test_validate_explain_never_wraps_a_key(capsys, monkeypatch, columns):
    """Piped (160 columns) 'data.few_shot.repeat_to_full' was cut into 'data.few_shot.repeat_to_f' / 'ull': grep missed it."""
    from pathlib import Path

    from mergekit_video.cli.main import main as cli_main
    from mergekit_video.config.schema import explain_schema
    from mergekit_video.runners.schema import SCHEMAS

    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "fewshot_ucf101.yaml"
    assert cli_main(["validate", str(recipe), "--explain"]) == 0
    out = capsys.readouterr().out.splitlines()
    if columns is None:  # a table
        keys = [line.split("│")[1].strip() for line in out if line.startswith("│")]
    else:  # too narrow for six columns (they folded every word): a record per key, its first line 'key = value'
        assert max(len(line) for line in out) <= int(columns) and out[0].startswith("keys of the 'mote' runner")
        ok = next(i for i, line in enumerate(out) if line.startswith("ok "))  # the verdict after the records
        keys = [line.split(" = ")[0] for line in out[1:ok] if not line.startswith(" ")]
        assert "data.batch_size = 64" in out and "    type: int; default: 144; allowed: >= 1" in out
    assert "data.few_shot.repeat_to_full" in keys and "eval.datasets.*.splits.*.class_csv" in keys
    assert set(keys) - {"", "key"} == {r["key"] for r in explain_schema(SCHEMAS["mote"])}  # none cut: each a whole key


def test_one_cross_check_problem_does_not_hide_the_merge_and_router_dry_runs(capsys):
    """A ties entry in eval.compare.merges (refused for MoTE experts) hid every merge and router argument problem."""
    from pathlib import Path

    from mergekit_video.cli.main import main as cli_main

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    assert cli_main(["validate", str(recipe), "eval.compare.merges=[{name: ties}]", "model.router_kwargs={temperatur: 1}",
                     "model.merge=temperature_softmax", "model.merge_kwargs={tau: x}"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "is invalid (3 problems)" in err
    assert "- eval.compare.merges.0.name: 'ties' merges relative to a base model" in err
    assert "- model.merge_kwargs: 'temperature_softmax' with {'tau': 'x'} cannot merge 4 experts" in err
    assert "- model.router_kwargs: 'multinomial' with {'temperatur': 1} for 4 experts: router 'multinomial' got an unexpected argument 'temperatur'" in err


def test_evaluate_recipes_take_the_readers_backend_and_time_limit(tmp_path, capsys):
    """data.read_timeout_s was an unknown key for evaluate/compare recipes: a hung file always cost the fixed 60 s."""
    from mergekit_video.cli.main import main as cli_main

    recipe = tmp_path / "ev.yaml"
    recipe.write_text("runner: evaluate\noutput_dir: out\ncheckpoint: model\neval:\n  datasets:\n"
                      "    - {name: a, kind: close_set, root: /d, list: /d/a.txt, class_csv: /d/c.csv}\n")
    assert cli_main(["validate", str(recipe), "data.read_timeout_s=3", "data.backend=pyav"]) == 0
    assert cli_main(["validate", str(recipe), "data.read_timeout_s=0"]) == 1
    assert "- data.read_timeout_s: must be > 0" in " ".join(capsys.readouterr().err.split())


def test_validate_refuses_values_the_run_would_refuse_only_after_building_the_model(capsys):
    """Defects from a fuzz of the recipe keys: each passed validate and the run died later (after writing the data and
    building the model; an --overwrite run had deleted the earlier outputs first) or with a message naming nothing:
    prompts with other format fields ("error: 'x'"), data.backend=frames over video lists, frames lists with synthetic
    data, a frame size the CLIP architecture does not take, eval.clip_blend without weights, a WMR τ table past float range ("OverflowError: int too large to convert to float"), an expert count the dry run
    could not allocate, and a list as the runner ("unhashable type: 'list'")."""
    from pathlib import Path

    from mergekit_video.cli.main import main as cli_main

    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")
    cases = [
        ("text.templates=['a {} {x}']", "- text.templates.0: 'a {} {x}' cannot be filled with a class name (field {x}): one '{}' "
                                         "for the class name, and other braces doubled ('{{' and '}}')"),
        ("text.templates=['a {} video {}']", "- text.templates.0: 'a {} video {}' cannot be filled with a class name "
                                             "(Replacement index 1 out of range for positional args tuple)"),
        ("text.templates=['a {} }']", "(Single '}' encountered in format string)"),
        ("data.list_format=frames", "- data.list_format: frames, but data.synthetic writes mp4 files with video lists"),
        ("objective.wmr.num_powers=2000", "- objective.wmr.num_powers: must be <= 64, got 2000"),
        ("model.num_experts=1000000000000", "- model.num_experts: must be <= 1024, got 1000000000000"),
        ("model.num_positions=1000000000000", "- model.num_positions: must be <= 4096, got 1000000000000"),
        ("runner=[mote]", "key 'runner' must be one of mote, evaluate, compare, got ['mote'] (did you mean 'mote'?)"),
        ("data.input_size=36", "- data.input_size: 36, but mergevid-tiny-vit's visual tower takes 32x32 frames (set "
                               "data.input_size=32 or leave it unset)"),
        ("eval.clip_blend=0.5", "- eval.clip_blend: blends the fine-tuned CLIP with the pretrained weights it started from, "
                                "but model.pretrained is null (random weights)"),
    ]
    for override, said in cases:
        assert cli_main(["validate", recipe, override]) == 1, override
        assert said in " ".join(capsys.readouterr().err.split()), override
    assert cli_main(["validate", recipe, "data.backend=frames"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "(3 problems)" in err
    assert "- data.backend: frames reads frame folders, but data.list_format is video" in err
    assert "- eval.datasets.1.list_format: video, but data.backend is frames (frame folders)" in err
    assert cli_main(["validate", recipe, "text.templates=['a {{tiny}} {}']"]) == 0  # doubled braces are literal
    assert cli_main(["validate", recipe, "eval.clip_blend=0.5", "eval.clip_blend_weights=bogus"]) == 1
    assert ("- eval.clip_blend_weights: 'bogus' is neither an open_clip pretrained tag for mergevid-tiny-vit nor a file"
            in " ".join(capsys.readouterr().err.split()))
