"""Pieces shared by the runners: run start (devices, output folders, data), datasets, class features, evaluation suites."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..utils.device import select_device

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """Where and how a run executes: process group, device and output folder."""

    dist: Any
    main: bool
    device: torch.device
    output_dir: Path
    data_cfg: dict[str, Any]


def start_run(cfg: dict[str, Any], *, overwrite: bool) -> RunContext:
    """Common start of every runner: DDP from torchrun's environment, device, output folder
    (with the resolved recipe), the same seed on every rank (identical model init and routing),
    synthetic data when the recipe asks for it, and a check that every path the recipe names exists
    (before anything heavy is built)."""
    from ..training.distributed import init_distributed
    from ..training.rng import seed_everything

    # device: cpu on a CUDA machine: gloo (NCCL would get CPU tensors); otherwise NCCL on CUDA, gloo on the CPU
    dist = init_distributed(backend="gloo" if str(cfg.get("device", "auto")) == "cpu" else None,
                            timeout_s=float(cfg.get("dist_timeout_s", 1800.0)))
    main = dist.rank == 0
    device = select_device(cfg.get("device", "auto"), dist.local_rank)
    if device.type == "cpu":
        from ..utils.cpu import tune_cpu_allocator

        tune_cpu_allocator()  # keep freed tensor buffers in the process between steps
    check_precisions(cfg, device)  # a precision the device lacks: said now, not after an epoch of training
    from ..config.schema import expand_user_paths
    from .schema import SCHEMAS

    if isinstance(cfg.get("runner"), str) and cfg["runner"] in SCHEMAS:  # `~` in paths: read and write what check_recipe_paths checks
        expand_user_paths(cfg, SCHEMAS[cfg["runner"]])
    # before the output folder is looked at: a mistyped path is said first (not a recipe mismatch whose advice,
    # --overwrite, would delete an earlier run's outputs and then fail on that path)
    check_recipe_paths(without_synthetic_paths(cfg))  # (synthetic data's paths: checked once it is written)
    try:
        output_dir = prepare_output_dir(cfg, overwrite=overwrite, main=main)
    except OSError as err:
        if isinstance(err, FileExistsError) or err.errno not in _UNWRITABLE:
            raise  # FileExistsError: prepare_output_dir's refusals
        # a path through a file (/etc/passwd/run), a folder this user cannot write, /proc, a read-only mount: said with the key
        raise ValueError(f"output_dir={cfg['output_dir']}: cannot create or write it ({err.strerror or err}: "
                         f"{err.filename or cfg['output_dir']}); set output_dir to a folder you can write") from None
    try:
        seed_everything(cfg.get("seed", 0))
        recipe_data = dict(cfg.get("data") or {})
        data_cfg = ensure_synthetic_data(recipe_data, output_dir, main=main, overwrite=overwrite)
        if cfg.get("eval") and data_cfg is not recipe_data:  # eval paths taken from data.* (${data.val_list}) follow it
            cfg["eval"] = follow_synthetic_data(cfg["eval"], recipe_data, data_cfg)
        check_recipe_paths(cfg, data_cfg)
    except BaseException:
        held, created = output_dir_state(output_dir)
        if main and held and created:  # a run that could not start leaves no folder behind (only one this run made)
            release_output_dir(output_dir)
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
    return RunContext(dist=dist, main=main, device=device, output_dir=output_dir, data_cfg=data_cfg)


#: errno values of an output_dir that cannot be created or written (said naming the key).
_UNWRITABLE = (errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ENOENT, errno.EISDIR, errno.EROFS)

#: The ``data.*`` paths that ``data.synthetic`` points at the synthetic dataset.
SYNTHETIC_DATA_KEYS = ("root", "train_list", "val_list", "class_csv", "novel_list", "novel_class_csv")

#: What a run writes under its output_dir besides ``recipe.yaml`` and the synthetic ``data/``.
RUN_OUTPUTS = ("metrics.jsonl", "checkpoints", "model", "model_dense", "results.json", "tradeoff.png", "tensorboard")
#: What an evaluation (``evaluate`` / ``compare`` runner) writes in its output_dir, besides ``recipe.yaml``.
EVAL_OUTPUTS = ("results.json", "tradeoff.png")
#: The results of the datasets evaluated so far, while an evaluation runs (kept when a later one fails). Not an
#: output that makes a rerun with a corrected recipe "another run": the next evaluation replaces it.
PARTIAL_RESULTS = "results.partial.json"

#: Recipe keys that cannot change what a run computes, only how fast it loads data, how often it
#: logs and saves, how many checkpoints it keeps, whether it also writes the dense export and how
#: long DDP waits (lowered after a hang): a rerun that changes nothing else resumes the earlier
#: run and records the new ``recipe.yaml``.
RESULTS_NEUTRAL_KEYS = ("data.num_workers", "eval.num_workers", "train.log_every", "train.tensorboard", "train.keep_last",
                        "train.save_every_steps", "train.export_dense", "dist_timeout_s")


def only_final_evaluation(key: str) -> bool:
    """Whether a ``mote`` recipe key changes only the final evaluation (``eval.*``), not training.

    The per-epoch validation reads :data:`VALIDATION_KEYS`, so those are not. While the run has no
    results yet (its final evaluation failed), a rerun that changes only such keys resumes the
    trained run and evaluates it with the new settings.
    """
    return key.startswith("eval.") and key not in VALIDATION_KEYS


#: ``eval.*`` keys the per-epoch validation of a ``mote`` run reads too.
VALIDATION_KEYS = ("eval.batch_size", "eval.precision", "eval.test_offsets")


def check_precisions(cfg: dict[str, Any], device: torch.device) -> None:
    """Raise ``ValueError`` naming the key when ``precision``, ``eval.precision`` or ``train.val_precision``
    cannot run on ``device`` (``fp16`` needs CUDA)."""
    from ..training.precision import resolve_precision

    for key, value in (("precision", cfg.get("precision")), ("eval.precision", (cfg.get("eval") or {}).get("precision")),
                       ("train.val_precision", (cfg.get("train") or {}).get("val_precision"))):
        if value is not None:
            try:
                resolve_precision(device, value)
            except ValueError as err:
                raise ValueError(f"{key}={value}: {err}") from None


def eval_precision(cfg: dict[str, Any]) -> str:
    """Precision of validation and evaluation: ``eval.precision``, else the run's ``precision``."""
    return (cfg.get("eval") or {}).get("precision") or cfg.get("precision", "auto")


def _holds_output(path: Path) -> bool:
    """A file with content, or a folder with anything in it (an empty ``metrics.jsonl`` of a run that
    crashed at start-up is no output)."""
    return any(path.iterdir()) if path.is_dir() else path.stat().st_size > 0


