"""Bad-data bookkeeping shared by the dataset and the collate function.

The dataset (in a DataLoader worker, or the main process with ``num_workers=0``) fetches every item
of a batch and then collates them in the same thread. A skipped item returns ``None``; its path is
left here, and :func:`mergekit_video.data.collate_videos` takes it into the batch's ``"failed"``
list, so the main process learns which videos failed without sharing state across processes.
The reasons travel the same way (``"errors"``), so that the main process logs each bad file once
(:func:`note_batch_failures`) however many workers met it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass

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


def _pending(name: str) -> list[str]:
    lst = getattr(_local, name, None)
    if lst is None:
        lst = []
        setattr(_local, name, lst)
    return lst


def report_skipped(path: str, *, shape: tuple[int, ...] | None = None, dtype=None) -> None:
    """Note that the item for ``path`` was skipped (the dataset returned ``None``).

    ``shape``/``dtype`` of the item it would have been let an all-skipped batch keep its rank (B = 0).
    """
    _pending("skipped").append(path)
    if shape is not None:
        _local.empty_like = (tuple(shape), dtype)


def report_resampled(path: str) -> None:
    """Note that ``path`` was bad and replaced by another item."""
    _pending("resampled").append(path)


def report_error(path: str, reason: str) -> None:
    """Note why ``path`` failed (collected into the batch's ``"errors"``)."""
    _pending_errors()[path] = reason


def _pending_errors() -> dict[str, str]:
    errors = getattr(_local, "errors", None)
    if errors is None:
        errors = _local.errors = {}
    return errors


def take_errors() -> dict[str, str]:
    """Reasons reported since the last call, by path; clears them."""
    errors = _pending_errors()
    taken = dict(errors)
    errors.clear()
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


def take_skipped(count: int) -> list[str]:
    """The paths of the last ``count`` skipped items (a batch's ``None`` entries); clears the list."""
    lst = _pending("skipped")
    taken = lst[len(lst) - count :] if count > 0 else []
    lst.clear()
    return taken


def take_empty_like() -> tuple[tuple[int, ...], object] | None:
    """(shape, dtype) of the last skipped item, if the dataset gave it."""
    return getattr(_local, "empty_like", None)


def take_resampled() -> list[str]:
    """Paths resampled since the last call; clears the list."""
    lst = _pending("resampled")
    taken = list(lst)
    lst.clear()
    return taken
