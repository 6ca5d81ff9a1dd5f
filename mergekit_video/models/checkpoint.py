"""Saving, loading and dense export of VideoCLIP models.

A model directory holds

- ``config.json``: rebuilds the architecture without any recipe;
- ``clip.safetensors``: the open_clip model with open_clip's own keys (loads into
  ``open_clip.create_model(name)``);
- ``head.safetensors``: the temporal head (with ``source_class_features``).

State-dict entries that are not tensors (a stateful router's ``_extra_state``) are kept in
``config.json`` under ``non_tensor_state``.

:func:`load` also reads trainer checkpoints, whose ``model.safetensors`` holds the same
tensors under ``clip.`` / ``head.`` prefixes and whose ``state.json`` carries the config.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..experts import find_containers
from ..merging import is_output_space
from ..surgery import collapse_experts
from ..utils import io as uio
from ..utils.io import TEMP_OWNER_PATTERN, _fsync_dir, apply_default_modes, atomic_write_json, is_stale_temp, temp_owner
from .video_clip import CONFIG_FORMAT, VideoCLIP, import_model_plugins, video_clip_from_config

CONFIG_FILE = "config.json"
NON_TENSOR_KEY = "non_tensor_state"
CHECKSUMS_KEY = "checksums"  # config.json: CRC32 of each tensor file, checked on load
CLIP_FILE = "clip.safetensors"
HEAD_FILE = "head.safetensors"
MODEL_FILE = "model.safetensors"
#: open_clip's own folder config (``open_clip.create_model('local-dir:FOLDER')``), written beside
#: ``clip.safetensors`` when the visual and text towers hold no experts.
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"

log = logging.getLogger(__name__)


def _natural(key: str) -> list:
    """Sort key that puts ``resblocks.2`` before ``resblocks.10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", key)]


def key_summary(keys: Any, *, limit: int = 3) -> str:
    """The first ``limit`` keys (natural order), quoted, and how many more: ``'a', 'b' (and 5 more)``."""
    keys = sorted(keys, key=_natural)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def state_mismatches(
    expected: dict[str, tuple[int, ...] | None], found: dict[str, tuple[int, ...] | None], *, any_rows: frozenset[str] = frozenset()
) -> tuple[list[str], list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """(missing keys, unexpected keys, [(key, found shape, expected shape)]) of a state dict against the one a
    model expects, both given as key → shape (None: a non-tensor entry, whose shape is not compared). The keys
    in ``any_rows`` may have another first dimension (data, not architecture: the source class count)."""
    missing = sorted(set(expected) - set(found), key=_natural)
    unexpected = sorted(set(found) - set(expected), key=_natural)
    wrong = []
    for k in sorted(set(expected) & set(found), key=_natural):
        want, got = expected[k], found[k]
        if want is None or got is None or got == want:
            continue
        if k in any_rows and len(got) == len(want) and got[1:] == want[1:]:
            continue
        wrong.append((k, got, want))
    return missing, unexpected, wrong


def describe_mismatches(missing: list[str], unexpected: list[str], wrong: list[tuple[str, tuple[int, ...], tuple[int, ...]]], *, limit: int = 3) -> str:
    """One clause per kind of mismatch, e.g. ``lacks 2 tensors ('a', 'b'); has 1 tensor of another shape ('c' [10], expected [64])``."""
    parts = []
    if missing:
        parts.append(f"lacks {len(missing)} tensor{'s' * (len(missing) != 1)} ({key_summary(missing, limit=limit)})")
    if unexpected:
        parts.append(f"has {len(unexpected)} unexpected tensor{'s' * (len(unexpected) != 1)} ({key_summary(unexpected, limit=limit)})")
    if wrong:
        shown = ", ".join(f"{k!r} {list(got)}, expected {list(want)}" for k, got, want in wrong[:limit])
        more = f" (and {len(wrong) - limit} more)" if len(wrong) > limit else ""
        parts.append(f"has {len(wrong)} tensor{'s' * (len(wrong) != 1)} of another shape ({shown}{more})")
    return "; ".join(parts)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, *, destination: Path) -> None:
    """Write ``tensors`` to ``path`` (in the temp folder of a save of ``destination``, which errors name)."""
    from safetensors.torch import save_file

    seen: dict[int, str] = {}
    flat = {}
    for k, v in tensors.items():
        t = v.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:  # tied tensors: store an independent copy
            t = t.clone()
        elif ptr is not None:
            seen[ptr] = k
        flat[k] = t.contiguous()
    try:
        save_file(flat, str(path), metadata=metadata)
    except Exception as exc:  # noqa: BLE001 - safetensors' own error (a full disk: "I/O error ... os error 28")
        raise OSError(f"could not write {destination / path.name} ({type(exc).__name__}: {exc}); nothing was "
                      f"replaced at {destination}") from exc


