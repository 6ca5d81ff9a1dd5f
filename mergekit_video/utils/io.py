"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename.

A crash or Ctrl-C mid-write leaves the previous file intact, never a truncated one. A kill before
the rename leaves the temp file (``.NAME.<pid>-<host>.XXXXXXXX.tmp``), which names its writer so that
the next writer of ``NAME`` can remove it once that process is gone (:func:`remove_stale_atomic_temps`,
:func:`is_stale_temp`). What is
renamed into place gets the permission bits a plain ``os.open(path, O_CREAT | O_EXCL | O_WRONLY,
0o666)`` / ``os.mkdir(path, 0o777)`` gives a new file / folder in the destination folder, as the
kernel reports them for a probe made there (:func:`creation_modes`): ``0o666 & ~umask`` /
``0o777 & ~umask`` in a plain folder, and what the folder's default POSIX ACL dictates where it has
one (the umask is then ignored, and the ACL mask entry ends as ``open()`` leaves it, so named
user/group entries inherited from the default ACL stay effective). Temp files and folders are
created 0600 / 0700, and writers such as safetensors' ``save_file`` replace the file they are
given with a fresh 0600 one, hence the chmod before the rename.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` when the block succeeds.

    With ``overwrite=False`` an existing ``path`` raises ``FileExistsError`` before anything is written.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{temp_owner()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # after the writer (it may have replaced the file), before the rename: the mode open() gives there
        apply_default_modes(tmp_path)
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# ----------------------------------------------------------------------------------------------
# Temp files and folders left by killed writers
# ----------------------------------------------------------------------------------------------
#: A temp file or folder whose name does not tell its writer (older names, another host's) and that
#: was not modified for this long was left by a killed process.
STALE_TEMP_S = 600.0

#: The writer part of temp names (:func:`temp_owner`), as a regular expression with groups ``pid`` and ``host``.
TEMP_OWNER_PATTERN = r"(?P<pid>[0-9]+)-(?P<host>[0-9a-f]{8})"

_HOST_TAG: str | None = None


def _host_tag() -> str:
    global _HOST_TAG
    if _HOST_TAG is None:
        _HOST_TAG = hashlib.sha1(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return _HOST_TAG


def temp_owner() -> str:
    """``{pid}-{host}`` (host: 8 hex digits of a hash of the host name), put into the names of temp files
    and folders so that a later process can tell one whose writer is gone (:func:`is_stale_temp`)."""
    return f"{os.getpid()}-{_host_tag()}"


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (unix seconds, to about a second) from ``/proc``; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat", encoding="ascii") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in clock ticks after boot
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _writer_runs(pid: int, since: float) -> bool:
    """Whether process ``pid`` of this host may be the writer of an entry last modified at ``since``: it runs,
    and (where ``/proc`` tells) started before that time (a process that started later reuses the pid)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        pass
    start = _process_start(pid)
    return start is None or start <= since + 2.0  # /proc's boot time has whole seconds


def is_stale_temp(path: str | os.PathLike, pid: str | int | None = None, host: str | None = None, *, max_age: float = STALE_TEMP_S) -> bool:
    """Whether the temp file or folder ``path`` was left by a writer that is gone.

    ``pid`` and ``host`` are its writer's, as :func:`temp_owner` put them into its name: on this host, it
    is stale once that process no longer runs (or the pid now belongs to a process that started after the
    entry was last modified). Without them (older names) or from another host (a shared file system), it is
    stale when not modified for ``max_age`` seconds.
    """
    try:
        mtime = os.lstat(path).st_mtime
    except OSError:
        return False
    if pid is not None and host == _host_tag():
        return not _writer_runs(int(pid), mtime)
    return time.time() - mtime > max_age


def atomic_temp_pattern(path: str | os.PathLike) -> re.Pattern[str]:
    """The names of the temp files that :func:`atomic_path` (and the writers built on it) make for ``path``:
    ``.{name}.{pid}-{host}.XXXXXXXX.tmp`` (before the writer was named: ``.{name}.XXXXXXXX.tmp``)."""
    return re.compile(rf"^\.{re.escape(Path(path).name)}\.(?:{TEMP_OWNER_PATTERN}\.)?[a-z0-9_]{{8}}\.tmp$")


def remove_stale_atomic_temps(path: str | os.PathLike, *, max_age: float = STALE_TEMP_S) -> list[Path]:
    """Remove the temp files that atomic writes of ``path`` killed before their rename left beside it
    (see :func:`is_stale_temp`: those of a writer that still runs are kept); return what was removed."""
    path = Path(path)
    pattern = atomic_temp_pattern(path)
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or not entry.is_file(follow_symlinks=False):
            continue
        if is_stale_temp(entry.path, m["pid"], m["host"], max_age=max_age):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(Path(entry.path))
    return removed


def _umask_from_proc() -> int | None:
    """The umask from ``/proc/self/status`` (Linux >= 4.7), or None where that is unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_at_import() -> int:
    # Only reached where /proc gives no umask. os.umask() can only be read by setting it, so it is
    # set and restored once, here at import (under the import lock, before this module's writers
    # can run), never per write: a set/restore pair per call would let another thread create a
    # file under the temporary umask.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# /proc/self/status is read on every call: it reads the umask without changing it (thread-safe)
# and follows later os.umask() changes; the import-time value is the fallback elsewhere (macOS).
_IMPORT_UMASK = None if _umask_from_proc() is not None else _umask_at_import()


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status``; else the value at import)."""
    mask = _umask_from_proc()
    return mask if mask is not None else (_IMPORT_UMASK if _IMPORT_UMASK is not None else _umask_at_import())


def creation_modes(folder: str | os.PathLike) -> tuple[int, int]:
    """``(file_mode, folder_mode)``: the permission bits (``0o777`` part) that a plain
    ``os.open(p, O_CREAT | O_EXCL | O_WRONLY, 0o666)`` / ``os.mkdir(p, 0o777)`` gives a new entry in ``folder``.

    Measured by a probe: a uniquely named hidden file and folder (``.mergevid-mode-probe-<random>``,
    created with ``O_EXCL`` / ``mkdir``, so never an existing entry) are made in ``folder``, stat'ed and
    removed in ``finally`` blocks. This follows whatever the kernel applies, the umask or the folder's
    default POSIX ACL (which overrides the umask). The result is cached per process, keyed on the
    folder's ``st_dev``/``st_ino``, the current umask and the folder's ``system.posix_acl_default``
    bytes (one ``stat`` + ``getxattr`` per call), so a changed umask or default ACL is probed again;
    other ACL kinds (NFSv4) changed on an already probed folder are not noticed. Where no probe can be
    made (missing or read-only folder), the umask rule ``(0o666 & ~umask, 0o777 & ~umask)`` is returned,
    uncached.
    """
    mask = current_umask()
    fallback = (0o666 & ~mask, 0o777 & ~mask)
    folder = os.fspath(folder)
    try:
        st = os.stat(folder)
    except OSError:
        return fallback
    key = (st.st_dev, st.st_ino, mask, _default_acl(folder))
    modes = _MODES_CACHE.get(key)
    if modes is None:
        try:
            modes = _probe_modes(folder)
        except OSError:
            return fallback
        if len(_MODES_CACHE) >= _MODES_CACHE_SIZE:
            _MODES_CACHE.clear()  # a process writing into very many folders: start over, stay bounded
        _MODES_CACHE[key] = modes
    return modes


_PROBE_PREFIX = ".mergevid-mode-probe-"
_MODES_CACHE: dict[tuple, tuple[int, int]] = {}
_MODES_CACHE_SIZE = 1024


def _default_acl(folder: str) -> bytes | None:
    """The folder's default POSIX ACL (b"" when it has none), or None where xattrs are unsupported."""
    if not hasattr(os, "getxattr"):
        return None
    try:
        return os.getxattr(folder, "system.posix_acl_default")
    except OSError as exc:
        return b"" if exc.errno == errno.ENODATA else None


def _probe_modes(folder: str) -> tuple[int, int]:
    """Create, stat and remove a probe file and folder in ``folder`` (OSError when it cannot)."""
    path, fd = _create_unique(folder, lambda p: os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o666))
    try:
        try:
            file_mode = stat.S_IMODE(os.fstat(fd).st_mode) & 0o777
        finally:
            os.close(fd)
    finally:
        _remove(path, os.unlink)
    path, _ = _create_unique(folder, lambda p: os.mkdir(p, 0o777))
    try:
        dir_mode = stat.S_IMODE(os.lstat(path).st_mode) & 0o777
    finally:
        _remove(path, os.rmdir)
    return file_mode, dir_mode


def _create_unique(folder: str, create: Callable[[str], Any]) -> tuple[str, Any]:
    """``create(path)`` on a fresh random probe name in ``folder``; a name that exists is never touched."""
    for _ in range(100):
        path = os.path.join(folder, _PROBE_PREFIX + secrets.token_hex(8))
        try:
            return path, create(path)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free probe name in {folder}")


def _remove(path: str, remove: Callable[[str], None]) -> None:
    try:
        remove(path)
    except FileNotFoundError:
        pass


def default_file_mode(folder: str | os.PathLike | None = None) -> int:
    """The permission bits a plain ``open(path, "w")`` gives a new file in ``folder`` (:func:`creation_modes`);
    without ``folder``, the umask rule ``0o666 & ~umask`` (what it gives in a folder without a default ACL)."""
    return creation_modes(folder)[0] if folder is not None else 0o666 & ~current_umask()


def default_dir_mode(folder: str | os.PathLike | None = None) -> int:
    """The permission bits a plain ``os.mkdir(path)`` gives a new folder in ``folder`` (:func:`creation_modes`);
    without ``folder``, the umask rule ``0o777 & ~umask`` (what it gives in a folder without a default ACL)."""
    return creation_modes(folder)[1] if folder is not None else 0o777 & ~current_umask()


def apply_default_modes(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a folder, everything under it) the modes ``open()`` / ``mkdir()`` give in its parent.

    For what was written under a temporary name next to its destination (``mkstemp``: 0600,
    ``mkdtemp``: 0700, or a writer that made its own file) and is about to be renamed into place
    there. The modes are :func:`creation_modes` of ``path``'s parent folder, used at every depth
    (a new subfolder inherits its parent's default ACL, so nested entries get the same modes).
    ``chmod`` also sets the owner/mask/other entries of an inherited access ACL, which then equals
    what a plain ``open()`` / ``mkdir()`` there gives. Symlinks are left alone; a folder keeps its
    set-group-ID bit (inherited from a setgid parent, as ``mkdir()`` would).
    """
    root = Path(path)
    file_mode, dir_mode = creation_modes(os.path.dirname(os.path.abspath(root)))
    st = os.lstat(root)
    if stat.S_ISDIR(st.st_mode):
        os.chmod(root, dir_mode | (st.st_mode & stat.S_ISGID))
        for parent, dirs, files in os.walk(root):
            for name in dirs:
                sub = os.path.join(parent, name)
                sst = os.lstat(sub)
                if stat.S_ISDIR(sst.st_mode):
                    os.chmod(sub, dir_mode | (sst.st_mode & stat.S_ISGID))
            for name in files:
                sub = os.path.join(parent, name)
                if stat.S_ISREG(os.lstat(sub).st_mode):
                    os.chmod(sub, file_mode)
    elif stat.S_ISREG(st.st_mode):
        os.chmod(root, file_mode)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], Any], *, overwrite: bool = True) -> Path:
    """Call ``writer(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        writer(tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Atomically write a text file (UTF-8)."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), overwrite=overwrite)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, overwrite: bool = True, indent: int = 2) -> Path:
    """Atomically write ``obj`` as pretty JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n", overwrite=overwrite)


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None, *, overwrite: bool = True) -> Path:
    """Atomically write a safetensors file (tensors are made contiguous and moved to CPU)."""
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def write(p: Path) -> None:
        try:
            save_file(flat, str(p), metadata=metadata)
        except Exception as exc:  # noqa: BLE001 - safetensors' own error (a full disk: "I/O error ... os error 28")
            raise OSError(f"could not write {path} ({type(exc).__name__}: {exc})") from exc

    return atomic_write(path, write, overwrite=overwrite)


def read_safetensors(path: str | os.PathLike, *, device: str = "cpu") -> dict:
    """The tensors of a safetensors file; an unreadable (truncated, foreign) file is a ValueError naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for bad files
        raise ValueError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from exc


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (symlinks resolved)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


_renameat2: Any = None


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    C library, kernel or file system does not offer it (the caller then falls back to two renames)."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        import ctypes

        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28, musl)
            _renameat2 = False
    if _renameat2 is False:
        return False
    import ctypes

    at_fdcwd, rename_exchange = -100, 2
    if _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False  # not supported here
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def file_checksum(path: str | os.PathLike, *, chunk: int = 1 << 24) -> str:
    """``crc32:<8 hex digits>`` of a file's bytes, read in 16 MiB chunks (2.5 GB/s from the page cache on a 2-core CPU)."""
    import zlib

    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return f"crc32:{crc:08x}"


def verify_checksum(path: str | os.PathLike, checksums: Mapping[str, str]) -> None:
    """Raise ``ValueError`` naming ``path`` when its bytes are not those recorded in ``checksums`` (file name ->
    :func:`file_checksum`); a file without a record (saved before checksums were recorded) is read unchecked."""
    path = Path(path)
    expected = checksums.get(path.name)
    if expected is None:
        return
    found = file_checksum(path)
    if found != expected:
        raise ValueError(f"{path} does not hold the bytes it was saved with (checksum {found}, saved {expected}): the file is damaged")
