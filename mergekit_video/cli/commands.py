"""Top-level commands: ls, validate, run, eval, convert, export, bench train/head."""

from __future__ import annotations

from typing import Optional

import typer

from .main import app


@app.command("ls")
def ls_cmd(kind: Optional[str] = typer.Argument(None, help="routers | merges | regularizers (default: all)")) -> None:
    """List registered parts with their one-line docs."""
    from rich.console import Console
    from rich.table import Table

    from ..registry import REGISTRIES, get_registry

    kinds = [kind] if kind else list(REGISTRIES)
    console = Console()
    for k in kinds:
        reg = get_registry(k)
        table = Table(title=k, show_header=True, header_style="bold")
        table.add_column("name", style="cyan", no_wrap=True)
        table.add_column("description")
        for name in reg.names():
            table.add_row(name, reg.doc(name))
        console.print(table)
