"""Bad-data bookkeeping shared by the dataset and the collate function.

The dataset (in a DataLoader worker, or the main process with ``num_workers=0``) fetches every item
of a batch and then collates them in the same thread. A skipped item returns ``None``; its record is
left here, and :func:`mergekit_video.data.collate_videos` takes the batch's own ones (the last as
many as it has ``None`` items) into the batch's ``"failed"`` list, so the main process learns which
videos failed without sharing state across processes. A resampled item carries the bad videos it
replaced in its own dict (``"resampled"``), so nothing of a direct ``ds[i]`` call is left over for
a later batch. The reasons travel the same way (``"errors"``, from workers only), so that the main
process logs each bad file once (:func:`note_batch_failures`) however many workers met it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ON_ERROR_POLICIES = ("raise", "skip", "resample")

_local = threading.local()
log = logging.getLogger("mergekit_video.data")


@dataclass(frozen=True)
class FailureRecord:
    """One bad item: the file, its list index, the epoch, what went wrong and what was done."""

    path: str
    index: int
    epoch: int
    error: str
    action: str  # "raise" | "skip" | "resample"

    def to_dict(self) -> dict:
        """Plain dict for JSON reports."""
        return asdict(self)


@dataclass(frozen=True)
class SkipRecord:
    """A skipped item, waiting for its batch: the file, its list index, the reason (workers only), the item's shape/dtype."""

    path: str
    index: int
    reason: str | None = None
    shape: tuple[int, ...] | None = None
    dtype: object = None


def _pending_skips() -> list[SkipRecord]:
    lst = getattr(_local, "skipped", None)
    if lst is None:
        lst = _local.skipped = []
    return lst


def report_skipped(path: str, *, index: int, reason: str | None = None, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> None:
    """Note that the item for ``path`` (list index ``index``) was skipped (the dataset returned ``None``).

    ``reason`` (given in DataLoader workers) reaches the batch's ``"errors"``; ``shape``/``dtype``
    of the item it would have been let an all-skipped batch keep its rank (B = 0).
    """
    _pending_skips().append(SkipRecord(path=path, index=int(index), reason=reason, shape=None if shape is None else tuple(shape), dtype=dtype))


def take_skipped(count: int) -> list[SkipRecord]:
    """The records of the last ``count`` skipped items (a batch's ``None`` entries, fetched just before
    it is collated); clears the list, so older ones (a direct ``ds[i]`` call) never reach a batch."""
    lst = _pending_skips()
    taken = lst[len(lst) - count :] if count > 0 else []
    lst.clear()
    return taken


def note_batch_failures(batch: dict, seen: set[str]) -> None:
    """Add a collated batch's bad videos (skipped or resampled) to ``seen``, logging the new ones.

    Only failures met in DataLoader workers come with a reason (``"errors"``) and are logged here,
    once per ``seen`` set however many workers met them; a dataset read in the main process logs
    its own failures.
    """
    errors = batch.get("errors") or {}
    for key, action in (("failed", "skip"), ("resampled", "resample")):
        for path in batch.get(key) or ():
            if path not in seen and path in errors:
                log.warning("bad video (%s): %s", action, errors[path])
            seen.add(path)