#: A temp folder of save_model whose name does not tell its writer (older ones, another host's) and that
#: was untouched for this long was left by a killed process.
STALE_TEMP_S = 600.0


def _temp_dir_pattern(directory: Path) -> re.Pattern[str]:
    """The temp folders of saves of ``directory``: ``.<name>.mergevid-tmp-<pid>-<host>-XXXXXXXX`` (the
    writer: :func:`~mergekit_video.utils.io.temp_owner`), before that ``.<name>.mergevid-tmp-XXXXXXXX``."""
    return re.compile(rf"^\.{re.escape(directory.name)}\.mergevid-tmp-(?:{TEMP_OWNER_PATTERN}-)?[a-z0-9_]{{8}}$")


def _remove_stale_temp_dirs(directory: Path) -> None:
    """Remove the temp folders that saves of ``directory`` killed midway left behind (one model's size
    each): those whose writer, named in the folder name, no longer runs on this host; those that do not
    name one (or another host's) once untouched for :data:`STALE_TEMP_S` seconds. A folder of a save still
    running is left alone (see :func:`~mergekit_video.utils.io.is_stale_temp`)."""
    pattern = _temp_dir_pattern(directory)
    for p in directory.parent.iterdir():
        m = pattern.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and is_stale_temp(p, m["pid"], m["host"], max_age=STALE_TEMP_S):
            shutil.rmtree(p, ignore_errors=True)


def _backup_pattern(directory: Path) -> re.Pattern[str]:
    """The names of the backups that the two-rename fallback of an overwriting save of ``directory`` makes:
    ``.<name>.mergevid-old-<pid>-<host>-XXXXXXXX`` (the writer: :func:`~mergekit_video.utils.io.temp_owner`).
    Only folders of this name are ever restored or removed: a user's ``.<name>.old`` is not one."""
    return re.compile(rf"^\.{re.escape(directory.name)}\.mergevid-old-{TEMP_OWNER_PATTERN}-[0-9a-f]{{8}}$")


def _new_backup(directory: Path) -> Path:
    """A fresh backup name for this save (:func:`_backup_pattern`), one that names no existing entry."""
    while True:
        backup = directory.with_name(f".{directory.name}.mergevid-old-{temp_owner()}-{secrets.token_hex(4)}")
        if not os.path.lexists(backup):
            return backup


def _stale_backups(directory: Path) -> list[Path]:
    """The backups of saves of ``directory`` whose writer is gone (killed between its two renames), newest first.
    A backup of a save still running is left alone (see :func:`~mergekit_video.utils.io.is_stale_temp`)."""
    pattern = _backup_pattern(directory)
    found = []
    try:
        entries = list(os.scandir(directory.parent))
    except OSError:
        return []
    for entry in entries:
        m = pattern.match(entry.name)
        if m and entry.is_dir(follow_symlinks=False) and is_stale_temp(entry.path, m["pid"], m["host"], max_age=STALE_TEMP_S):
            found.append(Path(entry.path))
    return sorted(found, key=lambda b: os.lstat(b).st_ctime, reverse=True)


def _restore_interrupted_replace(directory: Path) -> None:
    """A backup (:func:`_backup_pattern`) without ``NAME`` is the previous model of a save killed between its two
    renames: put it back."""
    if os.path.lexists(directory):
        return
    backups = _stale_backups(directory)
    if backups:
        os.replace(backups[0], directory)
        log.warning("restored %s from %s, left by a save with overwrite that was interrupted", directory, backups[0].name)


