"""Training checkpoints: atomic, safetensors-based, with pruning and ``resume: auto``.

Layout of ``directory``::

    step_00000100/
        model.safetensors       model state (tied tensors stored once, re-tied on load)
        optimizer.safetensors   optimizer state tensors, flattened
        state.json              step, epoch, metrics, extra, RNG states, scheduler/scaler state,
                                the JSON structure that rebuilds optimizer.state_dict() exactly,
                                and ``parts``: which of those states were saved (with their keys),
                                so that one lost later marks the checkpoint damaged
    step_00000200/
    latest                      text file: name of the newest complete checkpoint

A checkpoint is written whole into a hidden temp folder next to its final place, every file
and the folder are fsynced, then the folder is renamed into place and ``latest`` is updated
atomically. A crash mid-save leaves a hidden ``.tmp-*`` folder that is never picked (and is
removed by the next save); the previous checkpoint stays ``latest``. Saving a step that exists (a
run resumed from an older checkpoint) swaps the new folder in, atomically where the platform can,
else by moving the old one aside first; the old one is deleted only after ``latest`` is written, so
a crash at any point leaves a complete ``step_N``, old or new (an old one a kill left aside is put
back by the next save or resume).

Only one process (rank 0) may write to a directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..utils import io as uio
from ..utils.io import (TEMP_OWNER_PATTERN, apply_default_modes, atomic_write_text, file_checksum, is_stale_temp,
                        read_safetensors, remove_stale_atomic_temps, temp_owner, verify_checksum)
from ..utils.state_json import StateEncoder, decode_state, split_tensors

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointManager",
    "CheckpointState",
    "FORMAT_VERSION",
    "optimizer_hyperparameter_differences",
    "optimizer_kind_difference",
    "param_group_differences",
]

FORMAT_VERSION = 1
CHECKPOINT_FORMAT = "mergekit_video.checkpoint"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_LATEST = "latest"
_MODEL_FILE = "model.safetensors"
_OPTIM_FILE = "optimizer.safetensors"
_STATE_FILE = "state.json"
#: The previous checkpoint of a step that a save replaces, while the new one is renamed in (see ``_publish``).
_ASIDE = re.compile(rf"^\.old-(?P<step>step_\d{{8,}})-{TEMP_OWNER_PATTERN}-[0-9a-f]{{8}}$")


# ----------------------------------------------------------------------------------------------
# Tensors for safetensors (nested state <-> JSON is utils.state_json)
# ----------------------------------------------------------------------------------------------
def _for_safetensors(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU, contiguous tensors that share no storage, plus aliases for tied entries.

    Entries that are the same view of the same storage (tied weights) are stored once and
    listed in ``aliases`` (name -> stored name); other storage sharing is broken by cloning.
    """
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    used: set[int] = set()
    for k, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"checkpoint: {k!r} is a {type(t).__name__}, not a tensor")
        t = t.detach()
        if t.numel():
            sig = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if sig in views:
                aliases[k] = views[sig]
                continue
            views[sig] = k
        c = t.to("cpu").contiguous()
        if c.numel():
            # a view into a larger storage, or a storage already stored: give it its own copy
            if c.untyped_storage().nbytes() != c.numel() * c.element_size() or c.untyped_storage().data_ptr() in used:
                c = c.clone()
            used.add(c.untyped_storage().data_ptr())
        out[k] = c
    return out, aliases


# ----------------------------------------------------------------------------------------------
# File-system helpers
# ----------------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


#: What every checkpoint's state.json holds (some as null: ``optimizer``, ``scheduler``, ``scaler``
#: and ``rng`` when save() was given none). A state.json without one of them was edited or damaged.
_ALWAYS_WRITTEN = ("step", "epoch", "metrics", "model", "optimizer", "scheduler", "scaler", "rng", "extra")
#: The states save() stores when given them; state.json's ``parts`` records which it was given
#: (with their top-level keys), so that a part lost afterwards is told from one never saved.
_PARTS = ("optimizer", "scheduler", "scaler", "rng", "extra")


def _parts_record(meta: Mapping[str, Any]) -> dict[str, list[str] | None]:
    """``parts`` for state.json: each part's top-level keys as encoded (an empty list for a stored
    non-mapping), or None for a part not stored (null, or an empty ``extra``)."""
    record: dict[str, list[str] | None] = {}
    for name in _PARTS:
        value = meta.get(name)
        if value is None or (name == "extra" and value == {}):
            record[name] = None
        else:
            record[name] = list(value) if isinstance(value, dict) else []
    return record