def recipe_changes(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every key whose value differs between two recipes.

    Mappings are compared key by key (a missing key is ``MISSING``, a missing mapping is empty),
    lists of the same length item by item (``eval.datasets.1.list``); other values as a whole.
    """
    from ..config import MISSING

    if (isinstance(old, dict) and new is MISSING) or (old is MISSING and isinstance(new, dict)):
        old, new = (old if old is not MISSING else {}), (new if new is not MISSING else {})
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in [*old, *(k for k in new if k not in old)]:
            out += recipe_changes(old.get(k, MISSING), new.get(k, MISSING), f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [c for i, (a, b) in enumerate(zip(old, new)) for c in recipe_changes(a, b, f"{prefix}.{i}" if prefix else str(i))]
    return [] if old == new and type(old) is type(new) else [(prefix or "<recipe>", old, new)]


@dataclass(frozen=True, eq=False)
class _UnderOutputDir:
    """A recipe string that names a path inside the recipe's own ``output_dir``: equal to another
    such path with the same place relative to its ``output_dir`` (the run written as ``run``,
    ``/abs/run/`` or moved elsewhere is the same run); shown as written."""

    relative: str
    text: str

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _UnderOutputDir) and other.relative == self.relative

    def __hash__(self) -> int:
        return hash(self.relative)

    def __repr__(self) -> str:
        return repr(self.text)


def _relative_to_output_dir(node: Any, out: Path) -> Any:
    """``node`` (a loaded recipe) less its ``output_dir`` key, with every string that names a path
    inside ``out`` (resolved; ``~`` expanded) turned into :class:`_UnderOutputDir`."""

    def convert(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v) for v in value]
        if isinstance(value, str) and value and ("/" in value or os.sep in value or value.startswith("~")) and "\n" not in value:
            try:
                rel = Path(value).expanduser().resolve().relative_to(out)
            except (ValueError, OSError, RuntimeError):
                return value
            return _UnderOutputDir(relative=rel.as_posix(), text=value)
        return value

    if not isinstance(node, dict):
        return node
    return convert({k: v for k, v in node.items() if k != "output_dir"})


def _output_dir_of(recipe: Any, fallback: Path) -> Path:
    value = recipe.get("output_dir") if isinstance(recipe, dict) else None
    try:
        return Path(value).expanduser().resolve() if isinstance(value, str) and value.strip() else fallback
    except (OSError, RuntimeError):
        return fallback


def _without_new_defaults(cfg: dict[str, Any], earlier: Any, changes: list[tuple[str, Any, Any]]) -> list[tuple[str, Any, Any]]:
    """``changes`` less the keys the earlier recipe lacks and this one holds at their schema default:
    a setting a later mergekit_video added, whose default does what the earlier run did. A key whose
    section the earlier recipe lacks altogether (``data.synthetic: {}`` switched on) stays a change."""
    from ..config import MISSING, schema_default
    from .schema import SCHEMAS

    schema = SCHEMAS.get(cfg.get("runner"))
    if schema is None:
        return changes

    def has_section(key: str) -> bool:
        node = earlier
        for part in key.split(".")[:-1]:
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                return False
        return isinstance(node, dict)

    kept = []
    for key, old, new in changes:
        default = schema_default(schema, key)
        if not (old is MISSING and default is not MISSING and new == default and has_section(key)):
            kept.append((key, old, new))
    return kept


def describe_change(key: str, old: Any, new: Any) -> str:
    """``key: old -> new`` for one recipe change, each value cut to 40 characters (``(absent)`` for a missing key).

    Two lists or mappings are described at the first entry or key where they differ (a list of
    another length also says both lengths), so that values cut alike still show the change.

    Two long strings (paths) are shown from the path part where they start to differ, so that
    ``.../annotations/zs_labels.csv`` and ``.../annotations/zs_labels_v2.csv`` do not print alike.
    """
    from ..config import MISSING

    if isinstance(old, list) and isinstance(new, list) and old != new:  # shown at the first entry that differs
        i = next((j for j, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
        inner = describe_change(f"{key}.{i}", old[i] if i < len(old) else MISSING, new[i] if i < len(new) else MISSING)
        return inner if len(old) == len(new) else f"{key}: {len(old)} entries -> {len(new)} ({inner})"
    if isinstance(old, dict) and isinstance(new, dict) and old != new:
        k = next(k for k in [*old, *(k for k in new if k not in old)] if old.get(k, MISSING) != new.get(k, MISSING))
        return describe_change(f"{key}.{k}", old.get(k, MISSING), new.get(k, MISSING))
    if isinstance(old, str) and isinstance(new, str) and max(len(old), len(new)) > 38:
        same = len(os.path.commonprefix([old, new]))
        cut = old.rfind("/", 0, same)
        cut = old.rfind("/", 0, cut) if cut > 0 else cut  # one folder of context
        if cut > 0:
            same = same - cut + 3  # in the shortened strings, "..." included
            old, new = "..." + old[cut:], "..." + new[cut:]
        if max(len(old), len(new)) > 38 and same > 20:  # the difference late in a long name: shown from near it
            start = same - 12
            old, new = "..." + old[start:], "..." + new[start:]

    def show(v: Any) -> str:
        text = "(absent)" if v is MISSING else repr(v)
        return text if len(text) <= 40 else text[:37] + "..."

    return f"{key}: {show(old)} -> {show(new)}"


def recorded_recipe_changes(cfg: dict[str, Any], recorded: str, out: str | os.PathLike) -> list[tuple[str, Any, Any]]:
    """The changes (:func:`recipe_changes`) from ``recorded``, the text of a ``recipe.yaml`` a run wrote in ``out``,
    to the resolved recipe ``cfg`` that a run there would record, as :func:`prepare_output_dir` compares them:
    ``output_dir`` and the paths inside it relative to each recipe's own ``output_dir`` (``run``, ``/abs/run/``
    and a moved run are the same run), and settings a later mergekit_video added, left at their defaults, are
    no change."""
    import yaml

    from ..config import dump_recipe

    earlier = yaml.safe_load(recorded)
    here = Path(os.path.expanduser(str(out))).resolve()
    changes = recipe_changes(
        _relative_to_output_dir(earlier, _output_dir_of(earlier, here)), _relative_to_output_dir(yaml.safe_load(dump_recipe(cfg)), here)
    )
    return _without_new_defaults(cfg, earlier, changes)


#: Where ``--overwrite`` puts an earlier run's outputs (and its recipe.yaml) until the new run has started.
OVERWRITTEN_DIR = ".mergevid-overwritten"


def _set_aside(out: Path, outputs: Sequence[Path], recipe: Path | None) -> None:
    """Move ``outputs`` (and a copy of the earlier ``recipe``) into :data:`OVERWRITTEN_DIR` (renames in one folder:
    nothing is copied); :func:`delete_set_aside` deletes them once the run has started, :func:`restore_set_aside`
    puts them back when it fails to start (a check of the runner's setup: the frame size the model takes)."""
    aside = out / OVERWRITTEN_DIR
    if aside.exists():
        shutil.rmtree(aside)
    aside.mkdir()
    if recipe is not None:
        shutil.copy2(recipe, aside / "recipe.yaml")
    for path in outputs:
        os.replace(path, aside / path.name)


def delete_set_aside(out: str | os.PathLike, *, main: bool = True) -> None:
    """Delete what ``--overwrite`` set aside in ``out`` (the run has started: its setup passed)."""
    aside = Path(out) / OVERWRITTEN_DIR
    if main and aside.is_dir():
        names = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in aside.iterdir() if p.name != "recipe.yaml"))
        shutil.rmtree(aside)
        log.warning("--overwrite: deleted the earlier outputs in %s (%s)", out, names)


def restore_set_aside(out: str | os.PathLike) -> bool:
    """Put back what ``--overwrite`` set aside in ``out`` (the run failed to start, or was killed before): the earlier
    run's outputs and recipe.yaml, as they were. Whether anything was put back."""
    out = Path(out)
    aside = out / OVERWRITTEN_DIR
    if not aside.is_dir():
        return False
    for path in aside.iterdir():
        target = out / path.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)  # what the failed start wrote in its place (an empty metrics folder, a new recipe.yaml)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(path, target)
    aside.rmdir()
    log.warning("--overwrite: the run did not start; the earlier outputs in %s are back as they were", out)
    return True