def _refuse_symlink(directory: Path) -> None:
    """A model folder given as a symbolic link is refused: replacing it would move the link, not the folder."""
    if directory.is_symlink():
        raise FileExistsError(f"{directory} is a symbolic link (to {os.readlink(directory)}); give the folder itself or another path")


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def replaceable_model_folder_problem(directory: str | os.PathLike) -> str | None:
    """Why ``directory`` may not be replaced by a saved model even when asked (None when it may): it
    exists, is not empty and is not a saved model (no ``config.json``): a run's folder, a dataset, the
    working folder. Overwriting replaces a model folder as a whole, so only a model folder is replaced."""
    directory = Path(directory)
    if not directory.is_dir() or _is_saved_model_config(directory / CONFIG_FILE):
        return None
    try:
        entries = sorted(p.name for p in directory.iterdir())
    except OSError:
        return None
    if not entries:
        return None
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    return (f"{directory} holds {shown} but is not a saved model folder (no mergekit_video {CONFIG_FILE}); overwriting replaces a "
            "model folder as a whole, so only a model folder is replaced: choose a new path, or an earlier export's folder")


def _is_saved_model_config(path: Path) -> bool:
    """Whether ``path`` is the ``config.json`` of a saved mergekit_video model (its ``format`` entry), not any config.json."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == CONFIG_FORMAT


def refuse_unsaved_merge_base(model: VideoCLIP) -> None:
    """A container whose merge needs a base (kept in memory by add_experts, not in the state dict) cannot be saved as is."""
    from ..experts import find_containers
    from ..merging import requires_base

    for name, c in find_containers(model):
        if requires_base(c.merge):
            raise ValueError(
                f"{name} merges its experts with {c.merge!r}, relative to a base model that a saved model does not "
                "store (load() would merge relative to a fresh initialisation): set a merge without a base first "
                "(set_merge('mean') on the containers, or build the model with merge='mean'), or save the collapsed "
                "model (export_dense) with this merge"
            )


def save_model(model: VideoCLIP, directory: str | os.PathLike, *, overwrite: bool = False, extra_config: dict[str, Any] | None = None,
               own_folder: bool = False) -> Path:
    """Write ``model`` to ``directory`` atomically (temp dir, then rename).

    An existing directory is only replaced with ``overwrite=True``: in one atomic exchange where the
    platform offers one (Linux ``renameat2``), else by two renames through a backup
    ``.NAME.mergevid-old-<pid>-<host>-XXXXXXXX`` (no other name is taken for one: a user's ``.NAME.old``
    is never touched). A backup left by a save killed between those renames is restored first
    (``NAME`` missing) or removed after the save (``NAME`` present). A ``directory`` that is a
    symbolic link is refused before anything is written (``FileExistsError``). So is a model whose
    experts merge relative to a base (``ties``, ``dare``, ``task_arithmetic``): the base is not saved,
    and the loaded model would merge relative to a fresh initialisation (``ValueError``).
    """
    directory = Path(directory)
    refuse_unsaved_merge_base(model)
    _refuse_symlink(directory)
    _restore_interrupted_replace(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file, not a model folder; remove it or choose another path")
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True (--overwrite) to replace it")
    problem = None if own_folder else replaceable_model_folder_problem(directory)
    if problem is not None:  # own_folder: a run's own model/ (whatever a damaged earlier save left there)
        raise FileExistsError(problem)
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.mergevid-tmp-{temp_owner()}-", dir=directory.parent))
    try:
        from ..utils.state_json import StateEncoder, split_tensors

        config = model.config
        if extra_config:
            config.update(extra_config)
        clip_tensors, clip_other = split_tensors(model.clip.state_dict())
        head_tensors, head_other = split_tensors(model.head.state_dict())
        _save_tensors(tmp / CLIP_FILE, clip_tensors, {"format": "open_clip"}, destination=directory)
        _save_tensors(tmp / HEAD_FILE, head_tensors, {"format": "mergekit_video/temporal_head"}, destination=directory)
        other = {part: StateEncoder(inline=True, what=part).encode(state) for part, state in (("clip", clip_other), ("head", head_other)) if state}
        from ..utils.io import file_checksum

        checksums = {name: file_checksum(tmp / name) for name in (CLIP_FILE, HEAD_FILE)}
        atomic_write_json(tmp / CONFIG_FILE, {**config, **({NON_TENSOR_KEY: other} if other else {}), CHECKSUMS_KEY: checksums})
        if not find_containers(model.clip) and isinstance(config.get("clip", {}).get("model_cfg"), dict):
            atomic_write_json(tmp / OPEN_CLIP_CONFIG_FILE, open_clip_folder_config(config["clip"]))
        apply_default_modes(tmp)  # mkdtemp's 0700 and save_file's 0600 -> what mkdir()/open() give
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _refuse_symlink(directory)  # made meanwhile
        backup = None
        if not os.path.lexists(directory):
            os.replace(tmp, directory)
        elif not uio.exchange_paths(tmp, directory):  # exchanged: tmp holds the previous model, removed below
            backup = _new_backup(directory)
            os.replace(directory, backup)
            try:
                os.replace(tmp, directory)
            except BaseException:
                os.replace(backup, directory)  # the previous model stays
                raise
        _fsync_dir(directory.parent)
        for old in [backup] if backup is not None else []:
            _remove_path(old)  # this save's
        for old in _stale_backups(directory):
            _remove_path(old)  # left beside a complete model by a save killed after its renames
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    model.config = config
    return directory


def _read_json(path: Path) -> Any:
    """The JSON in ``path``; an unreadable or malformed file is an error that names it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); restore it from a copy, or re-export the model") from None


