"""Atomic writes end with the modes open()/mkdir() give in the destination folder (umask, default POSIX ACL);
lazy-export import errors reach the user."""

from __future__ import annotations

import errno
import importlib
import os
import stat
import struct
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from mergekit_video.config import ConfigError
from mergekit_video.config.components import resolve_component
from mergekit_video.utils import io as io_mod
from mergekit_video.utils.io import (
    apply_default_modes,
    atomic_path,
    atomic_save_safetensors,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    creation_modes,
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
    assert {p.name for p in out.iterdir()} == {"config.json", "clip.safetensors", "head.safetensors", "open_clip_config.json"}
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
# a folder with a default POSIX ACL: the kernel ignores the umask there, and so must we
# ---------------------------------------------------------------------------------------------
_UNDEF = 0xFFFFFFFF  # ACL_UNDEFINED_ID
_NAMED_UID = 54321  # a named user entry: chmod from the umask would zero the mask and disable it


def _set_default_acl(folder: Path) -> None:
    """``setfacl -d -m u::rwx,u:54321:rwx,g::rwx,m::rwx,o::--- folder`` via the xattr's binary form."""
    # (tag, perm, id): USER_OBJ 0x01, USER 0x02, GROUP_OBJ 0x04, MASK 0x10, OTHER 0x20; sorted by tag
    entries = [(0x01, 7, _UNDEF), (0x02, 7, _NAMED_UID), (0x04, 7, _UNDEF), (0x10, 7, _UNDEF), (0x20, 0, _UNDEF)]
    blob = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    if not hasattr(os, "setxattr"):
        pytest.skip("no os.setxattr on this platform: default POSIX ACLs cannot be set")
    try:
        os.setxattr(folder, "system.posix_acl_default", blob)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            pytest.skip(f"{folder}'s filesystem does not support default POSIX ACLs ({exc})")
        raise


def _acl(path: Path, kind: str) -> bytes | None:
    try:
        return os.getxattr(path, f"system.posix_acl_{kind}", follow_symlinks=False)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        raise


def _perms(path: Path) -> tuple[int, bytes | None, bytes | None]:
    """Mode bits, access ACL and default ACL: all that decides who may read/write the entry."""
    return (os.lstat(path).st_mode & 0o7777, _acl(path, "access"), _acl(path, "default") if path.is_dir() else None)


def test_default_acl_folder_gets_what_plain_open_and_mkdir_give(tmp_path, umask):
    from mergekit_video.training.checkpoint import CheckpointManager

    shared = tmp_path / "shared"
    shared.mkdir()
    _set_default_acl(shared)
    os.close(os.open(shared / "plain", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    os.mkdir(shared / "plaindir", 0o777)
    ref_file, ref_dir = _perms(shared / "plain"), _perms(shared / "plaindir")
    assert (ref_file[0], ref_dir[0]) == (0o660, 0o770)  # the ACL, not the umask, decides
    assert creation_modes(shared) == (0o660, 0o770)

    written = [
        atomic_write_json(shared / "a.json", {"k": 1}),
        atomic_save_safetensors(shared / "w.safetensors", {"w": torch.zeros(2)}),
        atomic_write(shared / "own.bin", lambda p: (p.unlink(), os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o600)))),
    ]
    assert {p.name: _perms(p) for p in written} == {p.name: ref_file for p in written}
    # a temp folder tree renamed into place (what save_model / CheckpointManager do)
    tmp = Path(tempfile.mkdtemp(dir=shared))
    (tmp / "inner").mkdir()
    (tmp / "inner" / "f").write_bytes(b"1")
    apply_default_modes(tmp)
    assert [_perms(tmp), _perms(tmp / "inner"), _perms(tmp / "inner" / "f")] == [ref_dir, ref_dir, ref_file]
    model = nn.Linear(2, 1)
    step = CheckpointManager(directory=shared / "ckpt").save(step=1, epoch=0, model_state=model.state_dict())
    assert _perms(step) == ref_dir
    assert {p.name: _perms(p) for p in step.iterdir()} == {p.name: ref_file for p in step.iterdir()}
    # the named user entry stays effective: the ACL mask entry is rw- / rwx, as open()/mkdir() leave it
    assert struct.pack("<HHI", 0x10, 6, _UNDEF) in ref_file[1] and struct.pack("<HHI", 0x10, 7, _UNDEF) in ref_dir[1]


class _Names:
    """Stands in for ``secrets`` in utils.io: hands out the given probe suffixes, then fresh ones; counts calls."""

    def __init__(self, first: list[str]):
        self.first, self.calls = list(first), 0

    def token_hex(self, n: int) -> str:
        self.calls += 1
        return self.first.pop(0) if self.first else os.urandom(n).hex()


def test_probe_leaves_nothing_behind_skips_existing_names_and_is_cached(tmp_path, monkeypatch):
    folder = tmp_path / "dest"
    folder.mkdir()
    # user entries that happen to carry the next probe names: never opened, chmod'ed or removed
    (folder / ".mergevid-mode-probe-taken1").write_text("mine")
    os.chmod(folder / ".mergevid-mode-probe-taken1", 0o604)
    (folder / ".mergevid-mode-probe-taken2").mkdir(mode=0o705)
    os.chmod(folder / ".mergevid-mode-probe-taken2", 0o705)
    before = {p.name: (os.lstat(p).st_mode, os.lstat(p).st_ino) for p in folder.iterdir()}
    names = _Names(["taken1", "free1", "taken2", "free2"])
    monkeypatch.setattr(io_mod, "secrets", names)
    monkeypatch.setattr(io_mod, "_MODES_CACHE", {})  # a reused inode may match an earlier test's folder
    old = os.umask(0o027)
    try:
        assert creation_modes(folder) == (0o640, 0o750)
        assert names.calls == 4  # file: taken1 then free1; folder: taken2 then free2
        assert {p.name: (os.lstat(p).st_mode, os.lstat(p).st_ino) for p in folder.iterdir()} == before
        assert (folder / ".mergevid-mode-probe-taken1").read_text() == "mine"
        assert creation_modes(folder) == (0o640, 0o750) and names.calls == 4  # cached: no new probe
        os.umask(0o022)
        assert creation_modes(folder) == (0o644, 0o755) and names.calls == 6  # a new umask: probed again
        _set_default_acl(folder)
        assert creation_modes(folder) == (0o660, 0o770) and names.calls == 8  # a new default ACL: probed again
    finally:
        os.umask(old)
    assert {p.name for p in folder.iterdir()} == set(before)


def test_probe_that_cannot_be_made_falls_back_to_the_umask_and_leaves_nothing(tmp_path, monkeypatch):
    folder = tmp_path / "dest"
    folder.mkdir()
    names = _Names([])
    monkeypatch.setattr(io_mod, "secrets", names)
    monkeypatch.setattr(io_mod, "_MODES_CACHE", {})
    real_mkdir = os.mkdir

    def refusing_mkdir(path, *args, **kwargs):
        if os.path.basename(path).startswith(".mergevid-mode-probe-"):
            raise PermissionError(errno.EACCES, "read-only", path)
        return real_mkdir(path, *args, **kwargs)

    old = os.umask(0o077)
    try:
        monkeypatch.setattr(os, "mkdir", refusing_mkdir)
        assert creation_modes(folder) == (0o600, 0o700)  # file probe made and removed, folder probe refused
        monkeypatch.setattr(os, "mkdir", real_mkdir)
        assert list(folder.iterdir()) == []
        assert creation_modes(tmp_path / "missing") == (0o600, 0o700)
        calls = names.calls
        assert creation_modes(folder) == (0o600, 0o700) and names.calls == calls + 2  # the fallback was not cached
    finally:
        os.umask(old)
    assert list(folder.iterdir()) == []


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
