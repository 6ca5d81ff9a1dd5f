"""``mergevid``: the command-line entry point.

Sub-command groups live in their own modules and register themselves on the apps
defined here; everything heavy (torch, open_clip, decord) is imported inside commands
so that ``mergevid --help`` stays fast.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import typer

from .. import __version__
from .errors import run_app

app = typer.Typer(
    name="mergevid",
    help="Build, train and merge mixtures of experts in video models (MoTE).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
data_app = typer.Typer(help="Video dataset tools: synthetic data, annotation lists from the official files, preparation.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: each writes its results as JSON (--output) and prints a table; record them in docs/benchmarks.md.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"mergevid {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Show the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    """mergekit_video command line."""
    if debug:
        os.environ["MERGEVID_DEBUG"] = "1"
    configure_logging(debug=debug)


def configure_logging(*, debug: bool = False) -> None:
    """Library log records (bad videos, checkpoint fallbacks, merge warnings) go to stderr through rich.

    INFO and above by default, DEBUG with ``--debug``. Records still propagate, so an
    application's own handlers (and pytest's) see them too.
    """
    import logging

    logger = logging.getLogger("mergekit_video")
    if not any(getattr(h, "_mergevid", False) for h in logger.handlers):
        handler = _stderr_handler()
        handler._mergevid = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    root = logging.getLogger()
    if not root.handlers:
        # a library's module-level logging.info() (open_clip's get_tokenizer) would otherwise run
        # logging.basicConfig(), after which every record of ours printed twice; other libraries'
        # warnings still show, once
        others = _stderr_handler(level=logging.WARNING)
        others.addFilter(lambda record: not record.name.startswith("mergekit_video"))
        if os.environ.get("RANK", "0") not in ("", "0"):  # torchrun: open_clip's notes (no pretrained weights) once, from rank 0
            others.addFilter(lambda record: "open_clip" not in record.pathname)
        root.addHandler(others)


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (as rich's console does), not the stream of its creation."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _stderr_handler(level: int = 0) -> Any:
    """rich's handler on a terminal; elsewhere (a log file, a pipe) one plain line per record, never
    wrapped at 80 columns (a path cut in two is not found by grep)."""
    import logging

    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False, markup=False, level=level)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = _CurrentStderrHandler()
        handler.setLevel(level)
        handler.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))
    return handler


def _register_commands() -> None:
    # Each module adds its commands to the apps above.
    from . import commands  # noqa: F401
    from . import data_cmds  # noqa: F401


_register_commands()


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    return run_app(app, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":  # pragma: no cover
    # `python -m mergekit_video.cli.main`: this file runs as __main__, but the commands registered
    # themselves on the app of the imported module mergekit_video.cli.main; run that one
    from mergekit_video.cli.main import main as _main

    sys.exit(_main())