def output_dir_problem(cfg: dict[str, Any]) -> tuple[str, str | None]:
    """``(kind, message)``: why a run of ``cfg`` cannot write its ``output_dir``, or ``(\"\", None)`` when it can. Only
    looks (creates nothing): :func:`prepare_output_dir` refuses with it, ``mergevid validate --check-paths`` says it.

    ``kind`` is ``"file"`` (output_dir is a file), ``"unwritable"`` (a path under a file, or in a folder this user
    cannot write) or ``"input"``: an evaluation (``evaluate`` / ``compare``) whose output_dir holds a training run, is,
    holds or lies inside the ``checkpoint`` it reads, or is the folder of one of its lists, class CSVs or video roots;
    it would write its recipe.yaml and results.json among them (and ``--overwrite`` would set aside a results.json
    found there). None of these is lifted by ``--overwrite``."""
    from ..utils.io import is_within

    out = Path(os.path.expanduser(str(cfg["output_dir"])))
    if out.exists() and not out.is_dir():
        return "file", f"output_dir {out} is a file, not a folder; set output_dir to a folder (new or of an earlier run)"
    folder = out.absolute()
    while not os.path.lexists(folder) and folder != folder.parent:  # the nearest part of it that exists
        folder = folder.parent
    if folder.exists() and not folder.is_dir():
        return "unwritable", (f"output_dir={cfg['output_dir']}: cannot create or write it (Not a directory: {folder} is a file); "
                              "set output_dir to a folder you can write")
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        return "unwritable", (f"output_dir={cfg['output_dir']}: cannot create or write it (Permission denied: folder {folder} is "
                              "not writable); set output_dir to a folder you can write")
    if cfg.get("runner") in ("evaluate", "compare"):
        # never into a training run's folder: its results.json and recipe.yaml are the run's record
        trained = [name for name in RUN_OUTPUTS if name not in EVAL_OUTPUTS and (out / name).exists() and _holds_output(out / name)]
        if trained:
            return "input", (f"output_dir {out} holds a training run ({', '.join(trained)}); an evaluation would replace its "
                             f"recipe.yaml and results.json: evaluate into another folder (mergevid eval: --output-dir DIR)")
        advice = "evaluate into another folder (output_dir=DIR; for a model folder, mergevid eval --output-dir DIR)"
        checkpoint = cfg.get("checkpoint")
        if isinstance(checkpoint, str) and checkpoint and os.path.exists(os.path.expanduser(checkpoint)):
            checkpoint = os.path.expanduser(checkpoint)
            if is_within(out, checkpoint) or is_within(checkpoint, out):
                where = ("is" if is_within(checkpoint, out) and is_within(out, checkpoint) else
                         "lies inside" if is_within(out, checkpoint) else "holds")
                return "input", (f"output_dir {out} {where} the checkpoint {checkpoint} that this evaluation reads; it would "
                                 f"write its recipe.yaml and results.json there: {advice}")
        from ..config.schema import path_values
        from .schema import SCHEMAS

        for key, value in path_values(cfg, SCHEMAS[cfg["runner"]]) if cfg["runner"] in SCHEMAS else []:
            value = os.path.expanduser(value)
            parts = key.split(".")
            if parts[0] != "eval" or not os.path.exists(value):
                continue
            root = parts[-1] == "root"  # a folder (of videos); the other keys name files (lists, class CSVs)
            if Path(value if root else os.path.dirname(os.path.abspath(value))).resolve() == out.resolve():
                what = f"is {key}={value}, a folder this evaluation reads" if root else f"is the folder of {key}={value}, an input of this evaluation"
                return "input", f"output_dir {out} {what}; it would write its recipe.yaml and results.json there: {advice}"
    return "", None


def prepare_output_dir(cfg: dict[str, Any], *, overwrite: bool, main: bool) -> Path:
    """Create ``output_dir`` and save the resolved recipe there.

    Nothing there is replaced without ``overwrite`` (``--overwrite``): a folder holding files but
    no ``recipe.yaml``, or the outputs of a *different* recipe, is refused. The same recipe (a rerun,
    a resume) is fine; so is one that differs only in :data:`RESULTS_NEUTRAL_KEYS` (the run resumes
    and the new ``recipe.yaml`` is recorded), and a changed recipe when the earlier run left no
    outputs (it failed at start-up). With ``overwrite``, the outputs of an earlier, different run
    (or files named like them in a folder without ``recipe.yaml``) are deleted first
    (:data:`RUN_OUTPUTS`; an evaluation's: :data:`EVAL_OUTPUTS`), so that the new run neither
    resumes from nor appends to them: set aside first (:func:`_set_aside`), deleted when the runner's
    setup has passed, put back when it fails. So are, with ``train.resume`` null, the outputs of the same
    recipe (whatever is left of them); a ``train.resume`` path inside the run's own folder is refused,
    ``overwrite`` or not (:func:`_refuse_resuming_inside_the_run`).
    """
    import yaml

    from ..config import dump_recipe, is_recorded_recipe, save_resolved_recipe

    if isinstance(cfg.get("output_dir"), str) and cfg["output_dir"].startswith("~"):
        cfg["output_dir"] = os.path.expanduser(cfg["output_dir"])  # written where check_paths looks
    out = Path(cfg["output_dir"])
    kind, problem = output_dir_problem(cfg)
    if problem is not None:  # before anything is created there
        raise (ValueError if kind == "unwritable" else FileExistsError)(problem)  # unwritable: said as start_run says OSErrors
    if main:
        lock_output_dir(out)  # before anything is read or written there: one run per folder at a time
        if restore_set_aside(out):  # an --overwrite run killed before it started: the earlier run's outputs back first
            kind, problem = output_dir_problem(cfg)  # among them, a training run that an evaluation must not write into
            if problem is not None:
                release_output_dir(out)
                raise (ValueError if kind == "unwritable" else FileExistsError)(problem)
        saved = out / "recipe.yaml"
        # data/ is checked on its own (ensure_synthetic_data); a run writes nothing else there
        evaluation = cfg.get("runner") in ("evaluate", "compare")
        written = EVAL_OUTPUTS if evaluation else RUN_OUTPUTS
        outputs = [out / name for name in written if (out / name).exists() and _holds_output(out / name)]
        if not saved.exists() and out.is_dir() and any(p.name not in ("data", LOCK_FILE) for p in out.iterdir()) and not overwrite:
            release_output_dir(out)
            (out / LOCK_FILE).unlink(missing_ok=True)  # leave the user's folder as it was
            named = ", ".join(p.name + ("/" if p.is_dir() else "") for p in outputs)
            raise FileExistsError(f"output_dir {out} holds files but no recipe.yaml of an earlier run; choose another output_dir, "
                                  "or pass --overwrite to write into it" + (f" (DELETING its {named}, which a run writes)" if named else ""))
        text = dump_recipe(cfg)
        previous = saved.read_text(encoding="utf-8") if saved.is_file() else None
        if previous is not None and not is_recorded_recipe(previous):
            release_output_dir(out)
            (out / LOCK_FILE).unlink(missing_ok=True)  # leave the user's folder as it was
            what = "a recipe.yaml that no run wrote (a hand-written recipe?)"
            try:
                yaml.safe_load(previous)
            except yaml.YAMLError:
                what = "a recipe.yaml that is not valid YAML (damaged, or not a run's)"
            raise FileExistsError(
                f"output_dir {out} holds {what}; a run records its resolved recipe there and would replace it, "
                f"--overwrite or not: move {saved} elsewhere or set output_dir to another folder"
            )
        if not evaluation and outputs:
            _refuse_resuming_inside_the_run(cfg, out)
        changes = recorded_recipe_changes(cfg, previous, out) if previous is not None and previous != text else []
        # a trained run whose final evaluation failed (no results yet) may be evaluated with other eval.* settings
        unevaluated = cfg.get("runner") not in ("evaluate", "compare") and out / "results.json" not in outputs
        # train.resume between null and auto says whether to continue, not what is trained (null is checked below)
        neutral = bool(changes) and all(
            key in RESULTS_NEUTRAL_KEYS or (unevaluated and only_final_evaluation(key))
            or (key == "train.resume" and {_resume_kind(old), _resume_kind(new)} <= {"fresh", "auto"})
            for key, old, new in changes
        )
        # files named like a run's outputs in a folder without recipe.yaml (overwrite given): replaced, not appended to
        foreign = previous is None and bool(outputs)
        # train.resume: null trains from step 1: whatever the earlier run left (checkpoints, metrics, or a trained
        # model and results whose checkpoints/ was deleted to save space) would be replaced
        restart = (not evaluation and (not changes or neutral) and previous is not None
                   and _resume_kind((cfg.get("train") or {}).get("resume", "auto")) == "fresh" and bool(outputs))
        if restart and not overwrite:
            release_output_dir(out)
            listed = ", ".join(p.name + ("/" if p.is_dir() else "") for p in outputs)
            trained = [p.name for p in outputs if p.name in ("model", "model_dense", "results.json")]
            if trained and not any(p.name == "checkpoints" for p in outputs):  # nothing that train.resume=auto could continue
                raise FileExistsError(
                    f"output_dir {out} holds a trained run of this recipe ({listed}) but no checkpoint to continue from, "
                    f"and train.resume is null, which trains from step 1 and would replace them. Evaluate the saved model with "
                    f"mergevid eval {out / ('model' if 'model' in trained else trained[0])} ..., use another output_dir, or pass "
                    f"--overwrite to DELETE its {listed} and train again from step 1"
                )
            raise FileExistsError(
                f"output_dir {out} holds an earlier run of this recipe ({', '.join(p.name for p in outputs)}), and train.resume is null, "
                f"which trains from step 1 and would replace them: set train.resume=auto to continue it, use another "
                f"output_dir, or pass --overwrite to DELETE its {listed} and train again from step 1"
            )
        if outputs and ((changes and not neutral) or foreign or restart):
            if not overwrite:
                names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in outputs)
                # the keys that make it another run first (those allowed to change are said after, by name)
                deciding = [c for c in changes if c[0] not in RESULTS_NEUTRAL_KEYS] or changes
                shown = "; ".join(describe_change(*c) for c in deciding[:5]) + (f"; and {len(deciding) - 5} more" if len(deciding) > 5 else "")
                if cfg.get("runner") in ("evaluate", "compare"):  # nothing to resume: an evaluation reruns whole
                    raise FileExistsError(
                        f"output_dir {out} holds the outputs of a different recipe ({shown}). Use another output_dir "
                        f"(output_dir=DIR; for a model folder, mergevid eval --output-dir DIR), or pass --overwrite to DELETE "
                        f"its {names} and evaluate into it"
                    )
                recorded = _recorded_runner(previous)
                if recorded in ("evaluate", "compare") and not (out / "model").is_dir():  # no training run to continue or evaluate
                    raise FileExistsError(
                        f"output_dir {out} holds the results of an evaluation (its recipe.yaml: runner '{recorded}'), not a "
                        f"training run. Use another output_dir, or pass --overwrite to DELETE its {names} and train into it"
                    )
                raise FileExistsError(
                    f"output_dir {out} holds an earlier run of a different recipe ({shown}). A run resumes only with the "
                    f"same recipe (it may differ in {', '.join(RESULTS_NEUTRAL_KEYS)}; until it has results, also in the "
                    f"eval.* keys of the final evaluation but {', '.join(VALIDATION_KEYS)}). "
                    + (f"To evaluate its model otherwise: mergevid eval {out / 'model'} --list LIST --classes CSV. " if (out / "model").is_dir()
                       else "It saved no model yet (interrupted: rerun its own recipe.yaml to continue it). ") +
                    f"Or use another output_dir, or pass --overwrite to DELETE the earlier run's {names} and train again from step 1"
                )
            _refuse_deleting_inputs(cfg, outputs)
            moved = ", ".join(p.name + ("/" if p.is_dir() else "") for p in outputs)
            _set_aside(out, outputs, saved if saved.is_file() else None)
            log.warning("--overwrite: the earlier outputs in %s (%s) are set aside in %s/ and deleted once the run has "
                        "started (put back if it fails to start)", out, moved, OVERWRITTEN_DIR)
            outputs = []
        elif overwrite and outputs and not evaluation:
            log.warning("--overwrite: %s holds an earlier run of this recipe, which resumes; nothing was deleted (to train "
                        "from step 1, set train.resume=null with --overwrite, or use another output_dir)", out)
        out.mkdir(parents=True, exist_ok=True)
        if neutral and outputs:
            log.info("output_dir %s: resuming the earlier run; recipe.yaml records the changed settings (%s), which do not change "
                     "what it trains%s", out, "; ".join(describe_change(*c) for c in changes),
                     "; the final evaluation runs with them" if any(only_final_evaluation(k) for k, _, _ in changes) else "")
        save_resolved_recipe(cfg, saved, overwrite=True)  # atomic; the same text is left alone
    return out


