"""Metrics output: JSONL (and TensorBoard), a rich progress display, and summary tables.

Only the main process writes or prints; on other ranks every method is a no-op.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["MetricsLogger", "TrainProgress", "json_line", "print_summary", "read_metrics", "summary_table"]


def _main_process() -> bool:
    from .distributed import is_main_process

    return is_main_process()


def _to_py(value: Any) -> Any:
    """Plain JSON value of a metric (tensors and numpy scalars become numbers)."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "numel", lambda: 1)() == 1:
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _to_py(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_py(v) for v in value]
    return value


def _finite_or_none(value: Any) -> Any:
    """``value`` with every NaN and infinite float replaced by None (JSON's null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def json_line(record: Mapping[str, Any]) -> str:
    """One strict-JSON line of ``record`` (NaN and infinities, which JSON lacks, written as null)."""
    return json.dumps(_finite_or_none(_to_py(record)), allow_nan=False) + "\n"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file (a line that is not JSON, such as the torn last line of a crash, is skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _lines_up_to(path: Path, step: int) -> str:
    """The text of ``path`` without the records past ``step`` (written after the checkpoint a run resumes from).

    A torn last line (a crash while writing) is dropped; any other line that is not a JSON record is
    damage, not ours to delete: it is kept as it is, and named.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    out, damaged = [], []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            if number < len(lines) and line.strip():
                damaged.append(number)
                out.append(line + "\n")
            continue
        if record.get("step", -1) <= step:
            out.append(json_line(record))
    if len(damaged) == 1:
        log.warning("%s: line %d is not a JSON record; kept as it is (readers skip it)", path, damaged[0])
    elif damaged:
        log.warning("%s: lines %s are not JSON records; kept as they are (readers skip them)", path, ", ".join(map(str, damaged)))
    return "".join(out)


