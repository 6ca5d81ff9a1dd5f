"""Runners turn a validated recipe into a run: ``setup → train → save → evaluate → cleanup``.

Data flows one way: recipe → components (model, objective, data, optimizer) → runner →
metrics, checkpoints and results under ``output_dir``.
"""

from __future__ import annotations

from typing import Any

from ..registry import Registry, add_registry

RUNNERS = add_registry("runners", Registry("runner", builtin_module="mergekit_video.runners.builtin"))


def build_runner(cfg: dict[str, Any], *, overwrite: bool = False, console: Any = None) -> Any:
    """The runner named by the recipe's ``runner`` key."""
    return RUNNERS.build(cfg["runner"], cfg=cfg, overwrite=overwrite, console=console)


def run_recipe(cfg: dict[str, Any], *, overwrite: bool = False, console: Any = None) -> Any:
    """Run all phases of a validated recipe; ``cleanup`` runs even when a phase fails.

    The trained model is saved before the final evaluation, so an evaluation that fails (a
    corrupt video with ``on_error: raise``, say) does not lose it. Under DDP the ranks meet once
    more before leaving the process group: the main process writes the outputs alone, and a rank
    that destroyed its group meanwhile could abort at exit.
    """
    from ..training.distributed import barrier
    from .common import release_output_dir

    runner = build_runner(cfg, overwrite=overwrite, console=console)
    try:
        runner.setup()
        runner.train()
        runner.save()
        runner.evaluate()
        barrier()  # DDP: no rank tears the process group down while another still writes its outputs
    finally:
        runner.cleanup()
        release_output_dir(cfg["output_dir"])
    return runner
