"""Runners turn a validated recipe into a run: ``setup → train → save → evaluate → cleanup``.

Data flows one way: recipe → components (model, objective, data, optimizer) → runner →
metrics, checkpoints and results under ``output_dir``.
"""

from __future__ import annotations

import os
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
    from .common import LOCK_FILE, output_dir_state, release_output_dir, restore_set_aside

    out = Path(os.path.expanduser(str(cfg["output_dir"])))
    before = {p.name for p in out.iterdir()} if out.is_dir() else set()
    runner = build_runner(cfg, overwrite=overwrite, console=console)
    finished, phase = False, "setup"
    try:
        runner.setup()  # ends by deleting what --overwrite set aside (delete_set_aside)
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
        held, created = output_dir_state(out)  # a run refused by another's lock undoes nothing
        if phase == "setup" and held and getattr(runner, "main", True):
            restore_set_aside(out)  # --overwrite: the earlier run's outputs back, as the failed start found them
        runner.cleanup()
        release_output_dir(cfg["output_dir"])
        if not finished and held and getattr(runner, "main", True):
            _undo_start(out, before, LOCK_FILE, created=created, caches=_caches_inside(cfg, out))
    return runner


def _interrupted_in(phase: str, cfg: dict[str, Any], out: Any) -> str:
    """What a bare interrupt (a second Ctrl-C, one outside the training loop) left, and how to go on."""
    trains = cfg.get("runner") not in ("evaluate", "compare")
    # with train.resume: null a rerun of the same command is refused over the run's checkpoints
    rerun = "rerun the same command" + ("" if (cfg.get("train") or {}).get("resume", "auto") else " with train.resume=auto")
    if phase == "evaluate" and trains:
        return (f"stopped during the final evaluation; the trained model is saved in {out / 'model'}: {rerun} "
                f"to evaluate it (nothing is trained again)")
    if phase == "evaluate":
        kept = out / "results.partial.json"
        done = f" (those of the datasets evaluated before are in {kept})" if kept.is_file() else ""
        return f"stopped during the evaluation; no results.json was written{done}: rerun the same command to evaluate again"
    if phase in ("train", "save") and trains:
        ckpts = out / "checkpoints"
        if ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir()):
            return (f"stopped at once (a second signal, or outside a training step); the checkpoints in {ckpts} "
                    f"are kept: {rerun} to resume from the last one")
        return "stopped at once (a second signal, or outside a training step), before the first checkpoint: a rerun starts from step 1"
    return "stopped before anything was computed"


def _caches_inside(cfg: dict[str, Any], out: Any) -> set[str]:
    """The entries of ``out`` that hold only caches (the quickstart's ``text.cache_dir: ${output_dir}/cache``)."""
    from pathlib import Path

    cache = (cfg.get("text") or {}).get("cache_dir")
    if not cache:
        return set()
    try:
        inside = Path(os.path.expanduser(str(cache))).absolute().relative_to(Path(out).absolute())
    except ValueError:
        return set()
    return {inside.parts[0]} if inside.parts else set()


def _undo_start(out: Any, before: set[str], lock_file: str, *, created: bool, caches: set[str] = frozenset()) -> None:
    """A failed run (bad CSV content, say) that added nothing but its recipe.yaml, lock file and caches
    (``caches``: text features the recipe keeps inside ``out``) to ``out`` leaves it as it was: those
    removed, and the folder too when this run created it. Only a run that held the folder's lock calls
    this (one refused by another run's lock has nothing to undo)."""
    import shutil

    if "recipe.yaml" in before:
        return  # an earlier run's folder: its recipe stays
    try:
        added = {p.name for p in out.iterdir()} - before
        if not added <= {"recipe.yaml", lock_file, *caches}:
            return
        for name in added:
            if (out / name).is_dir() and not (out / name).is_symlink():
                shutil.rmtree(out / name)  # a cache folder this run made
            else:
                (out / name).unlink(missing_ok=True)
        if created:
            out.rmdir()
    except OSError:  # another process wrote there meanwhile: leave it
        pass