def _recorded_runner(recorded: str | None) -> Any:
    """The ``runner`` of a recorded ``recipe.yaml``'s text (None when it names none or is not a mapping)."""
    import yaml

    try:
        earlier = yaml.safe_load(recorded) if recorded is not None else None
    except yaml.YAMLError:
        return None
    return earlier.get("runner") if isinstance(earlier, dict) else None


def _refuse_resuming_inside_the_run(cfg: dict[str, Any], out: Path) -> None:
    """``train.resume`` naming a checkpoint (or the checkpoints) of the run that ``out`` already holds: refused,
    ``--overwrite`` or not. In its own folder a run continues only from its latest checkpoint (``auto``); from an
    older one it would replace the checkpoints, metrics and model saved after it (and ``--overwrite`` would delete
    the checkpoint it reads). Training from it into another folder leaves the run as it is."""
    from ..training.checkpoint import resume_kind
    from ..utils.io import is_within

    value = (cfg.get("train") or {}).get("resume", "auto")
    if not isinstance(value, str) or resume_kind(value) != "path":
        return
    try:
        inside = is_within(os.path.expanduser(value), out)
    except (OSError, RuntimeError):
        return
    if inside:
        release_output_dir(out)
        raise FileExistsError(
            f"train.resume={value} is inside output_dir {out}, which holds the run it belongs to: in its own folder a run "
            f"continues only from its latest checkpoint (train.resume=auto), and continuing from another one there would replace "
            f"the checkpoints, metrics and model saved after it (--overwrite or not: it would delete the checkpoint it reads). "
            f"To continue from that checkpoint, train into another folder: output_dir=NEW train.resume={value} "
            f"({out} stays as it is); to continue {out} from its latest checkpoint, set train.resume=auto"
        )


def _resume_kind(value: Any) -> str:
    """:func:`~mergekit_video.training.checkpoint.resume_kind` of a recipe's ``train.resume`` (``"never"`` starts
    fresh as ``null`` does); a value that is no resume setting at all (absent from a recipe) is ``"other"``."""
    from ..config import MISSING
    from ..training.checkpoint import resume_kind

    if value is MISSING or isinstance(value, _UnderOutputDir):
        return "other" if value is MISSING else "path"
    return resume_kind(value) if value is None or isinstance(value, (bool, str)) else "other"


#: The file a running run holds an advisory lock on, in its output_dir.
LOCK_FILE = ".mergevid.lock"
_held_locks: dict[str, int] = {}  # resolved output_dir → the open lock file (closing it releases the lock)
_created_dirs: set[str] = set()  # resolved output_dirs this process's lock_output_dir created
_unlocked_dirs: set[str] = set()  # resolved output_dirs this process uses where no lock can be taken (Windows, some NFS)


def output_dir_state(out: str | os.PathLike) -> tuple[bool, bool]:
    """``(held, created)``: whether this process holds ``out`` (its lock, or the folder where no lock can be
    taken), and whether it created the folder. Only a run that holds the folder may undo its start, and
    only remove a folder it created."""
    key = str(Path(out).resolve())
    return key in _held_locks or key in _unlocked_dirs, key in _created_dirs