def _missing_part(meta: Mapping[str, Any]) -> str | None:
    """Why ``meta`` (a complete-marked state.json) lacks a part its writer stored, or None.

    Checkpoints written before the ``parts`` record are only checked for the entries every
    checkpoint has (:data:`_ALWAYS_WRITTEN`)."""
    absent = [k for k in _ALWAYS_WRITTEN if k not in meta]
    if absent:
        return f"{_STATE_FILE} lacks {', '.join(repr(k) for k in absent)}, which every checkpoint's {_STATE_FILE} has"
    parts = meta.get("parts")
    if parts is None:
        return None
    if not isinstance(parts, dict):
        return f"{_STATE_FILE}'s 'parts' record is not a mapping"
    for name, keys in parts.items():
        if keys is None:
            continue
        value = meta.get(name)
        if value is None or (value == {} and keys):
            return f"{_STATE_FILE} has no {name!r} state, though the checkpoint was saved with one"
        lost = [k for k in keys if not isinstance(value, dict) or k not in value]
        if lost:
            shown = ", ".join(repr(k) for k in lost[:3]) + (f" and {len(lost) - 3} more" if len(lost) > 3 else "")
            return f"{_STATE_FILE}'s {name!r} lacks {shown}, which the checkpoint was saved with"
    return None


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, say); the message names it and the checkpoint that survives."""


def _inspect_state_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the checkpoint's state.json, None) if ``path`` is a complete checkpoint, else (None, why not).

    A state.json that lacks a part its writer stored (the RNG states, the scheduler's, an entry
    of ``extra``: see :func:`_missing_part`) is no complete checkpoint: a resume from it would not
    continue the run exactly."""
    try:
        meta = json.loads((path / _STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"it has no {_STATE_FILE}"
    except (OSError, ValueError) as exc:
        return None, f"{_STATE_FILE}: {type(exc).__name__}: {exc}"
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        return None, f"{_STATE_FILE} is not a mergekit_video checkpoint's"
    if meta.get("complete") is not True:
        return None, f"{_STATE_FILE} does not mark it complete"
    folder_step, saved_step = _step_of(path), meta.get("step")
    if folder_step >= 0 and saved_step != folder_step:
        # a step_N folder renamed or copied by hand: latest and prune go by the name, a resume by state.json
        hint = f" (renamed or copied by hand? its name would be step_{saved_step:08d})" if isinstance(saved_step, int) else ""
        return None, f"{_STATE_FILE} records step {saved_step!r}, but the folder is named for step {folder_step}{hint}"
    if not (path / _MODEL_FILE).is_file():
        return None, f"{_MODEL_FILE} is missing"
    missing = _missing_part(meta)
    if missing is not None:
        return None, missing
    if meta.get("optimizer") is not None and not (path / _OPTIM_FILE).is_file():
        return None, f"{_OPTIM_FILE} is missing"
    for name in (_MODEL_FILE, _OPTIM_FILE):
        problem = _safetensors_problem(path / name) if (path / name).is_file() else None
        if problem is not None:
            return None, problem
    return meta, None


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is no whole safetensors file (truncated or zeroed: a full disk, a copy cut short),
    from its header and size alone; None when it is whole."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 2 or 8 + length > size:
                return f"{path.name} is truncated or not a safetensors file ({size} bytes)"
            header = json.loads(f.read(length))
    except (OSError, ValueError) as exc:
        return f"{path.name}: {type(exc).__name__}: {exc}"
    if not isinstance(header, dict):
        return f"{path.name} has no safetensors header"
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"{path.name} is truncated ({size} of {expected} bytes)"
    return None


def _read_state_json(path: Path) -> dict[str, Any] | None:
    """The checkpoint's state.json if ``path`` is a complete checkpoint, else None."""
    return _inspect_state_json(path)[0]


def _remove_tree(path: Path) -> None:
    """Rename out of the way first, so a crash mid-delete never leaves a half checkpoint."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _state_dict_of(obj: Any) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj
    if callable(getattr(obj, "state_dict", None)):
        return obj.state_dict()
    raise TypeError(f"checkpoint: expected an object with state_dict() or a dict, got {type(obj).__name__}")


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
@dataclass
class CheckpointState:
    """Everything a checkpoint holds, as loaded on the CPU.

    ``optimizer_state`` equals the saved ``optimizer.state_dict()`` (tensors, tuples, int param
    ids, param_groups and non-tensor entries). ``rng`` is a
    :func:`mergekit_video.training.rng.capture_rng_state` snapshot.
    """

    path: Path
    step: int
    epoch: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None = None
    scheduler_state: dict[str, Any] | None = None
    scaler_state: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    #: class name of the optimizer that was saved (``AdamW``); None in checkpoints that predate it
    #: or that were given a state dict (see :func:`optimizer_kind_difference`)
    optimizer_class: str | None = None

    def restore(
        self,
        *,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        scaler: Any = None,
        generators: Mapping[str, torch.Generator] | None = None,
        strict: bool = True,
    ) -> None:
        """Load the states into the given live objects and restore the RNG streams.

        Pass the unwrapped model (not the DDP wrapper). Anything given that the checkpoint
        lacks is an error; pass ``generators`` (possibly empty) to restore the RNG states.
        """
        if model is not None:
            model.load_state_dict(self.model_state, strict=strict)
        for obj, state, what in ((optimizer, self.optimizer_state, "optimizer"),
                                 (scheduler, self.scheduler_state, "scheduler"),
                                 (scaler, self.scaler_state, "scaler")):
            if obj is None:
                continue
            if state is None:
                raise ValueError(f"checkpoint {self.path} has no {what} state to restore")
            obj.load_state_dict(state)
        if generators is not None:
            if self.rng is None:
                raise ValueError(f"checkpoint {self.path} has no RNG state to restore")
            from .rng import restore_rng_state

            restore_rng_state(self.rng, generators, strict=strict)


class CheckpointManager:
    """Saves, finds, loads and prunes the checkpoints of one run.

    Args:
        directory: where checkpoints live (usually ``{output_dir}/checkpoints``).
        keep_last: how many of the newest checkpoints to keep (None keeps all).
        keep_best: also keep the best checkpoint by ``best_metric``.
        best_metric: metric name (from ``save(metrics=...)``) that ranks checkpoints.
        best_mode: ``max`` or ``min``.
    """

    def __init__(
        self,
        *,
        directory: str | os.PathLike,
        keep_last: int | None = 3,
        keep_best: bool = True,
        best_metric: str | None = None,
        best_mode: str = "max",
    ) -> None:
        if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
            raise ValueError(f"keep_last must be an int >= 1 or None (keep all), got {keep_last!r}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.best_metric = best_metric
        self.best_mode = best_mode
        self._reported: set[Path] = set()  # unreadable checkpoints already warned about

    def path_of(self, step: int) -> Path:
        """The folder of checkpoint ``step`` in this directory (whether it exists or not)."""
        return self.directory / f"step_{int(step):08d}"

    # -- writing ---------------------------------------------------------------------------
    def save(
        self,
        *,
        step: int,
        epoch: int,
        model_state: Mapping[str, Any],
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
        rng: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write checkpoint ``step_{step:08d}`` atomically, update ``latest``, prune; return its path.

        ``optimizer``/``scheduler``/``scaler`` are live objects (their ``state_dict()`` is
        taken) or state dicts; a live optimizer's class name is recorded too. ``model_state``
        non-tensor entries go to state.json. Saving a step that exists replaces it.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temp_dirs()
        final = self.path_of(step)
        name = final.name

        model_tensors, model_other = split_tensors(model_state)
        stored, aliases = _for_safetensors(model_tensors)
        inline = StateEncoder(inline=True, what="")
        meta: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "version": FORMAT_VERSION,
            "step": step,
            "epoch": int(epoch),
            "time": time.time(),
            "torch_version": torch.__version__,
            "metrics": {str(k): _metric_value(v) for k, v in (metrics or {}).items()},
            "model": {"aliases": aliases, "non_tensor": inline.encode(model_other, "model"),
                      "keys": list(model_state),
                      # nn.Module.state_dict() carries per-module versions used when loading
                      "metadata": inline.encode(getattr(model_state, "_metadata", None), "model._metadata")},
            "optimizer": None,
            "scheduler": inline.encode(_state_dict_of(scheduler), "scheduler"),
            "scaler": inline.encode(_state_dict_of(scaler), "scaler"),
            "rng": inline.encode(dict(rng) if rng is not None else None, "rng"),
            "extra": inline.encode(dict(extra or {}), "extra"),
        }
        optim_state = _state_dict_of(optimizer)
        optim_tensors: dict[str, torch.Tensor] = {}
        if optim_state is not None:
            enc = StateEncoder(inline=False, what="optimizer")
            meta["optimizer"] = enc.encode(optim_state)
            optim_tensors, optim_aliases = _for_safetensors(enc.tensors)
            meta["optimizer_aliases"] = optim_aliases
            if not isinstance(optimizer, Mapping):
                meta["optimizer_class"] = type(optimizer).__name__
        meta["parts"] = _parts_record(meta)
        meta["complete"] = True

        from safetensors.torch import save_file

        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.directory))
        try:
            save_file(stored, str(tmp / _MODEL_FILE), metadata={"format": "pt"})
            if optim_state is not None:
                save_file(optim_tensors, str(tmp / _OPTIM_FILE), metadata={"format": "pt"})
            # damage that keeps a file's size (a bad disk, a botched copy) is seen only by a checksum
            meta["checksums"] = {f: file_checksum(tmp / f) for f in (_MODEL_FILE, _OPTIM_FILE) if (tmp / f).is_file()}
            (tmp / _STATE_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
            apply_default_modes(tmp)  # mkdtemp's 0700 and save_file's 0600 -> what mkdir()/open() give
            for f in tmp.iterdir():
                _fsync_file(f)
            _fsync_dir(tmp)
            replaced = self._publish(tmp, final)
            _fsync_dir(self.directory)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)  # after an exchange: the previous checkpoint of this step
            if isinstance(exc, Exception):  # a full disk, a read-only folder: say what is lost and what is not
                previous = _latest_in(self.directory)
                kept = (f"the previous checkpoint, {previous}, is intact: free the space (or fix the folder) and rerun to "
                        "resume from it" if previous is not None else "there is no earlier checkpoint")
                raise CheckpointWriteError(f"checkpoint {final} could not be written ({type(exc).__name__}: {exc}); {kept}") from exc
            raise
        atomic_write_text(self.directory / _LATEST, name + "\n")
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)  # a kill meanwhile: the next save or resume removes it
        self.prune()
        return final

    def _publish(self, tmp: Path, final: Path) -> Path | None:
        """Rename the finished ``tmp`` onto ``final``; return where the previous checkpoint of that step now is
        (to delete once ``latest`` is written), or None when there was none.

        A step that exists is replaced without ever leaving no ``final``: in one atomic exchange where the
        platform offers one (Linux ``renameat2``; ``tmp`` then holds the previous checkpoint), else the previous
        one is renamed aside (``.old-step_N-<pid>-<host>-XXXXXXXX``) before the new one is renamed in, and put
        back when that fails or is interrupted. A kill between those two renames leaves it aside, and
        :meth:`_restore_replaced` puts it back (the next save or resume).
        """
        if not os.path.lexists(final):
            os.rename(tmp, final)
            return None
        if uio.exchange_paths(tmp, final):
            return tmp
        aside = final.with_name(f".old-{final.name}-{temp_owner()}-{secrets.token_hex(4)}")
        try:
            os.rename(final, aside)
            os.rename(tmp, final)
        except BaseException:
            if os.path.lexists(aside) and not os.path.lexists(final):
                os.rename(aside, final)  # the previous checkpoint stays
            raise
        return aside

    def _restore_replaced(self) -> None:
        """The previous checkpoints that replacing saves moved aside (:meth:`_publish`): removed where their
        ``step_*`` folder holds the new one (a kill or Ctrl-C while deleting them), put back where it is missing
        and their writer is gone (a kill between the two renames)."""
        if not self.directory.is_dir():
            return
        for entry in list(os.scandir(self.directory)):
            m = _ASIDE.match(entry.name)
            if m is None or not entry.is_dir(follow_symlinks=False):
                continue
            final = self.directory / m["step"]
            if os.path.lexists(final):
                shutil.rmtree(entry.path, ignore_errors=True)
            elif is_stale_temp(entry.path, m["pid"], m["host"]):
                try:
                    os.rename(entry.path, final)
                except FileNotFoundError:  # another rank of this run, resuming too, put it back first
                    continue
                log.warning("restored %s from %s, left by a save that was replacing it when it was killed", final, entry.name)

    def update_state(
        self,
        step: int,
        *,
        epoch: int | None = None,
        rng: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> Path:
        """Rewrite the JSON part of the existing checkpoint ``step`` atomically; return its path.

        For state that changed after :meth:`save` while the model and optimizer did not (the
        end-of-epoch validation: its metrics, the run's history, the RNG streams its loader drew
        from): ``state.json`` is replaced in one rename, the tensor files are not written again.
        Arguments left None keep their saved values; the checkpoints are pruned again (the best
        one may have changed). Raises ``FileNotFoundError`` when there is no complete checkpoint
        ``step`` in this directory.
        """
        final = self.path_of(step)
        meta = _read_state_json(final)
        if meta is None:
            raise FileNotFoundError(f"no complete checkpoint {final} to update")
        self._remove_stale_atomic_temps([final])
        inline = StateEncoder(inline=True, what="")
        meta["time"] = time.time()
        if epoch is not None:
            meta["epoch"] = int(epoch)
        if metrics is not None:
            meta["metrics"] = {str(k): _metric_value(v) for k, v in metrics.items()}
        if rng is not None:
            meta["rng"] = inline.encode(dict(rng), "rng")
        if extra is not None:
            meta["extra"] = inline.encode(dict(extra), "extra")
        if isinstance(meta.get("parts"), dict):  # what it holds now (older checkpoints have no record)
            meta["parts"] = _parts_record(meta)
        atomic_write_text(final / _STATE_FILE, json.dumps(meta, indent=1) + "\n")
        self.prune()
        return final

    def _remove_stale_temp_dirs(self) -> None:
        """Before a save (one writer per directory): the temp folders of saves and deletes cut short, and
        the leftovers of atomic writes (:meth:`_remove_stale_atomic_temps`)."""
        for p in self.directory.glob(".tmp-step_*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in self.directory.glob(".trash-step_*"):
            shutil.rmtree(p, ignore_errors=True)
        self._restore_replaced()
        self._remove_stale_atomic_temps()

    def _remove_stale_atomic_temps(self, steps: list[Path] | None = None) -> None:
        """Remove the temp files (``.latest.<pid>-<host>.XXXXXXXX.tmp``, ``step_*/.state.json.….tmp``) that
        writes of ``latest`` and of the ``state.json`` of ``steps`` (default: every step folder) killed before
        their rename left: only those whose writer is gone (see :func:`~mergekit_video.utils.io.is_stale_temp`),
        so this is safe while another process writes here."""
        if not self.directory.is_dir():
            return
        remove_stale_atomic_temps(self.directory / _LATEST)
        for step in (steps if steps is not None else [p for _, p in _step_folders(self.directory)]):
            remove_stale_atomic_temps(step / _STATE_FILE)

    def prune(self) -> list[Path]:
        """Delete checkpoints beyond the newest ``keep_last``, sparing the best and ``latest``.

        An unreadable ``step_*`` folder (see :meth:`unreadable`) goes once ``keep_last``
        complete checkpoints are newer than it, as a complete one of its step would.
        """
        ckpts = self.checkpoints()
        keep = set(ckpts if self.keep_last is None else ckpts[-self.keep_last:])
        if self.keep_best and (best := self.best()) is not None:
            keep.add(best)
        if (latest := self.latest()) is not None:
            keep.add(latest)
        removed = [c for c in ckpts if c not in keep]
        if self.keep_last is not None and len(ckpts) >= self.keep_last:
            oldest_kept = _step_of(ckpts[-self.keep_last])
            for path, why in self.unreadable():
                if _step_of(path) < oldest_kept:
                    log.info("removing the unreadable checkpoint %s (%s)", path, why)
                    removed.append(path)
        for c in removed:
            _remove_tree(c)
        return removed

    # -- finding ---------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints in this directory, oldest step first."""
        return _complete_checkpoints(self.directory)

    def unreadable(self) -> list[tuple[Path, str]]:
        """``step_*`` folders that are no complete checkpoint, oldest first, each with the reason.

        Checkpoints are published whole by a rename (a save cut short leaves a hidden ``.tmp-*``
        folder), so such a folder is damage (a truncated ``state.json``, a deleted file), never
        a save in progress.
        """
        return _unreadable_in(self.directory)

    def _warn_unreadable_after(self, directory: Path, chosen: Path | None) -> None:
        """Warn (once per folder) about the unreadable ``step_*`` folders of ``directory`` newer than
        ``chosen``: the checkpoints a resume skips."""
        chosen_step = -1 if chosen is None else _step_of(chosen)
        for path, why in _unreadable_in(Path(directory)):
            if _step_of(path) > chosen_step and path not in self._reported:
                self._reported.add(path)
                log.warning("checkpoint %s is unreadable (%s); %s", path, why,
                            f"resuming from the previous one, {chosen.name}" if chosen is not None else "no readable older checkpoint to resume from")

    def latest(self) -> Path | None:
        """The checkpoint named by ``latest`` (or, if that is missing or broken, the newest
        complete one); None when there is none. Half-written checkpoints are never returned."""
        return _latest_in(self.directory)

    def metric_of(self, checkpoint: Path) -> float | None:
        """The ``best_metric`` value recorded with ``checkpoint`` (None when it has none)."""
        if self.best_metric is None:
            return None
        v = ((_read_state_json(checkpoint) or {}).get("metrics") or {}).get(self.best_metric)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
            return None
        return float(v)

    def best(self) -> Path | None:
        """The checkpoint with the best ``best_metric`` (earliest on ties); None without one."""
        if self.best_metric is None:
            return None
        best, best_v = None, None
        for c in self.checkpoints():
            meta = _read_state_json(c) or {}
            v = (meta.get("metrics") or {}).get(self.best_metric)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:  # skip missing / NaN
                continue
            if best_v is None or (v > best_v if self.best_mode == "max" else v < best_v):
                best, best_v = c, v
        return best

    def resolve_resume(self, resume: str | os.PathLike | None) -> Path | None:
        """The checkpoint to resume from.

        ``None``/``"none"``/``False``: start fresh. ``"auto"``: :meth:`latest` (None when there is
        no checkpoint yet). A path: that checkpoint (a ``step_*`` folder, or the ``latest``
        pointer file), or the latest one inside a checkpoint directory or inside a run's
        ``output_dir`` (its ``checkpoints/``); a path that does not exist or holds no checkpoint
        is an error.
        """
        kind = resume_kind(resume)
        if kind == "fresh":
            return None
        if kind == "auto":
            latest = self.latest()
            self._warn_unreadable_after(self.directory, latest)
            return latest
        p = Path(resume)
        if not p.exists():
            raise FileNotFoundError(f"train.resume={str(resume)!r}: no such checkpoint (use 'auto', a checkpoint folder, or null)")
        if p.is_file() and p.name == _LATEST:  # the pointer file names the latest checkpoint beside it
            p = p.parent
        meta, why = _inspect_state_json(p)
        if meta is not None:
            return p
        if p.is_dir() and _STEP_DIR.match(p.name) and (p / _STATE_FILE).exists():
            raise ValueError(f"train.resume={str(resume)!r} is not a readable checkpoint ({why})")
        found = _latest_in(p) if p.is_dir() else None
        if found is not None:
            self._warn_unreadable_after(p, found)
        elif (p / "checkpoints").is_dir():  # a run's output_dir
            found = _latest_in(p / "checkpoints")
            if found is not None:
                self._warn_unreadable_after(p / "checkpoints", found)
        if found is None:
            raise ValueError(f"train.resume={str(resume)!r} is not a complete checkpoint (no valid {_STATE_FILE}) "
                             "and holds no checkpoints: give a run's output_dir, its checkpoints/ folder or one "
                             "checkpoints/step_* folder")
        return found

    def load_resume(self, resume: str | os.PathLike | None) -> tuple[Path, CheckpointState] | None:
        """Resolve ``resume`` (see :meth:`resolve_resume`) and read that checkpoint.

        With ``"auto"``, a checkpoint whose files cannot be read (a truncated tensor file after a
        full disk, a truncated ``state.json``) is reported with a warning and the next older one is
        tried; it is left in place (and pruned later like any old checkpoint). When every
        checkpoint is unreadable, that is an error, not a fresh start. An explicit path is read as
        given, and its errors propagate.
        """
        if resume_kind(resume) != "fresh":
            self._restore_replaced()  # before the latest is chosen: a step a kill left aside is back
        path = self.resolve_resume(resume)
        kind = resume_kind(resume)
        auto = kind == "auto"
        if kind != "fresh":
            self._remove_stale_atomic_temps()  # a run that continues may not save again before it ends
        if path is None:
            unreadable = self.unreadable() if auto else []
            if unreadable:
                raise ValueError(
                    f"resume=auto: no readable checkpoint in {self.directory} "
                    f"({'; '.join(f'{p.name}: {why}' for p, why in unreadable)}); "
                    "set train.resume=null to start fresh in a new output_dir"
                )
            return None
        if not auto:
            return path, self.load(path)
        candidates = [path] + [c for c in reversed(self.checkpoints()) if c != path]
        failures = [f"{p.name}: {why}" for p, why in reversed(self.unreadable()) if _step_of(p) > _step_of(path)]
        for candidate in candidates:
            try:
                return candidate, self.load(candidate)
            except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint: fall back to an older one
                failures.append(f"{candidate.name}: {type(exc).__name__}: {exc}")
                log.warning("checkpoint %s is unreadable (%s: %s); trying the previous one", candidate, type(exc).__name__, exc)
        raise ValueError(
            f"resume=auto: no readable checkpoint in {self.directory} ({'; '.join(failures)}); "
            "set train.resume=null to start fresh in a new output_dir"
        )

    # -- reading ---------------------------------------------------------------------------
    def load(self, path: str | os.PathLike) -> CheckpointState:
        """Read a checkpoint (tensors on the CPU); raises ValueError for incomplete ones."""
        return load_checkpoint(path)


def resume_kind(resume: Any) -> str:
    """What a ``train.resume`` value asks for: ``"fresh"`` (None, False, ``""``, ``"none"``, ``"null"``,
    ``"false"``, ``"never"``), ``"auto"`` (the latest checkpoint) or ``"path"``."""
    from ..config.schema import RESUME_FRESH_WORDS

    if resume is None or resume is False:
        return "fresh"
    text = str(resume).strip().lower()
    if text in RESUME_FRESH_WORDS:
        return "fresh"
    return "auto" if text == "auto" else "path"


def _metric_value(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item()
    if hasattr(v, "item") and hasattr(v, "dtype"):
        return v.item()
    return v


def _step_of(path: Path) -> int:
    """The step of a ``step_*`` checkpoint folder (-1 for another name)."""
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else -1


def _step_folders(directory: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``step_*`` folder in ``directory``, complete or not, oldest first."""
    if not directory.is_dir():
        return []
    return sorted((_step_of(p), p) for p in directory.iterdir() if _STEP_DIR.match(p.name) and p.is_dir())


def _complete_checkpoints(directory: Path) -> list[Path]:
    return [p for _, p in _step_folders(directory) if _read_state_json(p) is not None]


def _unreadable_in(directory: Path) -> list[tuple[Path, str]]:
    found = []
    for _, path in _step_folders(directory):
        meta, why = _inspect_state_json(path)
        if meta is None:
            found.append((path, why or "unreadable"))
    return found


def checkpoint_named_by_pointer(path: str | os.PathLike) -> Path | None:
    """For the ``latest`` pointer file of a checkpoints folder, the checkpoint it names (the newest complete
    one when it names none that is readable); None for any other path."""
    p = Path(path)
    if p.name != _LATEST or not p.is_file():
        return None
    return _latest_in(p.parent)


def _latest_in(directory: Path) -> Path | None:
    pointer = directory / _LATEST
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except OSError:
        name = ""
    if name and _STEP_DIR.match(name) and _read_state_json(directory / name) is not None:
        return directory / name
    ckpts = _complete_checkpoints(directory)
    return ckpts[-1] if ckpts else None


def _checked_meta(path: Path) -> dict[str, Any]:
    """``state.json`` of the checkpoint folder ``path``, with clear errors for anything else."""
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist" if not path.exists() else f"checkpoint {path} is not a folder")
    meta, why = _inspect_state_json(path)
    if meta is None:
        raise ValueError(f"checkpoint {path} is incomplete or not a mergekit_video checkpoint ({why})")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format version {meta['version']}; this mergekit_video reads up to "
                         f"{FORMAT_VERSION} (upgrade mergekit_video)")
    return meta


def _verify_checksum(path: Path, meta: Mapping[str, Any]) -> None:
    """:func:`~mergekit_video.utils.io.verify_checksum` against the checksums its state.json recorded."""
    verify_checksum(path, meta.get("checksums") or {})


def checkpoint_model_state(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The model state dict of the checkpoint folder ``path`` with its state.json ``meta`` (read by the
    caller): tied entries re-tied, non-tensor entries restored; the optimizer's tensors are not read.
    A tensor file whose checksum differs from the one recorded is a ``ValueError`` (``resume: auto``
    then falls back to the previous checkpoint)."""
    _verify_checksum(path / _MODEL_FILE, meta)
    stored = read_safetensors(path / _MODEL_FILE)
    non_tensor = decode_state(meta["model"].get("non_tensor") or {})
    aliases = meta["model"].get("aliases") or {}
    model_state: dict[str, Any] = OrderedDict()
    if meta["model"].get("metadata") is not None:
        model_state._metadata = decode_state(meta["model"]["metadata"])  # type: ignore[attr-defined]
    for k in meta["model"].get("keys") or list(stored):
        if k in stored:
            model_state[k] = stored[k]
        elif k in aliases:
            model_state[k] = stored[aliases[k]]  # re-tied: the same tensor object
        elif k in non_tensor:
            model_state[k] = non_tensor[k]
        else:
            raise ValueError(f"checkpoint {path} is inconsistent: model entry {k!r} is missing")
    if meta["model"].get("keys") is not None:
        unlisted = sorted(set(stored) - set(model_state) - set(aliases.values()))
        if unlisted:  # state.json damaged: the model would be read without them, and blamed on the recipe
            shown = ", ".join(repr(k) for k in unlisted[:3]) + (f" and {len(unlisted) - 3} more" if len(unlisted) > 3 else "")
            raise ValueError(f"checkpoint {path} is inconsistent: {_MODEL_FILE} holds {shown}, which its {_STATE_FILE} does not list")
    return model_state


def load_model_state(path: str | os.PathLike) -> dict[str, Any]:
    """Only the model state dict of the checkpoint folder ``path`` (the optimizer's tensors are not read)."""
    path = Path(path)
    return checkpoint_model_state(path, _checked_meta(path))


def load_checkpoint(path: str | os.PathLike) -> CheckpointState:
    """Read the checkpoint folder ``path`` (see :class:`CheckpointManager`)."""
    path = Path(path)
    meta = _checked_meta(path)
    model_state = checkpoint_model_state(path, meta)
    optimizer_state = None
    if meta.get("optimizer") is not None:
        _verify_checksum(path / _OPTIM_FILE, meta)
        tensors = read_safetensors(path / _OPTIM_FILE)
        for k, target in (meta.get("optimizer_aliases") or {}).items():
            tensors[k] = tensors[target]
        optimizer_state = decode_state(meta["optimizer"], tensors)
    return CheckpointState(
        path=path,
        step=int(meta["step"]),
        epoch=int(meta["epoch"]),
        model_state=model_state,
        optimizer_state=optimizer_state,
        scheduler_state=decode_state(meta.get("scheduler")),
        scaler_state=decode_state(meta.get("scaler")),
        rng=decode_state(meta.get("rng")),
        extra=decode_state(meta.get("extra")) or {},
        metrics=meta.get("metrics") or {},
        optimizer_class=meta.get("optimizer_class"),
    )


# ----------------------------------------------------------------------------------------------
# A checkpoint's optimizer against the one a resume builds
# ----------------------------------------------------------------------------------------------
# torch's Optimizer.load_state_dict keeps the live parameters but takes every other entry of each
# saved param group (betas, eps, weight decay, ...) over the live one, and the saved per-parameter
# state must be that of the same algorithm (SGD's step reads 'momentum_buffer', Adam's 'exp_avg').
# A resume therefore compares them first and refuses, in words, what it would silently override.

#: Param-group entries that are not hyper-parameters of the update: the parameters, their names and
#: group name (the layout), the lr (the schedule's: see schedule_differences) and the kernel choice
#: (foreach/fused/capturable/differentiable pick an implementation of the same maths, per device).
_NOT_HYPERPARAMETERS = frozenset({"params", "param_names", "name", "lr", "initial_lr",
                                  "foreach", "fused", "capturable", "differentiable"})

#: The recipe key behind a hyper-parameter, for messages.
_HYPERPARAMETER_KEYS = {
    "weight_decay": "optimizer.weight_decay",
    "betas": "optimizer.betas",
    "eps": "optimizer.eps",
    "decoupled_weight_decay": "optimizer.name: adamw decouples it, adam does not",
}


def _optimizer_state(optimizer: Any) -> Mapping[str, Any]:
    return optimizer if isinstance(optimizer, Mapping) else optimizer.state_dict()


def _saved_optimizer_kinds(state: Mapping[str, Any]) -> tuple[set[str], str] | None:
    """The optimizer classes a saved state can belong to, and how to call them; None when it does
    not tell (checkpoints from before the class name was saved)."""
    group = next(iter(state.get("param_groups") or []), {})
    if "betas" in group:
        if "decoupled_weight_decay" in group:
            name = "AdamW" if group["decoupled_weight_decay"] else "Adam"
            return {name}, name
        return {"Adam", "AdamW"}, "Adam or AdamW"
    if "momentum" in group and "nesterov" in group:
        return {"SGD"}, "SGD"
    keys = {k for s in (state.get("state") or {}).values() if isinstance(s, Mapping) for k in s}
    if "exp_avg" in keys:
        return {"Adam", "AdamW"}, "Adam or AdamW"
    if "momentum_buffer" in keys:
        return {"SGD"}, "SGD"
    return None


def optimizer_kind_difference(saved: Mapping[str, Any], saved_class: str | None, optimizer: torch.optim.Optimizer) -> str | None:
    """``"AdamW in the checkpoint, SGD now"`` when a saved optimizer state belongs to another
    optimizer class than ``optimizer``; None when it is the same (or the state does not tell).

    ``saved_class`` is the class name the checkpoint recorded (:attr:`CheckpointState.optimizer_class`);
    older checkpoints lack it, and the class is then inferred from the saved param groups' entries
    (``betas``: Adam or AdamW, ``momentum``: SGD) or per-parameter state (``exp_avg``, ``momentum_buffer``).
    """
    now = type(optimizer).__name__
    if saved_class is not None:
        return None if saved_class == now else f"{saved_class} in the checkpoint, {now} now"
    kinds = _saved_optimizer_kinds(saved)
    if kinds is None or now in kinds[0]:
        return None
    return f"{kinds[1]} in the checkpoint, {now} now"


def _group_label(group: Mapping[str, Any], index: int) -> str:
    return str(group.get("name", index))


def param_group_differences(saved: Mapping[str, Any], optimizer: torch.optim.Optimizer | Mapping[str, Any]) -> list[str]:
    """How the parameter groups of a saved optimizer state differ from ``optimizer``'s, in words:
    their names and number of tensors, or the first parameter that sits in another group.
    An empty list means the same layout."""
    old, new = list(saved.get("param_groups") or []), list(_optimizer_state(optimizer).get("param_groups") or [])

    def layout(groups: list[Mapping[str, Any]]) -> list[str]:
        return [f"{_group_label(g, i)}: {len(g.get('params') or [])} tensors" for i, g in enumerate(groups)]

    if layout(old) != layout(new):
        return [f"[{', '.join(layout(old))}] in the checkpoint, [{', '.join(layout(new))}] now"]
    for i, (a, b) in enumerate(zip(old, new, strict=True)):
        names_a, names_b = a.get("param_names"), b.get("param_names")
        if names_a is not None and names_b is not None and list(names_a) != list(names_b):
            j, x, y = next((j, x, y) for j, (x, y) in enumerate(zip(names_a, names_b, strict=False)) if x != y)
            return [f"tensor {j} of group {_group_label(b, i)!r}: {x!r} in the checkpoint, {y!r} now"]
    return []


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
            return False
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b


def _shown(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_shown(x) for x in v) + "]"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def optimizer_hyperparameter_differences(saved: Mapping[str, Any], optimizer: torch.optim.Optimizer | Mapping[str, Any]) -> list[str]:
    """How the hyper-parameters of a saved optimizer state's param groups differ from ``optimizer``'s,
    in words (``"weight_decay (optimizer.weight_decay): 0.05 in the checkpoint, 0.5 now"``).

    Compares every entry both groups have except the parameters, the lr (the schedule's business:
    see :func:`~mergekit_video.training.schedule.schedule_differences`) and the kernel choice; a
    difference in only some groups names them. Groups are matched by position (check
    :func:`param_group_differences` first). An empty list means the same hyper-parameters.
    """
    old, new = list(saved.get("param_groups") or []), list(_optimizer_state(optimizer).get("param_groups") or [])
    found: dict[tuple[str, str, str], list[str]] = {}
    for i, (a, b) in enumerate(zip(old, new, strict=False)):
        for key in a:
            if key in _NOT_HYPERPARAMETERS or key not in b or _same_value(a[key], b[key]):
                continue
            found.setdefault((key, _shown(a[key]), _shown(b[key])), []).append(_group_label(b, i))
    problems = []
    for (key, was, now), groups in found.items():
        where = "" if len(groups) == len(new) else f" of group{'s' * (len(groups) > 1)} {', '.join(repr(g) for g in groups)}"
        recipe = f" ({_HYPERPARAMETER_KEYS[key]})" if key in _HYPERPARAMETER_KEYS else ""
        problems.append(f"{key}{where}{recipe}: {was} in the checkpoint, {now} now")
    return problems
