"""One clear error message per failure; ``--debug`` (or MERGEVID_DEBUG=1) shows the traceback."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

try:  # recent typer vendors its own copy of click
    from typer._click import exceptions as _typer_click
except ImportError:  # pragma: no cover
    _typer_click = click.exceptions


def _both(name: str) -> tuple[type, ...]:
    """click's exception class ``name`` and typer's vendored one, when it has it."""
    return tuple({c for c in (getattr(click.exceptions, name, None), getattr(_typer_click, name, None)) if c is not None})


_EXIT = _both("Exit")
_ABORT = _both("Abort")
_CLICK_ERRORS = _both("ClickException")


class UserError(Exception):
    """An error whose message is meant for the user as is (bad config, missing file, ...)."""


class CommandLineError(UserError):
    """A mistyped command line (an unknown option read as an override): exit code 2, as click's own usage errors."""

    exit_code = 2


class Interrupted(Exception):
    """A command stopped by Ctrl-C or SIGTERM; the message says what was kept (e.g. the checkpoint).

    typer turns a ``KeyboardInterrupt`` into a bare exit code 130 and drops its message, so
    long-running commands re-raise it as this (see :func:`reraise_interrupts`). ``exit_code`` is the
    shell's for the signal: 130 (128 + SIGINT) for Ctrl-C, 143 (128 + SIGTERM) for a scheduler's stop.
    """

    def __init__(self, message: str = "", *, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def refuse_existing_output(output: Any, overwrite: bool, *, folder: bool = False) -> None:
    """Before a long command runs: its output file (``folder=True``: folder) is never replaced without ``--overwrite``,
    and a place it cannot be written to (a folder, a missing or read-only folder) is said now, not
    after the work."""
    from pathlib import Path

    output = Path(output)
    if folder and output.is_symlink():  # a model folder is replaced as a whole: never through a link (said before the work)
        raise UserError(f"{output} is a symbolic link (to {os.readlink(output)}); give the folder itself or another path")
    if output.is_dir() != folder and output.exists():
        raise UserError(f"{output} is a folder; name the file to write" if not folder else f"{output} is a file; name the folder to write")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    parent = output.absolute().parent
    if not parent.is_dir():
        raise UserError(f"cannot write {output}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {output}: folder {parent} is not writable")


def checked_device(value: str, option: str = "--device") -> str:
    """``value`` when it names a device this machine has (see ``utils.device.select_device``);
    otherwise a :class:`UserError` naming ``option`` and the values it takes, not torch's parser error."""
    import torch

    from ..runners.schema import DEVICE_VALUES
    from ..utils.device import select_device

    try:
        dev = select_device(value)
    except RuntimeError:  # torch: "Expected one of cpu, cuda, ipu, ... device type" / "Invalid device string"
        dev = None
    except ValueError:  # cuda asked for on a machine without CUDA
        raise UserError(f"{option} {value}: CUDA is not available on this machine (use auto or cpu)") from None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"{option} {value!r} is not a device: use {DEVICE_VALUES}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise UserError(f"{option} {value}: this machine has {n} CUDA device{'s' * (n != 1)} (cuda:0 to cuda:{n - 1})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{option} {value}: MPS is not available on this machine (use auto or cpu)")
    return value


def refuse_replacing_input(output: Any, source: Any) -> None:
    """An output directory that is, or holds, the command's input would destroy it when replaced;
    one inside an input folder would write into what the user gave."""
    from ..utils.io import is_within

    if is_within(source, output):
        raise UserError(f"{output} is or contains the input {source}; write to another directory")
    if os.path.isdir(source) and is_within(output, source):
        raise UserError(f"{output} is inside the input folder {source}; write to a directory outside it")


def reraise_interrupts(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; a ``KeyboardInterrupt`` (e.g. the trainer's ``TrainingInterrupted``) becomes :class:`Interrupted`.

    SIGTERM (a scheduler's preemption, ``kill``) raises a ``KeyboardInterrupt`` meanwhile too, as Ctrl-C
    does, so that outside the training loop (which handles both itself) it is said what was kept, rather
    than the process dying without a word (in a single process; DDP ranks keep the default)."""
    import signal
    import threading

    terminated = []

    def terminate(signum: int, frame: Any) -> None:
        terminated.append(signum)
        raise KeyboardInterrupt

    previous = None
    # single process only: a DDP rank blocked in a collective on a dead peer never returns to Python to
    # run a handler, so torchrun's SIGTERM must keep killing it at once
    if threading.current_thread() is threading.main_thread() and int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt as exc:
        by_sigterm = bool(terminated) or getattr(exc, "signal_name", None) == "SIGTERM"  # the trainer's stop says which
        raise Interrupted(str(exc), exit_code=128 + signal.SIGTERM if by_sigterm else 130) from exc
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def out_of_memory_message(torch_message: str) -> str:
    """What to change when the device runs out of memory, with torch's first sentences."""
    detail = ". ".join(torch_message.split(". ")[:3]).strip().rstrip(".")
    return (
        "the device ran out of memory. Lower the per-device batch (data.batch_size is the total over "
        "processes; --batch-size for mergevid bench), raise train.grad_accumulation, or set "
        f"train.grad_checkpointing=true. ({detail})"
    )


_WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):"


def without_worker_traceback(message: str) -> str:
    """A DataLoader worker's error as one line: torch re-raises it with the worker's whole traceback in the message.

    ``"Caught VideoReadError in DataLoader worker process 0.\nOriginal Traceback ...\nmod.VideoReadError: a.mp4: ..."``
    becomes ``"a.mp4: ... (in DataLoader worker process 0)"`` (the caller names the type).
    """
    head, sep, traceback_text = message.partition(_WORKER_TRACEBACK)
    lines = [line for line in traceback_text.splitlines() if line.strip()]
    if not sep or not lines:
        return message
    _, colon, detail = lines[-1].partition(": ")
    where = head.strip().rstrip(".").partition(" in ")[2]
    return f"{detail if colon else lines[-1]} (in {where})" if where else (detail if colon else lines[-1])


_PEER_GONE = "Connection closed by peer"  # gloo's words when another rank's process ended


def _launched_rank() -> int | None:
    """This process's rank when torchrun started several (``WORLD_SIZE`` > 1), else None."""
    try:
        return int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    except (KeyError, ValueError):
        return None


def global_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` with every ``--debug`` moved in front of the command (it is a global flag).

    ``mergevid run RECIPE key=value --debug`` would otherwise hand ``--debug`` to the command
    (as a recipe override, or an unknown option); returns the new argv and whether it was given.
    """
    rest = [a for a in argv if a != "--debug"]
    given = len(rest) != len(argv)
    return (["--debug", *rest] if given else rest), given


def run_app(app: Any, argv: list[str]) -> int:
    """Run a typer app, turning exceptions into one red line on stderr and exit code 1 (2 for a mistyped command line).

    ``--debug`` is accepted anywhere on the command line and shows the traceback instead.
    """
    argv, given = global_debug_flag(list(argv))
    debug = given or os.environ.get("MERGEVID_DEBUG") == "1"
    try:
        rv = app(args=argv, prog_name="mergevid", standalone_mode=False)
        if rv == 130:  # typer's answer to a KeyboardInterrupt outside reraise_interrupts
            print("Interrupted.", file=sys.stderr)
            return 130
    except Interrupted as e:
        rank = _launched_rank()
        where = f"[rank {rank}] " if rank is not None else ""  # under torchrun every rank reports: say whose it is
        print(f"{where}Interrupted: {e}" if str(e) else f"{where}Interrupted.", file=sys.stderr)
        return e.exit_code
    except _EXIT as e:
        return e.exit_code
    except _ABORT:
        print("Aborted.", file=sys.stderr)
        return 130
    except _CLICK_ERRORS as e:  # usage errors: click's own message and exit code 2
        e.show()
        return e.exit_code
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
        if debug:
            raise
        from rich.console import Console
        from rich.markup import escape

        msg = without_worker_traceback(str(e)) or type(e).__name__
        if type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError; torch is not imported here
            msg = out_of_memory_message(msg)
        elif not isinstance(e, (UserError, ValueError, FileNotFoundError, FileExistsError, KeyError, ImportError, TypeError)):
            msg = f"{type(e).__name__}: {msg}"
        rank = _launched_rank()
        if rank is not None and type(e).__name__ in ("DistBackendError", "RuntimeError") and _PEER_GONE in msg:
            msg += " (another rank stopped: its error is the one to read)"
        where = f"[rank {rank}] " if rank is not None else ""  # under torchrun every rank reports: say whose it is
        Console(stderr=True, highlight=False).print(f"[bold red]{escape(where)}error:[/] {escape(msg)}\n[dim](run with --debug for the traceback)[/]", markup=True, soft_wrap=True)
        return e.exit_code if isinstance(e, CommandLineError) else 1
    return 0