def lock_output_dir(out: Path) -> None:
    """Hold an exclusive lock on ``out`` for as long as this process runs in it (or until
    :func:`release_output_dir`); refuse when another process holds it.

    Two runs in one folder would delete each other's half-written checkpoints and interleave
    their metrics (a rerun while the workers of a killed ``torchrun`` still train, say). The lock
    is ``fcntl.flock`` on ``LOCK_FILE``: the kernel releases it when the holder dies, so a killed
    run never leaves a stale lock. Where ``fcntl`` does not exist (Windows) nothing is locked.
    """
    key = str(out.resolve())
    if key in _held_locks or key in _unlocked_dirs:
        _created_dirs.discard(key)  # held from an earlier start in this process (a notebook): this start made nothing
        return
    try:
        out.mkdir(parents=True)  # not exist_ok: whether this process made the folder is known without a race
        _created_dirs.add(str(out.resolve()))
    except FileExistsError:
        pass
    key = str(out.resolve())
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        _unlocked_dirs.add(key)
        return
    try:
        fd, writable = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666), True
    except PermissionError:  # a lock file another user made in a shared folder: flock needs only read access
        try:
            fd, writable = os.open(out / LOCK_FILE, os.O_RDONLY), False
        except OSError as exc:
            raise PermissionError(f"output_dir {out}: cannot open its lock file {out / LOCK_FILE} ({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if not isinstance(exc, BlockingIOError):  # a filesystem without locks (ENOLCK on some NFS mounts): run unlocked
            os.close(fd)
            log.warning("output_dir %s cannot be locked (%s); nothing stops a second run from using it at the same time", out, exc)
            _unlocked_dirs.add(key)
            return
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise FileExistsError(
            f"output_dir {out} is in use by another run (pid {holder}); wait for it to end or stop it "
            "(after killing torchrun, its worker processes may still run), or choose another output_dir"
        ) from None
    if writable:  # the holder's pid, for the refusal above
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    _held_locks[key] = fd


def _forget_locks_in_child() -> None:
    # a forked child (a DataLoader worker) closes its copies of the lock files: the lock stays the
    # parent's (it lives while any copy is open) and ends when the parent lets go, whatever the child does
    for fd in _held_locks.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held_locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def release_output_dir(out: str | os.PathLike) -> None:
    """Let go of :func:`lock_output_dir`'s lock on ``out`` (if this process holds it)."""
    key = str(Path(out).resolve())
    fd = _held_locks.pop(key, None)
    _created_dirs.discard(key)
    _unlocked_dirs.discard(key)
    if fd is not None:
        os.close(fd)


def _refuse_deleting_inputs(cfg: dict[str, Any], outputs: list[Path]) -> None:
    """``--overwrite`` deletes ``outputs``: refuse when the run reads a file inside one of them."""
    from ..config.schema import path_values
    from ..utils.io import is_within
    from .schema import SCHEMAS

    schema = SCHEMAS.get(cfg.get("runner"))
    inputs = path_values(cfg, schema) if schema is not None else []  # every file the recipe reads: lists, weights, checkpoints
    for key, value in inputs:
        if not os.path.exists(value):  # "auto", tags and files not there name nothing to lose
            continue
        for output in outputs:
            if is_within(value, output):
                raise FileExistsError(
                    f"--overwrite would delete {output}, which holds {key}={value}, an input of this run; "
                    "choose another output_dir"
                )


def synthetic_replaced_keys(data_cfg: dict[str, Any]) -> list[str]:
    """The ``data.*`` path keys a recipe sets that ``data.synthetic`` replaces with its own dataset's files."""
    if not data_cfg.get("synthetic"):
        return []
    return [f"data.{k}={data_cfg[k]}" for k in SYNTHETIC_DATA_KEYS if data_cfg.get(k) not in (None, "")]


def synthetic_replacement_note(data_cfg: dict[str, Any]) -> str | None:
    """A sentence saying which of the recipe's data paths ``data.synthetic`` replaces (None when none)."""
    replaced = synthetic_replaced_keys(data_cfg)
    if not replaced:
        return None
    return (f"data.synthetic is set: the run writes a synthetic dataset to output_dir/data and trains and evaluates on it "
            f"in place of {', '.join(replaced)}; to use those files, remove data.synthetic (override ~data.synthetic)")


def ensure_synthetic_data(data_cfg: dict[str, Any], output_dir: Path, *, main: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Write the synthetic dataset under ``{output_dir}/data`` (once) and point the data keys at it.

    A dataset already there is reused when it was written with the recipe's ``data.synthetic``
    settings; other contents of that folder are replaced only with ``overwrite`` (``--overwrite``).
    """
    syn = data_cfg.get("synthetic")
    if not syn:
        return data_cfg
    from ..data.synthetic import synthetic_layout, synthetic_settings, write_synthetic_dataset

    note = synthetic_replacement_note(data_cfg)
    if main and note:  # a copied quickstart with the user's own lists added: never silently ignored
        log.warning(note)

    from .schema import SYNTHETIC

    root = output_dir / "data"
    # the recipe's settings over the schema's defaults (a recipe run was validated with them filled in already)
    wanted = {key: syn.get(key, field.default) for key, field in SYNTHETIC.fields.items()}
    wanted["size"] = list(wanted["size"])
    recorded = synthetic_settings(root)
    if main and not (recorded is not None and all(recorded.get(k) == v for k, v in wanted.items())):
        from ..data.synthetic import GENERATED_ENTRIES

        if root.is_symlink():  # the dataset it points at is someone's: never written through
            raise FileExistsError(f"{root} is a symbolic link (to {os.readlink(root)}); data.synthetic writes its dataset into "
                                  f"output_dir/data and would replace what the link points at: remove the link or use another output_dir")
        clashing = sorted(p.name for p in root.iterdir() if p.name in GENERATED_ENTRIES) if root.is_dir() else []
        if recorded is None and clashing:  # not a dataset data.synthetic wrote: the files are the user's
            raise FileExistsError(
                f"{root} holds {', '.join(clashing)}, which data.synthetic did not write and would replace; they are never "
                "deleted, --overwrite or not: move them, or use another output_dir"
            )
        if recorded is not None and not overwrite:
            raise FileExistsError(f"{root} was written with other data.synthetic settings; pass --overwrite to rewrite it "
                                  "(its videos/, lists and class CSVs), or use another output_dir")
        if recorded is not None:
            log.warning("--overwrite: rewriting %s with the recipe's data.synthetic settings", root)
        # allowed now: an earlier synthetic dataset (--overwrite), or files whose names it does not write (they stay)
        write_synthetic_dataset(root, **{**wanted, "size": tuple(wanted["size"])}, overwrite=True)
    _barrier()
    layout = synthetic_layout(root)
    return {**data_cfg, **{key: str(getattr(layout, key)) for key in SYNTHETIC_DATA_KEYS}}


def follow_synthetic_data(eval_cfg: dict[str, Any], recipe_data: dict[str, Any], data_cfg: dict[str, Any]) -> dict[str, Any]:
    """``eval`` with every dataset path that equals a ``data.*`` path of the recipe (a paper recipe's
    ``list: ${data.val_list}``) pointed at the same file of the synthetic data that replaced it."""
    moved = {recipe_data[k]: data_cfg[k] for k in SYNTHETIC_DATA_KEYS if recipe_data.get(k) and recipe_data[k] != data_cfg.get(k)}
    if not moved:
        return eval_cfg

    def follow(entry: dict[str, Any], where: str) -> dict[str, Any]:
        out = dict(entry)
        for key in ("root", "list", "class_csv"):
            if isinstance(out.get(key), str) and out[key] in moved:
                log.info("data.synthetic: %s.%s follows the data keys to %s", where, key, moved[out[key]])
                out[key] = moved[out[key]]
        return out

    datasets = []
    for i, ds in enumerate(eval_cfg.get("datasets") or []):
        ds = follow(ds, f"eval.datasets.{i}")
        if ds.get("splits"):
            ds["splits"] = [follow(sp, f"eval.datasets.{i}.splits.{j}") for j, sp in enumerate(ds["splits"])]
        datasets.append(ds)
    return {**eval_cfg, "datasets": datasets}


def read_clip_blend_base(model: Any, cfg: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The pretrained visual weights ``eval.clip_blend`` blends with (None when it is not set)."""
    from ..models.clip import pretrained_clip_state

    ev = cfg.get("eval") or {}
    if not ev.get("clip_blend"):
        return None
    return pretrained_clip_state(model, weights=ev.get("clip_blend_weights"), cache_dir=(cfg.get("model") or {}).get("cache_dir"))


def check_recipe_paths(cfg: dict[str, Any], data_cfg: dict[str, Any] | None = None, *, contents: bool = False) -> None:
    """Fail fast, naming the key, when a list, class CSV, data root or checkpoint of the recipe is missing.

    Called after :func:`ensure_synthetic_data` (whose files then exist) and before the model is built.
    ``contents`` (``mergevid validate --check-paths``): also read every annotation list and class CSV,
    as the run will, so that one in another format (an official split file) is named by its key now.
    """
    from ..config import ValidationError, check_paths
    from .schema import SCHEMAS

    schema = SCHEMAS.get(cfg.get("runner", ""))
    if schema is None:
        return
    full = {**cfg, "data": data_cfg} if data_cfg else cfg
    problems = check_paths(full, schema)
    if contents:  # the files that exist are read even when others are missing: every problem in one pass
        problems = [*problems, *_annotation_file_problems(full, schema)]
    if problems:
        raise ValidationError(problems)


def list_label_problem(list_file: str | os.PathLike, class_csv: str | os.PathLike, *, list_format: str = "video",
                       on_error: str = "raise") -> str | None:
    """Why ``list_file``'s labels do not fit the class names of ``class_csv`` (a label past the last id), or None.

    The dataset's own refusal (:func:`~mergekit_video.data.datasets.label_range_problem`, with its allowance for
    a few stray lines under ``skip``/``resample``), said before a run trains for hours and then builds its
    evaluation sets. Files that are missing or unreadable are left to the checks that name them (None here).
    """
    from ..data import VideoDataset
    from ..data.annotations import read_annotation_list, read_class_names
    from ..data.datasets import label_range_problem

    try:
        records = read_annotation_list(os.path.expanduser(str(list_file)), list_format)
        num_classes = len(read_class_names(os.path.expanduser(str(class_csv))))
    except (ValueError, OSError):
        return None
    return label_range_problem(records, num_classes, list_file=list_file, source=class_csv, on_error=on_error,
                               stray_fraction=VideoDataset.stray_label_fraction)


#: Path keys holding an annotation list (read with the list format of their section) or a class CSV.
_LIST_KEYS, _CLASS_CSV_KEYS = ("train_list", "val_list", "list"), ("class_csv",)


def _annotation_file_problems(cfg: dict[str, Any], schema: Any) -> list[Any]:
    """A problem, under its key, for each annotation list or class CSV of ``cfg`` that the run could not read."""
    from ..config import Problem
    from ..config.schema import path_values
    from ..data.annotations import read_annotation_list, read_class_names

    problems = []
    for key, value in path_values(cfg, schema):
        parts = key.split(".")
        if parts[-1] not in _LIST_KEYS + _CLASS_CSV_KEYS or not Path(os.path.expanduser(value)).is_file():
            continue
        section: Any = cfg
        if parts[0] == "data":
            section = cfg.get("data") or {}
        elif parts[:2] == ["eval", "datasets"] and len(parts) > 2 and parts[2].isdigit():
            section = ((cfg.get("eval") or {}).get("datasets") or [{}])[int(parts[2])]
        try:
            if parts[-1] in _CLASS_CSV_KEYS:
                read_class_names(os.path.expanduser(value))
                continue
            records = read_annotation_list(os.path.expanduser(value), section.get("list_format") or "video")
        except (ValueError, OSError) as e:
            problems.append(Problem(key, str(e)))
            continue
        csv_key, csv = _paired_class_csv(cfg, parts)
        if csv and Path(os.path.expanduser(csv)).is_file():
            # as the run builds them: the per-epoch validation set skips bad items, the others follow their on_error
            on_error = "skip" if key == "data.val_list" else section.get("on_error") or ("resample" if key == "data.train_list" else "raise")
            problem = list_label_problem(value, csv, list_format=section.get("list_format") or "video", on_error=on_error)
            if problem is not None:
                problems.append(Problem(key, f"{problem} (its class CSV: {csv_key})"))
        shots = (section.get("few_shot") or {}).get("shots") if key == "data.train_list" else None
        if shots:  # the K-shot subset is drawn per class of the list: each needs K videos
            from collections import Counter

            short = sorted((label, n) for label, n in Counter(r.label for r in records).items() if n < int(shots))
            if short:
                problems.append(Problem("data.few_shot.shots", f"{shots} shots, but class {short[0][0]} of {value} has "
                                        f"{short[0][1]} video{'s' * (short[0][1] != 1)}" + (f" (and {len(short) - 1} more classes)" if len(short) > 1 else "")))
    return problems


def _paired_class_csv(cfg: dict[str, Any], parts: list[str]) -> tuple[str, str | None]:
    """The key and value of the class CSV a list key's labels index: ``data.class_csv`` for the training and
    validation lists, an eval dataset's (or its split's own) ``class_csv`` for its lists."""
    if parts[0] == "data":
        return "data.class_csv", (cfg.get("data") or {}).get("class_csv")
    if parts[:2] == ["eval", "datasets"] and len(parts) > 2 and parts[2].isdigit():
        ds = ((cfg.get("eval") or {}).get("datasets") or [{}])[int(parts[2])]
        if len(parts) > 4 and parts[3] == "splits" and parts[4].isdigit():
            split = (ds.get("splits") or [{}])[int(parts[4])]
            if split.get("class_csv"):
                return f"eval.datasets.{parts[2]}.splits.{parts[4]}.class_csv", split["class_csv"]
        return f"eval.datasets.{parts[2]}.class_csv", ds.get("class_csv")
    return "", None


def without_synthetic_paths(cfg: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``cfg`` without the paths a ``data.synthetic`` run writes itself: the ``data.*`` keys it
    points at its dataset, and eval dataset paths that follow them or lie under ``{output_dir}/data``.

    ``mergevid validate --check-paths`` checks the rest (weights, resume checkpoint, other eval lists).
    """
    import copy

    out = copy.deepcopy(cfg)
    data = out.get("data") or {}
    if not data.get("synthetic"):
        return out
    replaced = {data[k] for k in SYNTHETIC_DATA_KEYS if isinstance(data.get(k), str)}
    root = Path(os.path.expanduser(str(out.get("output_dir", "")))).absolute() / "data"
    for k in SYNTHETIC_DATA_KEYS:
        data.pop(k, None)

    real_root = Path(os.path.realpath(root))  # output_dir reached through a symlink, or the link itself

    def written_by_run(value: Any) -> bool:
        if not isinstance(value, str):
            return False
        path = Path(os.path.expanduser(value)).absolute()
        real = Path(os.path.realpath(path))
        return value in replaced or path == root or root in path.parents or real == real_root or real_root in real.parents

    def prune(entry: Any) -> None:
        if isinstance(entry, dict):
            for key in ("root", "list", "class_csv"):
                if written_by_run(entry.get(key)):
                    del entry[key]
            for split in entry.get("splits") or []:
                prune(split)

    for entry in (out.get("eval") or {}).get("datasets") or []:
        prune(entry)
    return out


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def class_names_from(csv_path: str | os.PathLike) -> list[str]:
    """Class names from an ``id,name`` CSV."""
    from ..data import read_class_names

    return read_class_names(csv_path)


def class_features(model: Any, names: Sequence[str], text_cfg: dict[str, Any]) -> torch.Tensor:
    """Prompt-ensembled class features ``[C, D]`` (cached on disk).

    Under DDP every rank calls this; rank 0 encodes and writes the cache entry first while the other
    ranks wait, then they read it (a rank whose cache directory is not shared encodes on its own).
    """
    from ..models.clip import ClassFeatureCache
    from ..training.distributed import get_rank, is_distributed

    cache = ClassFeatureCache(directory=text_cfg.get("cache_dir"))
    rank_zero_first = is_distributed()
    if rank_zero_first and get_rank() != 0:
        _barrier()  # rank 0 fills the cache entry
    feats = model.class_features(names, templates=text_cfg.get("templates", "mote"), cache=cache)
    if rank_zero_first and get_rank() == 0:
        _barrier()
    return feats


@dataclass
class EvalSplit:
    """One annotation list to evaluate, with its classes."""

    list_file: str
    class_csv: str


@dataclass
class EvalSuiteEntry:
    """One dataset of an evaluation suite (close-set, or zero-shot over several splits)."""

    name: str
    kind: str
    root: str
    splits: list[EvalSplit]
    list_format: str = "video"
    num_clips: int = 1
    num_crops: int = 1
    num_frames: int = 8
    input_size: int = 224
    on_error: str = "raise"
    test_offsets: str = "centre"
    sampling: str = "segment"
    stride: int = 8
    short_side: int | None = None  # the test resize; None: input_size
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_input_size(key: str, value: int | None, model_size: int | None) -> int:
    """The frame size for ``key``: the recipe's value, else the model's; a mismatch names the key.

    A ViT's position embeddings fix its input size, so frames of another size fail deep inside
    the model; this says which key to change instead.
    """
    if value is None:
        return int(model_size or 224)
    if model_size is not None and int(value) != int(model_size):
        raise ValueError(
            f"{key}={value}, but the model's visual tower takes {model_size}x{model_size} frames "
            f"(set {key}={model_size} or leave it unset)"
        )
    return int(value)


def check_short_side(key: str, value: int | None, input_size: int, input_key: str) -> int | None:
    """The test resize ``key`` (short side resized to it, then the ``input_size`` crop), checked; None: resize to ``input_size``.

    A short side below the crop would leave the crop outside the frame; the error names ``key`` and
    where the frame size came from (``input_key``).
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key} must be a positive integer (pixels), got {value!r}")
    if value < input_size:
        raise ValueError(
            f"{key}={value} is smaller than the frame size {input_size} ({input_key}): test views resize the short side "
            f"to {key}, then crop {input_size}x{input_size}; set {key} >= {input_size}, or leave it unset (resize to {input_size})"
        )
    return int(value)


def eval_suite(
    eval_cfg: dict[str, Any],
    data_cfg: dict[str, Any] | None,
    *,
    model_input_size: int | None = None,
    model_num_positions: int | None = None,
    check_labels: bool = False,
) -> list[EvalSuiteEntry]:
    """Turn the recipe's ``eval.datasets`` into entries; paths and sizes default to the training data's.

    ``model_input_size`` (the visual tower's frame size) is the default input size and is
    checked against every size the recipe sets; ``model_num_positions`` (the head's frame position
    table) bounds every frame count. The runners call this at setup, so that a dataset that cannot
    be evaluated is named before training. ``check_labels``: also read each list and class CSV, and
    refuse a list whose labels go past its class names (:func:`list_label_problem`). Raises ValueError
    naming the key.
    """
    data_cfg = data_cfg or {}
    entries = []
    for i, ds in enumerate(eval_cfg.get("datasets") or []):
        root = ds.get("root") or data_cfg.get("root")
        if not root:
            raise ValueError(f"eval.datasets.{i}.root is not set (and there is no data.root to default to)")
        if ds.get("splits") and ds.get("list"):
            raise ValueError(f"eval.datasets.{i}: sets both list (one annotation list) and splits (several, each "
                             "{list, class_csv}): set one of them")
        if ds.get("splits"):
            splits = [EvalSplit(s["list"], s.get("class_csv") or ds.get("class_csv")) for s in ds["splits"]]
            for j, s in enumerate(splits):
                if not s.class_csv:
                    raise ValueError(f"eval.datasets.{i}.splits.{j}.class_csv is not set (nor eval.datasets.{i}.class_csv): "
                                     f"no class names for {s.list_file}")
        elif ds.get("list"):
            splits = [EvalSplit(ds["list"], ds.get("class_csv"))]
            if not ds.get("class_csv"):
                raise ValueError(f"eval.datasets.{i}.class_csv is not set: no class names for {ds['list']}")
        else:
            raise ValueError(f"eval.datasets.{i} ({ds.get('name')}) needs 'list' (one annotation list) or 'splits' "
                             f"(zero-shot: [{{list, class_csv}}, ...])")
        if check_labels:
            for j, split in enumerate(splits):
                key = f"eval.datasets.{i}.splits.{j}.list" if ds.get("splits") else f"eval.datasets.{i}.list"
                problem = list_label_problem(split.list_file, split.class_csv, list_format=ds.get("list_format", "video"),
                                             on_error=ds.get("on_error", "raise"))
                if problem is not None:
                    raise ValueError(f"{key}: {problem}")
        num_frames = ds.get("num_frames") or data_cfg.get("num_frames", 8)
        if model_num_positions is not None and num_frames > model_num_positions:
            key = f"eval.datasets.{i}.num_frames" if ds.get("num_frames") else "data.num_frames"
            raise ValueError(f"{key}={num_frames}, but the model's temporal head has {model_num_positions} frame position "
                             f"embeddings (model.num_positions): use at most {model_num_positions} frames")
        input_key = f"eval.datasets.{i}.input_size" if ds.get("input_size") else "data.input_size"
        input_size = resolve_input_size(input_key, ds.get("input_size") or data_cfg.get("input_size"), model_input_size)
        if not (ds.get("input_size") or data_cfg.get("input_size")):
            input_key = "the model's visual tower" if model_input_size else "the default"
        short_key = f"eval.datasets.{i}.short_side" if ds.get("short_side") is not None else "data.short_side"
        short_side = check_short_side(short_key, ds["short_side"] if ds.get("short_side") is not None else data_cfg.get("short_side"),
                                      input_size, input_key)
        entries.append(
            EvalSuiteEntry(
                name=ds["name"],
                kind=ds["kind"],
                root=root,
                splits=splits,
                list_format=ds.get("list_format", "video"),
                num_clips=ds.get("num_clips", 1),
                num_crops=ds.get("num_crops", 1),
                num_frames=num_frames,
                input_size=input_size,
                short_side=short_side,
                on_error=ds.get("on_error", "raise"),
                test_offsets=ds.get("test_offsets") or eval_cfg.get("test_offsets") or "centre",
                sampling=ds.get("sampling") or data_cfg.get("sampling") or "segment",
                stride=ds.get("stride") or data_cfg.get("stride") or 8,
            )
        )
    return entries


def head_positions(model: Any) -> int | None:
    """The size of the model's frame position table (the most frames it takes), None if it has none."""
    value = getattr(getattr(model, "head", None), "num_positions", None)
    return value if isinstance(value, int) else None


def build_eval_loader(entry: EvalSuiteEntry, split: EvalSplit, *, eval_cfg: dict[str, Any], data_cfg: dict[str, Any], normalize: bool, dist: Any, seed: int) -> Any:
    """A test-mode loader (fixed views, no shuffling, sharded across ranks)."""
    from ..data import VideoDataset, build_loader

    ds = VideoDataset(
        list_file=split.list_file,
        root=entry.root,
        num_frames=entry.num_frames,
        train=False,
        class_names=class_names_from(split.class_csv),
        list_format=entry.list_format,
        backend=data_cfg.get("backend", "decord"),
        frame_index_base=data_cfg.get("frame_index_base", 1),
        num_clips=entry.num_clips,
        num_crops=entry.num_crops,
        test_offsets=entry.test_offsets,
        sampling=entry.sampling,
        stride=entry.stride,
        input_size=entry.input_size,
        short_side=entry.short_side,
        normalize=normalize,
        on_error=entry.on_error,
        read_timeout_s=data_cfg.get("read_timeout_s", 60.0),
        seed=seed,
    )
    return build_loader(
        ds,
        batch_size=eval_cfg.get("batch_size", 16),
        num_workers=eval_num_workers(eval_cfg, data_cfg),
        shuffle=False,
        seed=seed,
        drop_last=False,
        num_replicas=dist.world_size if dist else 1,
        rank=dist.rank if dist else 0,
        persistent_workers=False,
    )


def _with_on_error_hint(error: Exception, key: str) -> Exception:
    """``error`` (a bad video under ``on_error: raise``) as itself, its message saying how to evaluate the rest."""
    # on the message's last line: a DataLoader worker's error carries the worker's traceback before it
    hint = (f"{str(error).rstrip()} ({key} is 'raise', the default, which stops an evaluation at its first "
            f"unreadable video; {key}=skip evaluates the others and reports how many failed)")
    try:
        return type(error)(hint, path=getattr(error, "path", None))
    except TypeError:  # a subclass with another signature
        return error


def eval_num_workers(eval_cfg: dict[str, Any], data_cfg: dict[str, Any] | None) -> int:
    """``eval.num_workers``; unset: ``data.num_workers`` (the machine the recipe trains on), else min(4, CPU count)."""
    n = eval_cfg.get("num_workers")
    if n is not None:
        return int(n)
    if data_cfg and data_cfg.get("num_workers") is not None:
        return int(data_cfg["num_workers"])
    return min(4, os.cpu_count() or 1)


def _results_payload(results: Mapping[str, list[Any]]) -> dict[str, Any]:
    """The per-dataset part of ``results.json``: each split's result, and the count of videos that failed."""
    return {
        "datasets": {name: [r.to_dict() for r in rs] for name, rs in results.items()},
        "failed_videos": sum(r.num_failed for rs in results.values() for r in rs),
    }


@contextlib.contextmanager
def _partial_results_kept(results: Mapping[str, list[Any]], partial: Path, *, main: bool) -> Iterator[None]:
    """An evaluation stopped by a failure (a bad video under ``on_error: raise``) or an interrupt says
    which datasets it had evaluated and where their results are (``partial``)."""
    try:
        yield
    except BaseException:
        if main and results and partial.is_file():
            done = ", ".join(r.dataset or name for name, rs in results.items() for r in rs)
            log.warning("the evaluation stopped after %s; their results are in %s", done, partial)
        raise


@contextlib.contextmanager
def _in_eval_mode(model: Any) -> Iterator[None]:
    """``model`` in eval mode for a whole suite, its mode restored after: each dataset's evaluation would
    otherwise switch a model in training mode back, and its experts would merge again for the next one."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def run_eval_suite(
    model: Any,
    *,
    cfg: dict[str, Any],
    data_cfg: dict[str, Any] | None,
    device: torch.device,
    dist: Any,
    output_dir: Path,
    console: Any = None,
    title: str = "Evaluation",
    clip_blend_base: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Evaluate every dataset/split of ``cfg['eval']`` with all requested variants; write JSON, table, plot.

    ``clip_blend_base``: the pretrained weights of ``eval.clip_blend`` (:func:`read_clip_blend_base`,
    read by the runner's setup so that a problem shows before training); read here when None.
    """
    from ..data.readers import VideoReadError
    from ..data.watchdog import ReadTimeoutError
    from ..evaluation.evaluator import build_variants, evaluate
    from ..evaluation.report import (
        plot_tradeoff,
        results_table,
        summarize,
        write_results,
    )
    from ..models.clip import clip_blended_with_pretrained

    eval_cfg = cfg.get("eval") or {}
    data_cfg = data_cfg or {}
    entries = eval_suite(eval_cfg, data_cfg, model_input_size=getattr(model, "input_size", None), model_num_positions=head_positions(model))
    if not entries:
        if console is not None:  # a training recipe without eval.datasets: said, not silently skipped
            console.print(f"no eval.datasets in the recipe: no final evaluation; evaluate the saved model with "
                          f"mergevid eval {output_dir / 'model'} --list LIST --classes CSV --root ROOT")
        return {}
    compare = eval_cfg.get("compare") or {}
    variants = build_variants(
        model,  # its experts: the head's, and any a model component put in the CLIP tower
        modulation=eval_cfg.get("modulation", [False, True]),
        merges=compare.get("merges", []),
        experts=bool(compare.get("experts", False)),
        logit_ensemble=bool(compare.get("logit_ensemble", False)),
        random_routing=bool(compare.get("random_routing", False)),
        seed=int(cfg.get("seed") or 0),
    )
    normalize = False  # frames travel as uint8 (4x fewer bytes between processes) and are normalised on the device
    main = dist is None or dist.rank == 0
    results: dict[str, list[Any]] = {}
    # the official test code evaluates α·θ + (1−α)·θ_CLIP (eval.clip_blend; the model is restored after)
    if eval_cfg.get("clip_blend") and clip_blend_base is None:
        clip_blend_base = read_clip_blend_base(model, cfg)
    partial = output_dir / PARTIAL_RESULTS
    if main:
        partial.unlink(missing_ok=True)  # an earlier, failed evaluation's: this one's results replace them
        from ..utils.io import remove_stale_atomic_temps

        for written in (partial, output_dir / "results.json", output_dir / "tradeoff.png"):
            remove_stale_atomic_temps(written)  # temp files of an earlier evaluation's writes a kill cut short
    with clip_blended_with_pretrained(model, eval_cfg.get("clip_blend"), clip_blend_base), \
            _partial_results_kept(results, partial, main=main), _in_eval_mode(model):
        for i, entry in enumerate(entries):
            for k, split in enumerate(entry.splits):
                loader = build_eval_loader(entry, split, eval_cfg=eval_cfg, data_cfg=data_cfg, normalize=normalize, dist=dist, seed=cfg.get("seed", 0))
                names = loader.dataset.class_names
                feats = class_features(model, names, cfg.get("text") or {})
                label = entry.name if len(entry.splits) == 1 else f"{entry.name}/split{k + 1}"
                if main and console is not None:
                    console.print(f"[bold]evaluating[/] {label}: {len(loader.dataset)} videos, {len(names)} classes, views {entry.num_clips}x{entry.num_crops}")
                try:
                    res = evaluate(
                        model,
                        loader,
                        feats,
                        variants=variants,
                        device=device,
                        precision=eval_precision(cfg),
                        view_reduce=eval_cfg.get("view_reduce", "softmax_mean"),
                        dataset_name=label,
                        views=(entry.num_clips, entry.num_crops),
                    )
                except (VideoReadError, ReadTimeoutError) as e:  # a label out of range is not skipped past
                    if entry.on_error != "raise":
                        raise
                    raise _with_on_error_hint(e, f"eval.datasets.{i}.on_error") from e
                if res.num_failed and main:
                    shown = ", ".join(res.failed[:5]) + (f", and {res.num_failed - 5} more" if res.num_failed > 5 else "")
                    log.warning("%s: %d video%s failed to load and %s skipped: %s", label, res.num_failed,
                                "s" * (res.num_failed != 1), "were" if res.num_failed != 1 else "was", shown)
                results.setdefault(entry.name, []).append(res)
                if main and (k + 1 < len(entry.splits) or i + 1 < len(entries)):  # more to come: keep what is done
                    write_results(partial, {"complete": False, **_results_payload(results)})
    summary_cfg = eval_cfg.get("summary") or {}
    # absent (zero_shot: also []) picks the datasets by kind; an explicit null turns that score off
    close = summary_cfg["close_set"] if "close_set" in summary_cfg else next((e.name for e in entries if e.kind == "close_set"), None)
    if "zero_shot" in summary_cfg and summary_cfg["zero_shot"] is None:
        zero: list[str] = []
    else:
        zero = list(summary_cfg.get("zero_shot") or [e.name for e in entries if e.kind == "zero_shot"])
    summary = summarize(results, close_set=close, zero_shot=zero)
    payload = {"summary": summary, **_results_payload(results)}
    if main:
        write_results(output_dir / "results.json", payload)
        partial.unlink(missing_ok=True)
        if console is not None:
            console.print(results_table(summary, datasets=list(results), close_set=close, zero_shot=zero, title=title))
        if eval_cfg.get("plot", True) and close and zero:
            path = plot_tradeoff(summary, output_dir / "tradeoff.png", close_set=close, zero_shot=zero)
            if path is not None and console is not None:
                console.print(f"plot: {path}")
    return payload
