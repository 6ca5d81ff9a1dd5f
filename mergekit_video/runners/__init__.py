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
    from pathlib import Path

    from ..training.distributed import barrier
    from .common import LOCK_FILE, release_output_dir

    out = Path(cfg["output_dir"])
    made = not out.exists()
    runner = build_runner(cfg, overwrite=overwrite, console=console)
    finished, phase = False, "setup"
    try:
        runner.setup()
        phase = "train"
        runner.train()
        phase = "save"
        runner.save()
        phase = "evaluate"
        runner.evaluate()
        barrier()  # DDP: no rank tears the process group down while another still writes its outputs
        finished = True
    except KeyboardInterrupt as exc:
        if str(exc):  # the trainer's own message (step, checkpoint)
            raise
        raise KeyboardInterrupt(_interrupted_in(phase, cfg, out)) from exc
    finally:
        runner.cleanup()
        release_output_dir(cfg["output_dir"])
        if not finished and made and getattr(runner, "main", True):
            _remove_if_only_recipe(out, LOCK_FILE)
    return runner


def _interrupted_in(phase: str, cfg: dict[str, Any], out: Any) -> str:
    """What a bare interrupt (a second Ctrl-C, one outside the training loop) left, and how to go on."""
    trains = cfg.get("runner") not in ("evaluate", "compare")
    if phase == "evaluate" and trains:
        return (f"stopped during the final evaluation; the trained model is saved in {out / 'model'}: rerun the same "
                f"command to evaluate it (nothing is trained again)")
    if phase == "evaluate":
        return "stopped during the evaluation; no results were written: rerun the same command to evaluate again"
    if phase in ("train", "save") and trains:
        return (f"stopped at once (a second signal, or outside a training step); the checkpoints in {out / 'checkpoints'} "
                f"are kept: rerun the same command to resume from the last one")
    return "stopped before anything was computed"


def _remove_if_only_recipe(out: Any, lock_file: str) -> None:
    """Remove the output_dir a failed run made (bad CSV content, say), if it holds nothing but its recipe.yaml."""
    try:
        if out.is_dir() and {p.name for p in out.iterdir()} <= {"recipe.yaml", lock_file}:
            for name in ("recipe.yaml", lock_file):
                (out / name).unlink(missing_ok=True)
            out.rmdir()
    except OSError:  # another process wrote there meanwhile: leave it
        pass