#: The head config's keys (``TemporalHead`` arguments) → the JSON types they take; the first three are required.
_HEAD_KEYS: dict[str, tuple[type, ...]] = {
    "width": (int,), "layers": (int,), "num_experts": (int,), "heads": (int, type(None)), "num_positions": (int,),
    "router": (str,), "router_kwargs": (dict,), "expert_init": (str,), "merge": (str,), "merge_kwargs": (dict,),
    "tfm_k": (int,), "tfm_gamma": (int, float), "num_source_classes": (int,),
}
_REQUIRED_HEAD_KEYS = ("width", "layers", "num_experts")
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", dict: "a JSON object", type(None): "null"}


def _json_object(config: Any, *, source: str) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise ValueError(f"{source} is not a mergekit_video model config (a JSON object is expected, not {type(config).__name__})")
    return config


def validate_model_config(config: Any, *, source: str) -> dict[str, Any]:
    """Check the structure of a saved model config (what :func:`video_clip_from_config` reads): the format,
    the ``clip`` section (``model_cfg`` with ``embed_dim``, ``vision_cfg``, ``text_cfg``) and the ``head``
    section (``TemporalHead`` arguments of the right types). Errors are ValueErrors naming ``source``
    (the file) and the key."""

    def fail(key: str, why: str) -> ValueError:
        return ValueError(f"{source} is not a valid mergekit_video model config: {why.format(key=repr(key))}")

    def require(obj: dict[str, Any], key: str, types: tuple[type, ...], where: str) -> Any:
        name = f"{where}.{key}" if where else key
        if key not in obj:
            raise fail(name, "key {key} is missing")
        value = obj[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            want = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
            raise fail(name, f"key {{key}} must be {want}, not {json.dumps(value)[:60]}")
        return value

    _json_object(config, source=source)
    from .video_clip import CONFIG_FORMAT, CONFIG_VERSION

    if require(config, "format", (str,), "") != CONFIG_FORMAT:
        raise fail("format", f"key {{key}} is {config['format']!r}, expected {CONFIG_FORMAT!r}")
    if require(config, "format_version", (int,), "") > CONFIG_VERSION:
        raise ValueError(f"{source}: model config version {config['format_version']} is newer than this mergekit_video supports ({CONFIG_VERSION})")
    clip = require(config, "clip", (dict,), "")
    require(clip, "name", (str,), "clip")
    model_cfg = require(clip, "model_cfg", (dict,), "clip")
    require(model_cfg, "embed_dim", (int,), "clip.model_cfg")
    for part in ("vision_cfg", "text_cfg"):
        require(model_cfg, part, (dict,), "clip.model_cfg")
    plugins = config.get("plugins", [])
    if not isinstance(plugins, list) or not all(isinstance(m, str) for m in plugins):
        raise fail("plugins", f"key {{key}} must be a list of module names, not {json.dumps(plugins)[:60]}")
    clip_experts = config.get("clip_experts", [])
    if not isinstance(clip_experts, list):
        raise fail("clip_experts", f"key {{key}} must be a list, not {json.dumps(clip_experts)[:60]}")
    for i, entry in enumerate(clip_experts):
        where = f"clip_experts.{i}"
        if not isinstance(entry, dict):
            raise fail(where, f"key {{key}} must be a mapping, not {json.dumps(entry)[:60]}")
        require(entry, "module", (str,), where)
        if require(entry, "num_experts", (int,), where) < 1:
            raise fail(f"{where}.num_experts", f"key {{key}} must be at least 1, not {entry['num_experts']}")
        if "batch_dim" in entry and (isinstance(entry["batch_dim"], bool) or not isinstance(entry["batch_dim"], int)):
            raise fail(f"{where}.batch_dim", f"key {{key}} must be an integer (the input's batch axis), not {json.dumps(entry['batch_dim'])[:60]}")
    head = require(config, "head", (dict,), "")
    for key in _REQUIRED_HEAD_KEYS:
        require(head, key, _HEAD_KEYS[key], "head")
    for key in head:
        if key not in _HEAD_KEYS:
            raise fail(f"head.{key}", f"key {{key}} is not an argument of the temporal head (those are {', '.join(_HEAD_KEYS)})")
        require(head, key, _HEAD_KEYS[key], "head")
    for key in ("width", "layers"):
        if head[key] < 1:
            raise fail(f"head.{key}", f"key {{key}} must be at least 1, not {head[key]}")
    for key in ("num_experts", "num_source_classes"):
        if head.get(key, 0) < 0:
            raise fail(f"head.{key}", f"key {{key}} must not be negative ({head[key]})")
    if head.get("tfm_k", 1) < 1:
        raise fail("head.tfm_k", f"key {{key}} must be at least 1, not {head['tfm_k']}")
    if not 0 < head.get("tfm_gamma", 1.0) < float("inf"):
        raise fail("head.tfm_gamma", f"key {{key}} must be a positive finite number, not {head['tfm_gamma']}")
    return config


def _follow_latest_pointer(path: Path) -> Path:
    """``path``, or for a checkpoints folder's ``latest`` pointer file the checkpoint it names."""
    from ..training.checkpoint import checkpoint_named_by_pointer

    if path.name != "latest" or not path.is_file():
        return path
    found = checkpoint_named_by_pointer(path)
    if found is None:
        raise FileNotFoundError(f"{path} is a checkpoints folder's 'latest' pointer, but {path.parent} holds no complete checkpoint")
    log.info("%s names checkpoint %s", path, found)
    return found


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The model config of a model directory or trainer checkpoint (a JSON object; :func:`load` validates it)."""
    return _open_saved(_follow_latest_pointer(Path(path)), validate=False).config


def read_model_config(path: str | os.PathLike, *, validate: bool = True) -> dict[str, Any]:
    """The architecture config of a saved model (directory, export or trainer checkpoint); raises
    ``FileNotFoundError`` naming the path when it holds none, and ``ValueError`` naming the file
    and key when its structure is not a model config (:func:`validate_model_config`; with
    ``validate=False`` only its being a JSON object is checked). No tensor is read."""
    return _open_saved(_follow_latest_pointer(Path(path)), validate=validate).config


class _Saved:
    """What a saved model holds: its config, where it says so (``source``), and its files."""

    def __init__(self, *, path: Path, config: dict[str, Any], source: str, other: dict[str, Any], meta: dict[str, Any] | None,
                 checksums: dict[str, str] | None = None) -> None:
        self.path, self.config, self.source, self.other, self.meta = path, config, source, other, meta
        self.checksums = checksums or {}  # a model folder's: tensor file name -> crc32 (none recorded before they were)


def _backup_hint(path: Path) -> str:
    backups = _stale_backups(path) if not os.path.lexists(path) else []
    if backups:
        backup = backups[0]
        return (f"; {backup} holds the model an interrupted save with overwrite was replacing: rename it back to {path.name} "
                f"(the next save_model to {path} restores it)")
    return ""


def _open_saved(path: Path, *, validate: bool = True) -> _Saved:
    """Read the config of a model directory (``config.json``) or trainer checkpoint (``state.json``);
    ``validate`` checks its structure (:func:`validate_model_config`), else only that it is a JSON object."""
    check = validate_model_config if validate else _json_object
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist{_backup_hint(path)}")
    state = path / "state.json"
    if state.is_file():  # a trainer checkpoint: state.json is authoritative
        meta = _read_json(state)
        from ..training.checkpoint import CHECKPOINT_FORMAT, FORMAT_VERSION

        if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{state} is not a mergekit_video checkpoint's state.json (format {CHECKPOINT_FORMAT!r} expected)")
        if meta.get("version", 0) > FORMAT_VERSION:
            raise ValueError(f"{state} has checkpoint format version {meta['version']}; this mergekit_video reads up to {FORMAT_VERSION} (upgrade mergekit_video)")
        if meta.get("complete") is not True:
            raise ValueError(f"{state} does not mark the checkpoint complete (a save cut short): load another checkpoint")
        if not isinstance(meta.get("model"), dict):
            raise ValueError(f"{state} has no 'model' entry (the key list of model.safetensors)")
        cfg = (meta.get("extra") or {}).get("model_config") if isinstance(meta.get("extra"), dict) else None
        if cfg is None:
            raise ValueError(f"{state} holds no extra.model_config: the checkpoint was not saved by a VideoCLIP training run, "
                             "so no model can be rebuilt from it")
        source = f"{state} (extra.model_config)"
        check(cfg, source=source)
        if (path / CONFIG_FILE).is_file():
            stray = _read_json(path / CONFIG_FILE)
            if isinstance(stray, dict):
                stray.pop(NON_TENSOR_KEY, None)
                stray.pop(CHECKSUMS_KEY, None)
            if stray != cfg:
                raise ValueError(f"{path} holds a {CONFIG_FILE} that differs from its state.json's extra.model_config, which describes "
                                 f"the checkpoint's tensors: remove the stray {path / CONFIG_FILE}")
        return _Saved(path=path, config=cfg, source="state.json's extra.model_config", other={}, meta=meta)
    if (path / CONFIG_FILE).is_file():
        config = check(_read_json(path / CONFIG_FILE), source=str(path / CONFIG_FILE))
        other = config.pop(NON_TENSOR_KEY, None) or {}  # state, not architecture
        checksums = config.pop(CHECKSUMS_KEY, None)
        return _Saved(path=path, config=config, source=CONFIG_FILE, other=other, meta=None,
                      checksums=checksums if isinstance(checksums, dict) else None)
    if (path / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{path} is a trainer checkpoint without its state.json (which holds its model config and key list): "
                                "it cannot be loaded; load another checkpoint")
    hint = f"; it holds a run's outputs: its trained model is {path / 'model'}" if (path / "model" / CONFIG_FILE).is_file() else ""
    if not hint and path.name == "checkpoints" and (path.parent / "model" / CONFIG_FILE).is_file():  # a finished run's checkpoints/
        hint = f"; it is a run's checkpoints folder: load one of its step_* folders, or the trained model, {path.parent / 'model'}"
    if not hint:  # an unfinished run (no model/ yet), or its checkpoints/ folder: name the newest checkpoint
        for folder in (path / "checkpoints", path):
            steps = sorted(p for p in folder.glob("step_*") if (p / "state.json").is_file()) if folder.is_dir() else []
            if steps:
                hint = f"; it holds training checkpoints but no trained model/ (training did not finish): load one, such as the newest, {steps[-1]}"
                break
    raise FileNotFoundError(f"{path} is not a mergekit_video model directory or checkpoint (no {CONFIG_FILE}){hint}")


def _header_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Key → shape of a safetensors file, from its header (no tensor is read)."""
    from safetensors import safe_open

    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing" if not file.exists() else f"{file} is not a file")
    try:
        with safe_open(str(file), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for bad files
        raise ValueError(f"{file} is unreadable ({type(exc).__name__}: {exc})") from exc


def _count(found: dict[str, Any], pattern: str) -> int | None:
    """1 + the largest index ``pattern``'s group captures among ``found``'s keys (None: no key matches)."""
    ids = [int(m.group(1)) for k in found if (m := re.match(pattern, k))]
    return max(ids) + 1 if ids else None


def _architecture_difference(part: str, found: dict[str, tuple[int, ...] | None], config: dict[str, Any], source: str) -> str | None:
    """What the tensors of ``part`` (clip or head) hold that the config says otherwise, e.g. ``holds 4 experts per
    layer, config.json says 2``; None when the layer count, widths and expert count agree."""
    diffs = []

    def differ(held: Any, said: Any, template: str) -> None:
        if held is not None and held != said:
            diffs.append(f"holds {template.format(held)}, {source} says {said}")

    if part == "head":
        head = config["head"]
        layers = _count(found, r"^transformer\.resblocks\.(\d+)\.")
        differ(layers, head["layers"], "{} temporal layers")
        if layers is not None:
            differ(_count(found, r"^transformer\.resblocks\.\d+\.mlp\.experts\.(\d+)\.") or 0, head["num_experts"], "{} experts per layer")
        widths = {(found.get("frame_position_embeddings.weight") or (None,))[-1], (found.get("transformer.resblocks.0.ln_1.weight") or (None,))[0]}
        differ(widths.pop() if len(widths) == 1 else None, head["width"], "a head of width {}")  # two tensors agree on it
    else:
        cfg = config["clip"]["model_cfg"]
        vision = cfg.get("vision_cfg") or {}
        widths = {(found.get("visual.conv1.weight") or (None,))[0], (found.get("visual.ln_pre.weight") or (None,))[0]}
        differ(widths.pop() if len(widths) == 1 else None, vision.get("width"), "a vision tower of width {}")
        differ(_count(found, r"^visual\.transformer\.resblocks\.(\d+)\."), vision.get("layers"), "{} vision layers")
        proj = found.get("visual.proj")
        differ(proj[1] if proj and len(proj) == 2 else None, cfg.get("embed_dim"), "an embedding size of {}")
    return "; ".join(diffs) or None


def _check_fits(
    file: Path, part: str, expected: dict[str, Any], found: dict[str, tuple[int, ...] | None], saved: _Saved, *, strict: bool, prefix: str = ""
) -> None:
    """Raise one ValueError naming ``file`` when its ``part`` tensors do not fit the model the config builds
    (keys shown with ``prefix``, as the file names them)."""
    missing, unexpected, wrong = state_mismatches(
        {k: (tuple(v.shape) if isinstance(v, torch.Tensor) else None) for k, v in expected.items()}, found,
        any_rows=frozenset({"source_class_features"} if part == "head" else ()),
    )
    if not strict:
        missing, unexpected = [], []
    if not (missing or unexpected or wrong):
        return
    what = "the temporal head" if part == "head" else f"the CLIP model ({saved.config['clip']['name']})"
    why = _architecture_difference(part, found, saved.config, saved.source)
    detail = describe_mismatches([prefix + k for k in missing], [prefix + k for k in unexpected], [(prefix + k, a, b) for k, a, b in wrong])
    if why:
        raise ValueError(f"{file} {why}: it {detail}")
    raise ValueError(f"{file} does not fit {what} {saved.source} describes: it {detail}")


def _checkpoint_entries(saved: _Saved) -> dict[str, tuple[int, ...] | None]:
    """Key → shape (None for a non-tensor entry) of a trainer checkpoint's model state, from state.json's key
    list and model.safetensors' header; a file and a list that disagree are an inconsistency."""
    file = saved.path / MODEL_FILE
    stored = _header_shapes(file)
    model_meta = saved.meta["model"]
    keys = list(model_meta.get("keys") or stored)
    aliases = model_meta.get("aliases") or {}
    non_tensor = set(model_meta.get("non_tensor") or {})
    extra = sorted(set(stored) - set(keys))
    if extra:
        raise ValueError(f"checkpoint {saved.path} is inconsistent: {MODEL_FILE} holds {len(extra)} tensor{'s' * (len(extra) != 1)} "
                         f"its state.json does not list ({key_summary(extra)})")
    absent = [k for k in keys if k not in stored and aliases.get(k) not in stored and k not in non_tensor]
    if absent:
        raise ValueError(f"checkpoint {saved.path} is inconsistent: its state.json lists {len(absent)} model entr{'ies' if len(absent) != 1 else 'y'} "
                         f"that {MODEL_FILE} lacks ({key_summary(absent)})")
    return {k: stored.get(k, stored.get(aliases.get(k, ""))) for k in keys}


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu", strict: bool = True) -> VideoCLIP:
    """Load a saved VideoCLIP (model directory, export, or trainer checkpoint) in eval mode.

    The config is validated, and the tensor files' keys and shapes are compared with the model it
    describes from their headers, before any tensor is read: a file that does not fit is a ValueError
    naming it, what it holds against what the config says, and the first mismatched keys (a partially
    loaded model is never returned). A trainer checkpoint needs only ``state.json`` and
    ``model.safetensors`` (not the optimizer's tensors). ``strict=False`` allows missing and unexpected
    keys (never other shapes).
    """
    from ..utils.io import read_safetensors
    from ..utils.state_json import decode_state

    path = _follow_latest_pointer(Path(path))  # checkpoints/latest: the checkpoint it names
    saved = _open_saved(path)
    import_model_plugins(saved.config, source=str(path))  # before the build: its router/merge names are theirs
    model = video_clip_from_config(saved.config)
    parts = {"clip": model.clip.state_dict(), "head": model.head.state_dict()}
    if saved.meta is None:  # a model directory
        files = {"clip": path / CLIP_FILE, "head": path / HEAD_FILE}
        for part, file in files.items():
            found = {**_header_shapes(file), **{k: None for k in decode_state(saved.other.get(part) or {})}}
            _check_fits(file, part, parts[part], found, saved, strict=strict)
        from ..utils.io import verify_checksum

        for file in files.values():  # a byte changed by a bad disk or a botched copy: refused, not evaluated or exported
            verify_checksum(file, saved.checksums)
        clip_sd = {**read_safetensors(files["clip"]), **decode_state(saved.other.get("clip") or {})}
        head_sd = {**read_safetensors(files["head"]), **decode_state(saved.other.get("head") or {})}
    else:  # a trainer checkpoint: tied tensors and non-tensor entries restored, the optimizer's tensors not read
        from ..training.checkpoint import checkpoint_model_state

        entries = _checkpoint_entries(saved)
        for part in ("clip", "head"):
            found = {k[len(part) + 1:]: v for k, v in entries.items() if k.startswith(part + ".")}
            _check_fits(path / MODEL_FILE, part, parts[part], found, saved, strict=strict, prefix=part + ".")
        others = sorted(k for k in entries if not k.startswith(("clip.", "head.")))
        if others and strict:
            raise ValueError(f"{path / MODEL_FILE} holds {len(others)} entries outside the model's clip. and head. parts ({key_summary(others)})")
        full = checkpoint_model_state(path, saved.meta)
        clip_sd = {k[5:]: v for k, v in full.items() if k.startswith("clip.")}
        head_sd = {k[5:]: v for k, v in full.items() if k.startswith("head.")}
    model.clip.load_state_dict(clip_sd, strict=strict)
    model.head.load_state_dict(head_sd, strict=strict)
    model.freeze_text()
    return model.to(device).eval()


def open_clip_folder_config(clip_config: dict[str, Any]) -> dict[str, Any]:
    """open_clip's ``open_clip_config.json`` for a model's CLIP part: the architecture it was built with
    (QuickGELU as used) and the normalisation it was trained with, so that plain open_clip rebuilds it
    from the folder alone (``open_clip.create_model('local-dir:FOLDER')`` loads ``clip.safetensors``)."""
    from ..data.transforms import CLIP_MEAN, CLIP_STD

    model_cfg = {**clip_config["model_cfg"], "quick_gelu": bool(clip_config.get("quick_gelu", False))}
    return {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}}


def export_dense(model: VideoCLIP, directory: str | os.PathLike, *, strategy: str | None = None, overwrite: bool = False,
                 own_folder: bool = False, **merge_kwargs: Any) -> Path:
    """Collapse the head's experts and save a plain model.

    The exported head has the plain-FFN structure with exactly the baseline's keys and
    parameter count; ``clip.safetensors`` loads into plain open_clip. ``strategy=None`` uses
    each container's own merge (mean, or the weights recorded at conversion). ``exported_from``
    records the expert count, merge and merge arguments collapsed; the export of a dense export keeps the original's.
    """
    containers = find_containers(model)
    own = {c.merge for _, c in containers}
    if any(is_output_space(s) for s in ([strategy] if strategy else own)):
        raise ValueError(
            f"a dense export needs a weight merge, but {strategy or sorted(own)[0]!r} combines expert outputs and has "
            "no merged weights: choose one such as mean, weighted or temperature_softmax"
        )
    dense = copy.deepcopy(model).cpu().eval()
    if containers:  # the head's, and any in the visual tower (the export loads into plain open_clip)
        collapse_experts(dense, strategy, **merge_kwargs)
    dense.head.config["num_experts"] = 0
    if not (model.head.config["num_experts"] == 0 and not containers and "exported_from" in model.config):  # a dense model keeps its origin
        merge_args = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in
                      (merge_kwargs if strategy else model.head.config.get("merge_kwargs") or {}).items() if k != "base"}
        dense.config = {**dense.config, "exported_from": {"num_experts": int(model.head.config["num_experts"]),
                                                          "merge": strategy or model.head.config["merge"],
                                                          **({"merge_kwargs": merge_args} if merge_args else {})}}
    return save_model(dense, directory, overwrite=overwrite, own_folder=own_folder)


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())
