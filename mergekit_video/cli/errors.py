"""One clear error message per failure; ``--debug`` (or MERGEVID_DEBUG=1) shows the traceback."""

from __future__ import annotations

import os
import sys
from typing import Any

import click


class UserError(Exception):
    """An error whose message is meant for the user as is (bad config, missing file, ...)."""


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("MERGEVID_DEBUG") == "1"


def run_app(app: Any, argv: list[str]) -> int:
    """Run a typer app, turning exceptions into one red line on stderr and exit code 1."""
    debug = _debug_requested(argv)
    try:
        app(args=argv, prog_name="mergevid", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        print("Aborted.", file=sys.stderr)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
        if debug:
            raise
        from rich.console import Console

        msg = str(e) or type(e).__name__
        if not isinstance(e, (UserError, ValueError, FileNotFoundError, FileExistsError, KeyError, ImportError, TypeError)):
            msg = f"{type(e).__name__}: {msg}"
        Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {msg}\n[dim](run with --debug for the traceback)[/]", markup=True, soft_wrap=True)
        return 1
    return 0
