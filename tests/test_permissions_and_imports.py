"""Atomic writes end with the modes open()/mkdir() give under the umask; lazy-export import errors reach the user."""

from __future__ import annotations

import importlib
import os
import stat
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from mergekit_video.config import ConfigError
from mergekit_video.config.components import resolve_component
from mergekit_video.utils.io import (
    apply_default_modes,
    atomic_path,
    atomic_save_safetensors,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    current_umask,
)

# umask -> (file mode, folder mode) that a plain open() / mkdir() give
MODES = {0o022: (0o644, 0o755), 0o077: (0o600, 0o700), 0o002: (0o664, 0o775)}


@pytest.fixture(params=sorted(MODES), ids=lambda m: f"umask{m:03o}")
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _tree_modes(root: Path) -> dict[str, int]:
    """Relative path -> permission bits, for ``root`` and everything under it."""
    return {str(p.relative_to(root.parent)): _mode(p) for p in [root, *sorted(root.rglob("*"))]}


def _expected(root: Path, file_mode: int, dir_mode: int) -> dict[str, int]:
    return {str(p.relative_to(root.parent)): dir_mode if p.is_dir() else file_mode for p in [root, *sorted(root.rglob("*"))]}


def test_current_umask_follows_os_umask_without_changing_it(umask):
    assert current_umask() == umask
    assert current_umask() == umask  # reading did not change it


def test_atomic_writers_give_files_the_mode_open_gives(tmp_path, umask):
    file_mode, _ = MODES[umask]
    paths = [
        atomic_save_safetensors(tmp_path / "w.safetensors", {"w": torch.arange(6.0).view(2, 3)}),
        atomic_write_text(tmp_path / "a.txt", "hi\n"),
        atomic_write_json(tmp_path / "sub" / "a.json", {"k": 1}),
        # a writer that replaces the temp file with its own 0600 one (as safetensors' save_file does)
        atomic_write(tmp_path / "own.bin", lambda p: (p.unlink(), os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o600)))),
    ]
    with atomic_path(tmp_path / "ctx.bin") as tmp:
        tmp.write_bytes(b"x")
    paths.append(tmp_path / "ctx.bin")
    reference = tmp_path / "plain.txt"
    reference.write_text("plain")  # what open() gives under this umask
    assert _mode(reference) == file_mode
    assert {p.name: _mode(p) for p in paths} == {p.name: file_mode for p in paths}
    assert _mode(tmp_path / "sub") == MODES[umask][1]  # the parent made by mkdir(parents=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left behind


def test_apply_default_modes_keeps_a_setgid_folder_bit_and_leaves_symlinks(tmp_path, umask):
    file_mode, dir_mode = MODES[umask]
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o2770)  # a group project folder: new folders inherit the setgid bit
    tmp = Path(tempfile.mkdtemp(dir=shared))
    (tmp / "inner").mkdir()
    (tmp / "inner" / "f").write_bytes(b"1")
    os.chmod(tmp / "inner" / "f", 0o600)
    target = tmp_path / "elsewhere"
    target.write_text("x")
    os.chmod(target, 0o640)
    (tmp / "link").symlink_to(target)
    apply_default_modes(tmp)
    assert os.lstat(tmp).st_mode & 0o7777 == stat.S_ISGID | dir_mode
    assert os.lstat(tmp / "inner").st_mode & 0o7777 == stat.S_ISGID | dir_mode
    assert _mode(tmp / "inner" / "f") == file_mode
    assert _mode(target) == 0o640  # the symlink's target is not touched


@pytest.fixture(scope="module")
def tiny_video_clip():
    from mergekit_video.models import build_video_clip

    torch.manual_seed(0)
    return build_video_clip(clip_name="mergevid-tiny-vit", temporal_layers=1, num_experts=2)


def test_save_model_folder_and_files_get_umask_modes(tmp_path, umask, tiny_video_clip):
    from mergekit_video.models.checkpoint import save_model

    file_mode, dir_mode = MODES[umask]
    out = save_model(tiny_video_clip, tmp_path / "model")
    assert {p.name for p in out.iterdir()} == {"config.json", "clip.safetensors", "head.safetensors"}
    assert _tree_modes(out) == _expected(out, file_mode, dir_mode)
    save_model(tiny_video_clip, out, overwrite=True)  # the replacing path (backup + rename) as well
    assert _tree_modes(out) == _expected(out, file_mode, dir_mode)


def test_trainer_checkpoint_folder_and_files_get_umask_modes(tmp_path, umask):
    from mergekit_video.training.checkpoint import CheckpointManager

    file_mode, dir_mode = MODES[umask]
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(2, 3)).sum().backward()
    opt.step()  # momentum buffers: an optimizer tensor file is written too
    mgr = CheckpointManager(directory=tmp_path / "checkpoints")
    step = mgr.save(step=1, epoch=0, model_state=model.state_dict(), optimizer=opt)
    mgr.update_state(1, metrics={"loss": 0.5})  # state.json rewritten atomically
    assert {p.name for p in step.iterdir()} >= {"model.safetensors", "state.json"}
    assert len([p for p in step.iterdir() if p.suffix == ".safetensors"]) == 2
    root = tmp_path / "checkpoints"
    assert _tree_modes(root) == _expected(root, file_mode, dir_mode)


