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
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..experts import find_containers
from ..merging import is_output_space
from ..surgery import collapse_experts
from ..utils.io import apply_default_modes, atomic_write_json, _fsync_dir
from .video_clip import VideoCLIP, video_clip_from_config

CONFIG_FILE = "config.json"
NON_TENSOR_KEY = "non_tensor_state"
CLIP_FILE = "clip.safetensors"
HEAD_FILE = "head.safetensors"
MODEL_FILE = "model.safetensors"


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


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
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
    save_file(flat, str(path), metadata=metadata)


#: A temp folder of save_model untouched for this long was left by a killed process.
STALE_TEMP_S = 600.0


def _remove_stale_temp_dirs(directory: Path) -> None:
    """Remove the temp folders (``.<name>.mergevid-tmp-XXXXXXXX``) that saves of ``directory`` killed
    midway left behind (one model's size each); a folder written to in the last :data:`STALE_TEMP_S`
    seconds may belong to a save still running and is left alone."""
    pattern = re.compile(rf"^\.{re.escape(directory.name)}\.mergevid-tmp-[a-z0-9_]{{8}}$")
    now = time.time()
    for p in directory.parent.iterdir():
        if pattern.match(p.name) and p.is_dir() and not p.is_symlink() and now - p.stat().st_mtime > STALE_TEMP_S:
            shutil.rmtree(p, ignore_errors=True)


def save_model(model: VideoCLIP, directory: str | os.PathLike, *, overwrite: bool = False, extra_config: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``directory`` atomically (temp dir, then rename).

    An existing directory is only replaced with ``overwrite=True``.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file, not a model folder; remove it or choose another path")
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True (--overwrite) to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.mergevid-tmp-", dir=directory.parent))
    try:
        from ..utils.state_json import StateEncoder, split_tensors

        config = model.config
        if extra_config:
            config.update(extra_config)
        clip_tensors, clip_other = split_tensors(model.clip.state_dict())
        head_tensors, head_other = split_tensors(model.head.state_dict())
        _save_tensors(tmp / CLIP_FILE, clip_tensors, {"format": "open_clip"})
        _save_tensors(tmp / HEAD_FILE, head_tensors, {"format": "mergekit_video/temporal_head"})
        other = {part: StateEncoder(inline=True, what=part).encode(state) for part, state in (("clip", clip_other), ("head", head_other)) if state}
        atomic_write_json(tmp / CONFIG_FILE, {**config, NON_TENSOR_KEY: other} if other else config)
        apply_default_modes(tmp)  # mkdtemp's 0700 and save_file's 0600 -> what mkdir()/open() give
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if directory.exists():
            backup = directory.with_name(f".{directory.name}.old")
            if backup.is_dir() and not backup.is_symlink():
                shutil.rmtree(backup)
            elif backup.exists() or backup.is_symlink():
                backup.unlink()
            os.replace(directory, backup)
            os.replace(tmp, directory)
            shutil.rmtree(backup)
        else:
            os.replace(tmp, directory)
        _fsync_dir(directory.parent)
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


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The model config of a model directory or trainer checkpoint."""
    return _read_config_and_state(Path(path))[0]


def _read_config_and_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model config, the encoded non-tensor state of a model directory; empty for a trainer checkpoint)."""
    if (path / CONFIG_FILE).is_file():
        config = _read_json(path / CONFIG_FILE)
        if not isinstance(config, dict):
            raise ValueError(f"{path / CONFIG_FILE} is not a mergekit_video model config (a JSON object is expected)")
        return config, config.pop(NON_TENSOR_KEY, None) or {}  # state, not architecture
    state = path / "state.json"
    if state.is_file():
        meta = _read_json(state)
        cfg = meta.get("extra", {}).get("model_config") if isinstance(meta, dict) else None
        if cfg:
            return cfg, {}
    hint = f"; it holds a run's outputs: its trained model is {path / 'model'}" if (path / "model" / CONFIG_FILE).is_file() else ""
    raise FileNotFoundError(f"{path} is not a mergekit_video model directory or checkpoint (no {CONFIG_FILE}){hint}")


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """The architecture config of a saved model (directory, export or trainer checkpoint); raises
    ``FileNotFoundError`` naming the path when it holds none."""
    return _read_config_and_state(Path(path))[0]


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu", strict: bool = True) -> VideoCLIP:
    """Load a saved VideoCLIP (model directory, export, or trainer checkpoint) in eval mode."""
    from ..utils.io import read_safetensors

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    config, other = _read_config_and_state(path)
    model = video_clip_from_config(config)
    if (path / CLIP_FILE).is_file():
        from ..utils.state_json import decode_state

        clip_sd = {**read_safetensors(path / CLIP_FILE), **decode_state(other.get("clip") or {})}
        head_sd = {**read_safetensors(path / HEAD_FILE), **decode_state(other.get("head") or {})}
    elif (path / MODEL_FILE).is_file():  # a trainer checkpoint: tied tensors and non-tensor entries restored
        from ..training.checkpoint import load_model_state

        full = load_model_state(path)  # the model only: not the optimizer's tensors
        clip_sd = {k[5:]: v for k, v in full.items() if k.startswith("clip.")}
        head_sd = {k[5:]: v for k, v in full.items() if k.startswith("head.")}
    else:
        raise FileNotFoundError(f"{path} has no {CLIP_FILE}/{HEAD_FILE} or {MODEL_FILE}")
    model.clip.load_state_dict(clip_sd, strict=strict)
    model.head.load_state_dict(head_sd, strict=strict)
    model.freeze_text()
    return model.to(device).eval()


def export_dense(model: VideoCLIP, directory: str | os.PathLike, *, strategy: str | None = None, overwrite: bool = False, **merge_kwargs: Any) -> Path:
    """Collapse the head's experts and save a plain model.

    The exported head has the plain-FFN structure with exactly the baseline's keys and
    parameter count; ``clip.safetensors`` loads into plain open_clip. ``strategy=None`` uses
    each container's own merge (mean, or the weights recorded at conversion).
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
    dense.config = {**dense.config, "exported_from": {"num_experts": int(model.head.config["num_experts"]), "merge": strategy or model.head.config["merge"]}}
    return save_model(dense, directory, overwrite=overwrite)


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())
