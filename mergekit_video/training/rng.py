"""Random-number state: seeding, and capture/restore of every generator a run draws from.

A resumed run must draw exactly what the uninterrupted run would have drawn, so a checkpoint
holds the state of Python's ``random``, NumPy's global generator, torch's CPU generator, every
CUDA device's generator, and the named ``torch.Generator`` objects of the model (the routers'
and regularizers' CPU generators, passed in by name).

The captured state is a dict of JSON values and ``torch.Tensor`` (uint8 byte states), which
:class:`mergekit_video.training.checkpoint.CheckpointManager` serialises.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = [
    "capture_rng_state",
    "rank_stream_seed",
    "restore_rank_streams",
    "restore_rng_state",
    "seed_everything",
    "split_streams_by_rank",
]

_MASK64 = (1 << 64) - 1


def seed_everything(seed: int, rank: int = 0, *, deterministic: bool = False) -> int:
    """Seed ``random``, NumPy and torch (CPU and every CUDA device) with ``seed + rank``.

    Each DDP rank gets its own stream (``rank`` offset) so that augmentations differ across
    ranks. ``deterministic=True`` also asks torch for deterministic kernels (slower).
    Returns the seed actually used.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    effective = seed + int(rank)
    random.seed(effective)
    try:
        import numpy as np

        np.random.seed(effective % 2**32)
    except ImportError:  # pragma: no cover - numpy ships with torch wheels
        pass
    torch.manual_seed(effective)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return effective


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Snapshot every RNG source: ``python``, ``numpy``, ``torch``, ``cuda`` and named ``generators``.

    Args:
        generators: extra ``torch.Generator`` objects by name (e.g. ``{"router.0": g}``).

    Returns:
        ``{"python": {...}, "numpy": {...} | None, "torch": ByteTensor, "cuda": [ByteTensor per
        device], "generators": {name: ByteTensor}}``; tensors are CPU clones.
    """
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state().clone(),
        "cuda": [s.clone() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "generators": {},
    }
    for name, g in (generators or {}).items():
        if not isinstance(g, torch.Generator):
            raise TypeError(f"generator {name!r} is a {type(g).__name__}, not a torch.Generator")
        state["generators"][str(name)] = g.get_state().clone()
    return state


def _numpy_state() -> dict[str, Any] | None:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return None
    st = np.random.get_state(legacy=False)
    return {
        "bit_generator": st["bit_generator"],
        "key": [int(x) for x in st["state"]["key"]],
        "pos": int(st["state"]["pos"]),
        "has_gauss": int(st["has_gauss"]),
        "gauss": float(st["gauss"]),
    }


def restore_rng_state(
    state: Mapping[str, Any],
    generators: Mapping[str, torch.Generator] | None = None,
    *,
    strict: bool = True,
) -> None:
    """Restore a :func:`capture_rng_state` snapshot in place.

    Args:
        state: the snapshot.
        generators: the live named generators to restore into (same names as at capture).
        strict: a name present on only one side (snapshot or ``generators``) is an error;
            otherwise it is skipped with a warning.

    CUDA states are restored for ``min(saved, available)`` devices; a mismatch is logged.
    """
    missing = [k for k in ("python", "torch") if k not in state]
    if missing:
        raise ValueError(f"RNG state lacks {missing} (keys present: {sorted(state)})")
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["internal"]), py["gauss_next"]))
    if state.get("numpy") is not None:
        import numpy as np

        npst = state["numpy"]
        np.random.set_state(
            {
                "bit_generator": npst["bit_generator"],
                "state": {"key": np.asarray(npst["key"], dtype=np.uint32), "pos": int(npst["pos"])},
                "has_gauss": int(npst["has_gauss"]),
                "gauss": float(npst["gauss"]),
            }
        )
    torch.set_rng_state(_byte_tensor(state["torch"]))
    cuda_states = list(state.get("cuda") or [])
    if cuda_states:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n != len(cuda_states):
            log.warning("RNG state has %d CUDA device states, this machine has %d; restoring %d",
                        len(cuda_states), n, min(n, len(cuda_states)))
        for i in range(min(n, len(cuda_states))):
            torch.cuda.set_rng_state(_byte_tensor(cuda_states[i]), device=i)
    saved = dict(state.get("generators") or {})
    live = dict(generators or {})
    only_saved = sorted(set(saved) - set(live))
    only_live = sorted(set(live) - set(saved))
    if only_saved or only_live:
        msg = (f"named RNG generators differ: in the checkpoint only {only_saved}, "
               f"in the running model only {only_live}")
        if strict:
            raise ValueError(msg)
        log.warning("%s; restoring the common ones", msg)
    for name in sorted(set(saved) & set(live)):
        live[name].set_state(_byte_tensor(saved[name]))


def _byte_tensor(x: Any) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.tensor(list(x), dtype=torch.uint8)
    return t.detach().to("cpu", torch.uint8).contiguous()


# ----------------------------------------------------------------------------------------------
# Per-rank streams of the named generators (train.routing_draws: per_rank)
# ----------------------------------------------------------------------------------------------
def rank_stream_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s stream of a generator seeded ``seed`` on rank 0.

    Rank 0 keeps ``seed`` (a one-process run draws as before); other ranks get a SplitMix64 mix
    of ``(seed, rank)``, so streams are distinct and well spread for every rank.
    """
    if rank == 0:
        return int(seed)
    x = (int(seed) + int(rank) * 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def split_streams_by_rank(generators: Mapping[str, torch.Generator], rank: int) -> None:
    """Reseed each generator with its rank-``rank`` stream (:func:`rank_stream_seed` of its seed).

    Called once at setup on every DDP rank, after the model was built with the same seed
    everywhere: each rank then draws its own experts and τ (the official MoTE code seeds each
    GPU differently).
    """
    for name in sorted(generators):
        g = generators[name]
        g.manual_seed(rank_stream_seed(g.initial_seed(), rank))


def restore_rank_streams(
    saved: list[Mapping[str, Any]] | None,
    generators: Mapping[str, torch.Generator],
    *,
    rank: int,
    world_size: int,
) -> bool:
    """Restore this rank's named generators from the per-rank states a checkpoint gathered.

    ``saved`` is the checkpoint's ``rank_generators`` list (one ``{name: ByteTensor}`` per rank).
    When it holds no states for ``world_size`` ranks (the checkpoint came from another world size,
    or from a run whose ranks shared one stream) the generators, already restored to rank 0's
    states, are split into new per-rank streams derived from those states (rank 0 keeps its
    own); a warning says so. With ``world_size=1`` (a per-rank checkpoint resumed by one process)
    the one process goes on with rank 0's streams, with a warning too.
    Returns True when the saved streams were restored exactly.
    """
    if saved is not None and len(saved) == world_size and set(saved[rank]) == set(generators):
        for name in sorted(generators):
            generators[name].set_state(_byte_tensor(saved[rank][name]))
        return True
    if rank == 0:
        had = "no per-rank streams" if saved is None else f"the streams of {len(saved)} ranks"
        if world_size == 1:
            log.warning("the checkpoint holds %s, this run has 1 process: it continues with rank 0's routing stream "
                        "for the whole batch (routing draws differ from an uninterrupted run)", had)
        else:
            log.warning("the checkpoint holds %s, this run has %d ranks: each rank continues with a new routing "
                        "stream derived from rank 0's (routing draws differ from an uninterrupted run)", had, world_size)
    if rank == 0:
        return False  # rank 0 keeps its restored stream
    for name in sorted(generators):
        g = generators[name]
        probe = torch.Generator()
        probe.set_state(g.get_state())
        g.manual_seed(rank_stream_seed(int(torch.randint(0, 2**62, (1,), generator=probe)), rank))
    return False