# ---------------------------------------------------------------------------------------------
# an error raised while a lazily exported module imports is reported as itself
# ---------------------------------------------------------------------------------------------
_LAZY_INIT = '''
from mergekit_video.utils.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"build_ok": ".ok", "build_broken": ".broken", "build_needs": ".needs",
                                              "build_listed": ".ok"}, globals())
'''
_HAND_INIT = '''
import importlib

def __getattr__(name):
    if name == "build_broken":
        return importlib.import_module(__name__ + ".broken").build_broken
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
'''
_OK = "def build_ok(x=1):\n    return x\n"
_BROKEN = "import os\n\nDEFAULT = os.path.no_such_helper  # an import-time bug\n\ndef build_broken():\n    return 1\n"
_NEEDS = "import mergevid_surely_absent_dependency\n\ndef build_needs():\n    return 1\n"


@pytest.fixture
def make_package(tmp_path, monkeypatch):
    """Write a throwaway package under tmp_path (on sys.path); its modules are dropped afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    made: list[str] = []

    def make(name: str, files: dict[str, str]) -> str:
        (tmp_path / name).mkdir()
        for fname, text in files.items():
            (tmp_path / name / fname).write_text(text)
        importlib.invalidate_caches()
        made.append(name)
        return name

    yield make
    for mod in [m for m in sys.modules if m.split(".")[0] in made]:
        del sys.modules[mod]


def _chain(exc: BaseException) -> list[BaseException]:
    out = []
    while exc is not None:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def test_attribute_error_while_a_lazy_export_imports_names_the_real_cause(make_package):
    pkg = make_package("mkv_lazy_attr", {"__init__.py": _LAZY_INIT, "ok.py": _OK, "broken.py": _BROKEN, "needs.py": _NEEDS})
    with pytest.raises(ConfigError) as info:
        resolve_component(f"{pkg}.build_broken", path="model")
    msg = str(info.value)
    assert msg.startswith("model._component_: loading mkv_lazy_attr.build_broken failed: ImportError: ")
    assert "no_such_helper" in msg and "broken.py:3" in msg
    assert "did you mean" not in msg and "has no attribute 'build_broken'" not in msg
    # the original exception is chained, so --debug prints its traceback
    original = _chain(info.value)[-1]
    assert type(original) is AttributeError and original.name == "no_such_helper"
    assert original.__traceback__.tb_next is not None
    # the same for plain Python: hasattr() and from-imports no longer call it missing
    package = importlib.import_module(pkg)
    with pytest.raises(ImportError, match="no_such_helper"):
        hasattr(package, "build_broken")
    with pytest.raises(ImportError, match="no_such_helper"):
        exec(f"from {pkg} import build_broken", {})


def test_import_error_while_a_lazy_export_imports_names_the_missing_module(make_package):
    pkg = make_package("mkv_lazy_imp", {"__init__.py": _LAZY_INIT, "ok.py": _OK, "broken.py": _BROKEN, "needs.py": _NEEDS})
    with pytest.raises(ConfigError, match=r"model\._component_: loading mkv_lazy_imp\.build_needs failed: "
                                          r"ModuleNotFoundError: No module named 'mergevid_surely_absent_dependency'") as info:
        resolve_component(f"{pkg}:build_needs", path="model")
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_missing_lazy_names_still_get_did_you_mean(make_package):
    pkg = make_package("mkv_lazy_miss", {"__init__.py": _LAZY_INIT, "ok.py": _OK, "broken.py": _BROKEN, "needs.py": _NEEDS})
    assert resolve_component(f"{pkg}.build_ok")(x=3) == 3
    with pytest.raises(ConfigError, match=r"'mkv_lazy_miss' has no attribute 'build_okk' .*did you mean 'build_ok'"):
        resolve_component(f"{pkg}.build_okk", path="model")
    assert hasattr(importlib.import_module(pkg), "build_okk") is False
    # a table entry whose module lacks the name is a packaging bug, reported as such
    with pytest.raises(ConfigError, match=r"build_listed is exported from 'mkv_lazy_miss\.ok', which failed to provide it"):
        resolve_component(f"{pkg}.build_listed", path="model")


def test_hand_written_module_getattr_errors_are_not_reported_as_missing(make_package):
    pkg = make_package("mkv_hand", {"__init__.py": _HAND_INIT, "broken.py": _BROKEN})
    with pytest.raises(ConfigError) as info:
        resolve_component(f"{pkg}.build_broken", path="model")
    assert str(info.value).startswith("model._component_: loading mkv_hand.build_broken failed: AttributeError: ")
    assert "no_such_helper" in str(info.value)
    assert type(info.value.__cause__) is AttributeError
    with pytest.raises(ConfigError, match=r"'mkv_hand' has no attribute 'build_other'"):
        resolve_component(f"{pkg}.build_other", path="model")


def test_real_lazy_package_and_instantiate_report_import_time_bug(monkeypatch):
    """The audit's case: an import-time AttributeError inside mergekit_video.models.<module>."""
    import mergekit_video.models as models
    from mergekit_video.config import instantiate

    monkeypatch.delitem(models.__dict__, "build_video_clip", raising=False)  # not yet resolved
    real_import = importlib.import_module

    def failing_import(name, package=None):
        if name == "mergekit_video.models.video_clip":
            raise AttributeError("module 'torch.nn' has no attribute 'NoSuchLayer'", name="NoSuchLayer", obj=torch.nn)
        return real_import(name, package)

    monkeypatch.setattr(importlib, "import_module", failing_import)
    with pytest.raises(ConfigError) as info:
        instantiate({"_component_": "mergekit_video.models.build_video_clip"}, _path="model")
    monkeypatch.setattr(importlib, "import_module", real_import)
    msg = str(info.value)
    assert "NoSuchLayer" in msg and "did you mean" not in msg
    assert any(type(e) is AttributeError and e.name == "NoSuchLayer" for e in _chain(info.value))
    assert callable(resolve_component("mergekit_video.models.build_video_clip"))  # fine again once fixed