class MetricsLogger:
    """Appends one JSON object per :meth:`log` call to ``{output_dir}/metrics.jsonl``.

    Each line holds ``step``, ``epoch``, ``time`` (unix seconds) and the metrics, as strict JSON:
    a NaN or infinite value (which JSON lacks) is written as null. With ``tensorboard=True``
    numeric metrics also go to ``{output_dir}/tensorboard``.

    Args:
        output_dir: the run's output folder.
        tensorboard: also write TensorBoard event files (needs the ``tensorboard`` package).
        enabled: write at all; default: only on the main process.
        resume_step: when resuming from a checkpoint at this step, lines with a larger step
            (written after that checkpoint by the interrupted run) are dropped first.
    """

    def __init__(
        self,
        *,
        output_dir: str | Path,
        tensorboard: bool = False,
        filename: str = "metrics.jsonl",
        enabled: bool | None = None,
        resume_step: int | None = None,
    ) -> None:
        self.enabled = _main_process() if enabled is None else bool(enabled)
        self.path = Path(output_dir) / filename
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError(
                    "metrics: tensorboard=True needs the 'tensorboard' package "
                    "(pip install 'mergekit_video[tensorboard]'), or set tensorboard: false"
                ) from exc
            # on resume, events the interrupted run wrote after the checkpoint are purged
            purge = None if resume_step is None else int(resume_step) + 1
            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"), purge_step=purge)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        from ..utils.io import atomic_write_text, remove_stale_atomic_temps

        remove_stale_atomic_temps(self.path)  # left by a rewrite below that a kill cut short
        if resume_step is not None and self.path.exists():
            atomic_write_text(self.path, _lines_up_to(self.path, int(resume_step)))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def log(self, metrics: Mapping[str, Any], *, step: int, epoch: float | None = None) -> None:
        """Write one record; tensor values are converted with ``.item()`` (one sync per tensor)."""
        if not self.enabled or self._file is None:
            return
        record = {"step": int(step), "epoch": epoch, "time": round(time.time(), 3)}
        for k, v in metrics.items():
            if k in record:
                raise ValueError(f"metric name {k!r} is reserved (step, epoch, time)")
            record[str(k)] = _to_py(v)
        self._file.write(json_line(record))
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "epoch", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, global_step=int(step))

    def close(self) -> None:
        """Flush and close the files (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}" if (v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5)) else f"{v:.4f}".rstrip("0").rstrip(".") or "0"
    return str(v)


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class TrainProgress:
    """Training progress: step bar with loss, lr, clips/s and ETA.

    On a terminal it is a live ``rich.progress`` bar; elsewhere (log files, CI, tests) it prints
    one plain line every ``log_every`` steps and at the last step. Disabled on non-main ranks.

    Args:
        total_steps: steps of the whole run (the bar's total).
        start_step: steps already done (when resuming).
        description: label in front of the bar.
        enabled: default: only on the main process.
        console: a ``rich.console.Console`` (default: stderr).
        log_every: plain-line period when not on a terminal.
        window: updates averaged for clips/s and ETA.
    """

    def __init__(
        self,
        *,
        total_steps: int,
        start_step: int = 0,
        description: str = "train",
        enabled: bool | None = None,
        console: Any = None,
        log_every: int = 50,
        window: int = 20,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total = int(total_steps)
        self.step = int(start_step)
        self.description = description
        self.enabled = _main_process() if enabled is None else bool(enabled)
        self.log_every = max(1, int(log_every))
        self._times: deque[tuple[float, int, int]] = deque(maxlen=max(2, window))  # (t, step, clips so far)
        self._clips = 0
        self.loss: float | None = None
        self.lr: float | None = None
        self._progress = None
        self._task = None
        self.console = None
        if not self.enabled:
            return
        from rich.console import Console

        self.console = console or Console(stderr=True)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> TrainProgress:
        """Start the display (called by ``with``)."""
        self._times.append((time.perf_counter(), self.step, self._clips))
        if self.enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            # narrow terminals drop the bar, then lr, before the step count, loss, clips/s or ETA get cut
            width = self.console.width
            columns = [TextColumn("[bold]{task.description}")]
            if width >= 100:
                columns.append(BarColumn(bar_width=min(40, width - 80)))
            columns += [MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}")]
            if width >= 72:
                columns.append(TextColumn("lr {task.fields[lr]}"))
            columns += [TextColumn("{task.fields[rate]} clips/s"), TextColumn("eta"), TimeRemainingColumn()]
            self._progress = Progress(*columns, console=self.console)
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total, completed=self.step,
                                                 loss="-", lr="-", rate="-")
        return self

    def stop(self) -> None:
        """Stop the display (called by ``with``)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> TrainProgress:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` that just passed outside training steps (a validation, a checkpoint write) out of
        the recent window, so clips/s and the ETA are those of the training steps."""
        self._times = deque(((t + seconds, s, c) for t, s, c in self._times), maxlen=self._times.maxlen)

    # -- updates ---------------------------------------------------------------------------
    @property
    def clips_per_s(self) -> float:
        """Clips per second over the recent window (0 before two updates)."""
        if len(self._times) < 2:
            return 0.0
        (t0, _, c0), (t1, _, c1) = self._times[0], self._times[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0

    @property
    def eta_s(self) -> float:
        """Seconds left at the recent steps/s (inf before two updates)."""
        if len(self._times) < 2:
            return math.inf
        (t0, s0, _), (t1, s1, _) = self._times[0], self._times[-1]
        if s1 <= s0 or t1 <= t0:
            return math.inf
        return (self.total - self.step) * (t1 - t0) / (s1 - s0)

    def update(self, *, step: int, loss: float | None = None, lr: float | None = None, clips: int = 0) -> None:
        """Record that ``step`` steps are done, ``clips`` more clips were processed, and the
        latest ``loss`` / ``lr`` (floats; convert tensors only at the logging period)."""
        if not self._times:
            self.start()
        self.step = int(step)
        self._clips += int(clips)
        if loss is not None:
            self.loss = float(loss)
        if lr is not None:
            self.lr = float(lr)
        self._times.append((time.perf_counter(), self.step, self._clips))
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=self.step, loss=_fmt(self.loss), lr=_fmt(self.lr),
                                  rate=f"{self.clips_per_s:.1f}")
        elif self.step % self.log_every == 0 or self.step >= self.total:
            self.console.print(self.line(), highlight=False, markup=False)

    def line(self) -> str:
        """The plain progress line."""
        return (f"{self.description} step {self.step}/{self.total} loss {_fmt(self.loss)} lr {_fmt(self.lr)} "
                f"{self.clips_per_s:.1f} clips/s eta {_fmt_eta(self.eta_s)}")


def summary_table(rows: Sequence[Mapping[str, Any]], title: str) -> Any:
    """A ``rich.table.Table`` of ``rows``; columns are the union of keys in first-seen order,
    floats shown with 4 significant decimals, missing cells as ``-``."""
    from rich.table import Table

    columns: list[str] = []
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(k)
    table = Table(title=title, header_style="bold", min_width=len(title))  # the title on one line
    for i, c in enumerate(columns):
        numeric = any(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in rows)
        table.add_column(str(c), justify="right" if numeric else "left", style="cyan" if i == 0 else None, overflow="fold")
    for r in rows:
        table.add_row(*(_fmt(_to_py(r.get(c))) for c in columns))
    return table


def print_summary(rows: Sequence[Mapping[str, Any]], title: str, *, console: Any = None) -> None:
    """Print :func:`summary_table` on the main process (stdout by default)."""
    if not _main_process():
        return
    from rich.console import Console

    (console or Console()).print(summary_table(rows, title))
