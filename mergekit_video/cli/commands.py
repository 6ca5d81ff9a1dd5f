"""Top-level commands: ls, validate, run, eval, convert, export, bench train / head."""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Optional

import typer

from .errors import CommandLineError, UserError, checked_device, refuse_existing_output, refuse_replacing_input, reraise_interrupts
from ..runners.schema import DEVICE_VALUES, EVAL_DATASET
from .main import app, bench_app

OVERRIDES_HELP = "Recipe overrides: key=value (YAML value), ~key to remove a key."
PLUGIN_HELP = ("Import this plugin module first (repeatable): a dotted module name on PYTHONPATH, as in a recipe's "
               "plugins: key, for a plugin that is not an installed package.")
#: The runners ``mergevid eval RECIPE`` runs (they train nothing).
EVAL_RUNNERS = ("evaluate", "compare")
#: Bounds of eval.datasets.* keys that ``mergevid eval MODEL`` options set: checked as the options' own ranges.
_FRAMES, _INPUT_SIZE, _SHORT_SIDE = EVAL_DATASET.fields["num_frames"], EVAL_DATASET.fields["input_size"], EVAL_DATASET.fields["short_side"]


def _console():
    from rich.console import Console

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = max(console.width, 160)  # piped to a file or a log: rich's 80 columns would cut tables and lines
    return console


def _is_yaml_mapping(path: Path) -> bool:
    """Whether ``path`` is a small text file holding a YAML mapping (a recipe under another name)."""
    import yaml

    try:
        if path.stat().st_size > 1 << 20:
            return False
        return isinstance(yaml.safe_load(path.read_text(encoding="utf-8")), dict)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False


def _load_validated(recipe: Path, overrides: list[str], *, plugins: list[str] | None = None) -> dict:
    """Load, override, validate (every problem listed) and fill defaults; ``plugins`` (``--plugin``) are imported
    first and added to the recipe's ``plugins:``."""
    from ..config import load_recipe

    if recipe.is_dir():
        raise UserError(f"recipe {recipe} is a folder, not a YAML file")
    if not recipe.is_file():
        raise FileNotFoundError(f"recipe {recipe} does not exist")
    plugins = _import_cli_plugins(plugins)
    cfg = load_recipe(recipe, overrides)
    listed = cfg.get("plugins")
    if plugins and (listed is None or isinstance(listed, list)):  # another value: validation names it
        cfg["plugins"] = [*(listed or []), *(m for m in plugins if m not in (listed or []))]  # its own first
    return _validated(cfg, source=str(recipe))


def _import_cli_plugins(modules: list[str] | None) -> list[str]:
    """Import the ``--plugin`` modules as a recipe's ``plugins:`` key does (the same errors, named after the option); return them."""
    from ..registry import import_plugins

    modules = list(dict.fromkeys(modules or []))  # each once, in order
    try:
        import_plugins(modules)
    except ImportError as exc:
        raise UserError(f"--plugin: {exc}") from None
    return modules


def _run_validated(cfg: dict, *, source: str, overwrite: bool) -> None:
    """Run a validated recipe; the path checks made at start-up name the recipe, as validation does."""
    from ..config import ValidationError
    from ..runners import run_recipe

    try:
        reraise_interrupts(run_recipe, cfg, overwrite=overwrite, console=_console())
    except ValidationError as err:
        if err.source is None:
            raise ValidationError(err.problems, source=source) from None
        raise


def _checked_overrides(ctx: typer.Context, overrides: list[str] | None, first: Path | None = None) -> list[str]:
    """``overrides`` as given; a misspelt option (``--overwrit``), which the commands that take
    overrides would read as one, is an error naming the options the command has. So is one given
    before the recipe, where it is read as the recipe's path (``first``) unless a file has that name."""
    import difflib

    overrides = list(overrides or [])
    options = [o for p in ctx.command.params for o in getattr(p, "opts", []) if o.startswith("-")] + ["--help"]
    ahead = [str(first)] if first is not None and str(first).startswith("-") and not first.exists() else []
    for text in ahead + overrides:
        if text.startswith("-"):
            flag = text.split("=", 1)[0]
            if flag in options:  # a known option read as an override: it came after '--'
                raise CommandLineError(f"{flag} came after '--', which makes what follows it arguments: put {flag} before '--'")
            close = ["--help"] if flag == "-h" else difflib.get_close_matches(flag, options[:-1], n=2)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise CommandLineError(f"no such option: {flag}{hint} (options: {', '.join(sorted(set(options)))})")
    return overrides


def _import_checkpoint_plugins(path: str) -> None:
    """Import the plugins a saved model lists, before its plugin merges and routers are looked up by name (a recipe
    that evaluates it, with ``eval.compare.merges`` entries naming them; ``export --strategy``)."""
    from ..models.checkpoint import read_config
    from ..models.video_clip import import_model_plugins

    try:
        config = read_config(os.path.expanduser(path))
    except (OSError, ValueError):
        return  # a missing or foreign path: --check-paths and the run say so
    import_model_plugins(config, source=path)


def _validated(cfg: dict, *, source: str) -> dict:
    """Validate a loaded recipe against its runner's schema and cross-checks; fill defaults."""
    from ..config import ValidationError, validate_recipe, with_defaults
    from ..runners.schema import CROSS_CHECKS, RUNNER_NAMES, SCHEMAS

    runner = cfg.get("runner")
    if not isinstance(runner, str) or runner not in SCHEMAS:  # a list or mapping is unhashable: said, not a TypeError
        import difflib

        if "runner" not in cfg:
            raise UserError(f"{source}: key 'runner' is missing: set it to one of {', '.join(RUNNER_NAMES)} "
                            "(mote trains and evaluates; evaluate and compare evaluate a saved model)")
        close = difflib.get_close_matches(str(runner), RUNNER_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"{source}: key 'runner' must be one of {', '.join(RUNNER_NAMES)}, got {runner!r}{hint}")
    schema = SCHEMAS[runner]
    if isinstance(cfg.get("checkpoint"), str) and cfg["checkpoint"]:
        _import_checkpoint_plugins(cfg["checkpoint"])
    validate_recipe(cfg, schema, source=source)
    full = with_defaults(cfg, schema)
    cross = CROSS_CHECKS.get(runner)
    problems = cross(full) if cross else []
    if problems:
        raise ValidationError(problems, source=source)
    return full


@app.command("ls")
def ls_cmd(
    kind: Optional[str] = typer.Argument(None, help="routers | merges | regularizers | runners (default: all)"),
    plugins: Optional[list[str]] = typer.Option(None, "--plugin", metavar="MODULE", help=PLUGIN_HELP),
) -> None:
    """List registered parts with their one-line docs (installed plugins' too; others with --plugin)."""
    from rich.table import Table

    from ..registry import REGISTRIES, get_registry

    import mergekit_video.runners  # noqa: F401  (adds the runners registry)

    _import_cli_plugins(plugins)
    console = _console()
    for k in [kind] if kind else list(REGISTRIES):
        reg = get_registry(k)
        table = Table(title=k, show_header=True, header_style="bold")
        table.add_column("name", style="cyan", no_wrap=True)
        table.add_column("description")
        from rich.markup import escape

        for name in reg.names():
            table.add_row(escape(name), escape(reg.doc(name)))  # θ[j] is text, not a rich markup tag
        console.print(table)


@app.command("validate")
def validate_cmd(
    ctx: typer.Context,
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    check_paths: bool = typer.Option(False, "--check-paths", help="Also check that the lists, class CSVs, data roots and checkpoint exist, read the lists and class CSVs as the run will, and that output_dir can be written."),
    explain: bool = typer.Option(False, "--explain", help="Also list every key the recipe's runner takes: its value here, type, default, allowed values."),
) -> None:
    """Validate a recipe (types, allowed values, components, plugins) without running anything heavy."""
    cfg = _load_validated(recipe, _checked_overrides(ctx, overrides, recipe))
    if explain:
        _print_recipe_keys(cfg)
    from ..runners.common import synthetic_replacement_note

    replaced = synthetic_replacement_note(cfg.get("data") or {})
    if replaced:
        from rich.markup import escape

        _console().print(f"[yellow]warning[/]: {escape(replaced)}")
    if check_paths:
        from ..config import ValidationError
        from ..runners.common import check_recipe_paths, output_dir_problem, without_synthetic_paths

        if (cfg.get("data") or {}).get("synthetic"):  # written by the run itself under output_dir
            _console().print("[yellow]note[/]: data.synthetic is set; its files are written when the recipe runs (the other paths are checked)")
        try:
            check_recipe_paths(without_synthetic_paths(cfg), contents=True)
        except ValidationError as err:
            raise ValidationError(err.problems, source=str(recipe)) from None
        _, problem = output_dir_problem(cfg)  # what the run refuses at its start (a file, a folder it cannot write)
        if problem is not None:
            raise UserError(problem)
    _console().print(f"[green]ok[/] {recipe}: runner '{cfg['runner']}', output_dir {cfg['output_dir']}")


EXPLAIN_TABLE_MIN_WIDTH = 140  # narrower, validate --explain lists one record per key instead of a six-column table


def _print_recipe_keys(cfg: dict) -> None:
    """The keys of ``cfg``'s runner schema as a table, with the (validated, defaults filled) value each has here."""
    import inspect
    import json

    from rich.markup import escape
    from rich.table import Table

    from ..config.schema import explain_schema
    from ..runners.schema import SCHEMAS

    def value_of(key: str) -> str | None:
        """The value's text; "" for a key its section leaves out (the default applies), None where the section itself
        is absent or the row is a section (its default does not apply to a recipe that has none / sets it)."""
        node: object = cfg
        parts = key.split(".")
        for i, part in enumerate(parts):
            if part == "*" or not isinstance(node, dict):
                return None
            if part not in node:
                return "" if i == len(parts) - 1 else None
            node = node[part]
        if isinstance(node, dict) and any(k.startswith(key + ".") for k in row_keys):
            return "(set: its keys follow)"  # a section: its keys have rows of their own
        if isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
            return f"{len(node)} entries ({key}.0, ...)"
        try:
            return json.dumps(node)
        except TypeError:
            return str(node)

    def component_default(key: str) -> str:
        """A component argument's default, from its target's signature (the schema declares none)."""
        section, _, arg = key.rpartition(".")
        node = cfg.get(section) if section and "." not in section else None
        if not isinstance(node, dict) or not isinstance(node.get("_component_"), str):
            return ""
        try:
            from ..config.components import resolve_component

            param = inspect.signature(resolve_component(node["_component_"])).parameters.get(arg)
        except Exception:  # noqa: BLE001 - a listing: no default shown rather than an error
            return ""
        if param is None or param.default is inspect.Parameter.empty:
            return ""
        try:
            return json.dumps(param.default)
        except TypeError:
            return str(param.default)

    rows = explain_schema(SCHEMAS[cfg["runner"]])
    row_keys = {row["key"] for row in rows}
    title = f"keys of the '{cfg['runner']}' runner (value: this recipe, defaults filled in)"
    console = _console()

    def filled(row: dict) -> tuple[str, str]:
        """(value, default) of a row: a key left out of a section the recipe has shows the default it gets."""
        default = row["default"] or component_default(row["key"])
        value = value_of(row["key"])
        if value == "":  # left out of a section the recipe has: the default applies
            value = default if default not in ("", "required") else ""
        return value or "", default

    if console.width < EXPLAIN_TABLE_MIN_WIDTH:  # six columns do not fit: one record per key, its key line whole
        import textwrap

        from rich.text import Text

        def indented(text: str) -> str:
            return textwrap.fill(text, width=console.width, initial_indent="    ", subsequent_indent="    ", break_on_hyphens=False)

        console.print(Text(title, style="bold"))
        for row in rows:
            value, default = filled(row)
            head = Text(row["key"], style="cyan")
            if value:
                head.append(f" = {value}")
            console.print(head, overflow="fold")
            facts = "; ".join(f"{name}: {v}" for name, v in (("type", row["type"]), ("default", default), ("allowed", row["allowed"])) if v)
            console.print(Text(indented(facts)), soft_wrap=True)
            if row["doc"]:
                console.print(Text(indented(row["doc"]), style="dim"), soft_wrap=True)
        return
    table = Table(title=title, header_style="bold")
    # keys are never wrapped, so that `validate --explain | grep KEY` finds them; the other columns fold
    table.add_column("key", style="cyan", no_wrap=True, min_width=max(len(k) for k in row_keys))
    for column in ("value", "type", "default", "allowed", "description"):
        table.add_column(column, overflow="fold")
    for row in rows:
        value, default = filled(row)
        table.add_row(*(escape(v) for v in (row["key"], value, row["type"], default, row["allowed"], row["doc"])))
    console.print(table)


@app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run_cmd(
    ctx: typer.Context,
    recipe: Path = typer.Argument(..., help="Recipe YAML (e.g. recipes/mote_vitl14.yaml)."),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Reuse an output_dir that holds a run of a different recipe (or of this one, with train.resume=null): DELETES that run's outputs first. With the same recipe the run resumes and nothing is deleted."
    ),
) -> None:
    """Run a recipe: train and/or evaluate; everything is written under its output_dir.

    Multi-GPU: torchrun --nproc_per_node=8 -m mergekit_video run RECIPE
    """
    cfg = _load_validated(recipe, _checked_overrides(ctx, overrides, recipe))
    _refuse_recording_over_the_recipe(recipe, cfg)
    _run_validated(cfg, source=str(recipe), overwrite=overwrite)


def _refuse_recording_over_the_recipe(recipe: Path, cfg: dict) -> None:
    """A run records its resolved recipe as ``{output_dir}/recipe.yaml``: refuse to run a hand-written
    recipe kept at that very path (it would lose its comments and ``${...}``, and take in the
    overrides). A recipe a run recorded there (machine-written) may be rerun as it is: that is a resume;
    with overrides (or edits) that it would record, it is refused too, ``--overwrite`` or not: the file
    passed is never rewritten with other settings (run a copy of it instead, which is compared with the
    record as any recipe is)."""
    import copy

    from ..config import dump_recipe, is_recorded_recipe
    from ..config.schema import expand_user_paths
    from ..runners.common import describe_change, recorded_recipe_changes
    from ..runners.schema import SCHEMAS

    saved = Path(os.path.expanduser(str(cfg["output_dir"]))) / "recipe.yaml"
    if not (saved.exists() and recipe.resolve() == saved.resolve()):
        return
    text = recipe.read_text(encoding="utf-8")
    copy_to = saved.parent.parent / (saved.parent.name + ".yaml")
    if not is_recorded_recipe(text):
        raise UserError(
            f"{recipe} is where this run records its resolved recipe (output_dir {saved.parent}, recipe.yaml), and running it "
            f"would replace your file (comments and ${{...}} resolved, overrides written in); keep the recipe elsewhere "
            f"(e.g. mv {recipe} {copy_to}) or set output_dir to another folder"
        )
    recorded = copy.deepcopy(cfg)  # what the run would write there: its paths as start_run expands them
    if isinstance(recorded.get("runner"), str) and recorded["runner"] in SCHEMAS:
        expand_user_paths(recorded, SCHEMAS[recorded["runner"]])
    if dump_recipe(recorded) == text:
        return
    changes = recorded_recipe_changes(recorded, text, saved.parent)
    if not changes:  # only settings a later mergekit_video added, at their defaults: the same run
        return
    shown = "; ".join(describe_change(*c) for c in changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
    raise UserError(
        f"{recipe} is the recipe.yaml that the run in output_dir {saved.parent} recorded, and this run would rewrite it with "
        f"other settings ({shown}), --overwrite or not. To run with them, copy it and run the copy (cp {recipe} {copy_to}; "
        f"mergevid run {copy_to} ...): the run there compares it with this record as with any recipe (a resume, or a "
        f"different recipe that needs --overwrite); or set output_dir to another folder"
    )


#: Folder names that say where a dataset keeps its lists, not which dataset it is.
_GENERIC_LIST_FOLDERS = frozenset({"lists", "list", "annotations", "annotation", "anno", "splits", "split", "labels", "meta", "metadata"})


def _dataset_folder(list_file: Path) -> str:
    """The folder naming a list's dataset: its own, or the one above a generic ``lists/``."""
    folder = list_file.resolve().parent
    return folder.parent.name if folder.name.lower() in _GENERIC_LIST_FOLDERS else folder.name


def default_eval_dir(
    target: Path, list_file: Path | None = None, *, views: str = "1x1", frames: int = 8, compare: bool = False, zero_shot: bool = False,
    splits: int = 1, short_side: int | None = None,
) -> Path:
    """``runs/eval/<run>_<model>[_<list folder>_<list>][_<views>][_f<frames>][_s<short side>][_zs][_compare]`` for ``mergevid eval MODEL --list LIST``.

    A list folder named like ``lists`` or ``annotations`` comes with its parent (``ucf101_lists``);
    ``splits`` lists of one zero-shot dataset (``list_file`` the first) give ``<list folder>_<splits>splits``.

    Named after the model, the folder holding it and the evaluated list: every run saves
    ``model/``, so the model's own name alone would send every run's evaluation to one folder
    (a trainer checkpoint is named with its run too: ``<run>_checkpoints_step_N``), and the
    list keeps the evaluations of one model on several datasets apart. Views other than 1x1,
    frames other than 8, a ``--short-side``, ``--zero-shot`` and ``--compare`` are added, so that
    another protocol does not meet the first one's results.
    """
    path = target.resolve()
    parts = [path.stem if path.is_file() else path.name]
    for parent in path.parents:
        if not parent.name:
            break
        parts.insert(0, parent.name)
        if parent.name != "checkpoints":  # a checkpoint's run is one folder further up
            break
    if list_file is not None:  # its folder too: ucf101/val.txt and hmdb51/val.txt are other datasets
        listed = list_file.resolve()
        folder = listed.parent.name
        if folder.lower() in _GENERIC_LIST_FOLDERS:  # ucf101/lists/testlist01.txt: the dataset is one folder up
            folder = f"{listed.parent.parent.name}_{folder}"
        parts += [folder, listed.stem if splits == 1 else f"{splits}splits"]
    if views.lower() != "1x1":
        parts.append(views.lower())
    if frames != 8:
        parts.append(f"f{frames}")
    if short_side is not None:
        parts.append(f"s{short_side}")
    if zero_shot:
        parts.append("zs")
    if compare:
        parts.append("compare")
    return Path("runs") / "eval" / ("_".join(p for p in parts if p) or "model")


@app.command("eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def eval_cmd(
    ctx: typer.Context,
    target: Path = typer.Argument(..., help="An evaluate/compare recipe YAML, or a saved model / checkpoint directory."),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    list_files: Optional[list[Path]] = typer.Option(
        None, "--list", help="Annotation list (with a model directory); repeat it for the splits of a --zero-shot dataset."
    ),
    class_csvs: Optional[list[Path]] = typer.Option(
        None, "--classes", help="Class CSV 'id,name' (with --list); one for every split, or repeated, one per --list in order (K600's splits)."
    ),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder the list's paths are relative to (default: the list's own folder)."),
    views: str = typer.Option("1x1", "--views", help="clips x crops, e.g. 1x1, 4x3, 3x1."),
    num_frames: int = typer.Option(8, "--frames", min=_FRAMES.min, max=_FRAMES.max),
    input_size: Optional[int] = typer.Option(None, "--input-size", min=_INPUT_SIZE.min, help="Frame size (default: the model's, e.g. 224)."),
    short_side: Optional[int] = typer.Option(
        None, "--short-side", min=_SHORT_SIDE.min, help="Resize the short side to this, then crop the frame size (e.g. 256 for resize 256, crop 224; default: the frame size)."
    ),
    compare: bool = typer.Option(False, "--compare", help="Also evaluate each expert, other merges and ensembles."),
    zero_shot: bool = typer.Option(
        False, "--zero-shot", help="Classes unseen in training: reported as zero-shot (mean ± std over the --list splits, HM_ZS)."
    ),
    output_dir: Optional[Path] = typer.Option(
        None, "--output-dir", help="Where results go (default: runs/eval/<run>_<model folder>_<list folder>_<list>: runs/eval/mote_model_ucf_val "
        "for runs/mote/model and ucf/val.txt). Not the model's folder nor the list's."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Reuse an output folder holding other results: DELETES them first."),
    plugins: Optional[list[str]] = typer.Option(
        None, "--plugin", metavar="MODULE", help=PLUGIN_HELP + " Added to the recipe's plugins (with a recipe, to its own)."
    ),
) -> None:
    """Evaluate a model: with a recipe, or a model directory plus --list/--classes."""
    overrides = _checked_overrides(ctx, overrides, target)
    # --opt=~/x reaches us with its ~ (the shell expands it only in a word of its own)
    target = target.expanduser()
    list_files = [f.expanduser() for f in list_files or []]
    class_csvs = [c.expanduser() for c in class_csvs or []]
    root = root.expanduser() if root is not None else None
    # a model is a folder; a recipe a YAML file, whatever its name (zs.YAML, zs), but not a tensor file given by mistake
    is_recipe = target.suffix.lower() in (".yaml", ".yml") or (target.is_file() and _is_yaml_mapping(target))
    if is_recipe:
        _refuse_model_options_with_a_recipe(ctx, target)
        cfg = _load_validated(target, overrides or [], plugins=plugins)
        if cfg["runner"] not in EVAL_RUNNERS:
            out = Path(cfg["output_dir"]) / "model"
            raise UserError(
                f"{target} has runner {cfg['runner']!r}, which trains a model; mergevid eval takes an "
                f"{' or '.join(EVAL_RUNNERS)} recipe, or a saved model: evaluate what that recipe trained with "
                f"'mergevid eval {out} --list LIST --classes CSV', or train and evaluate it with 'mergevid run {target}'"
            )
    else:
        from ..models.checkpoint import read_model_config

        if not target.exists():
            raise FileNotFoundError(f"{target} does not exist")
        plugins = _import_cli_plugins(plugins)
        if not list_files or not class_csvs:
            raise UserError("evaluating a model directory needs --list and --classes (and usually --root)")
        if len(list_files) > 1 and not zero_shot:
            raise UserError("several --list files are the splits of one zero-shot dataset: add --zero-shot (close-set takes one list)")
        if len(class_csvs) not in (1, len(list_files)):
            raise UserError(f"{len(class_csvs)} --classes files for {len(list_files)} --list files: give one class CSV for "
                            "every split, or one per --list, in the same order")
        try:
            clips, crops = (int(v) for v in views.lower().split("x"))
        except ValueError:
            raise UserError(f"--views must look like 1x1 or 4x3, got {views!r}") from None
        if clips < 1 or crops not in (1, 3):
            raise UserError(f"--views {views}: CLIPSxCROPS takes clips >= 1 and crops 1 or 3")
        if target.is_dir() and not (target / "config.json").is_file() and (target / "model" / "config.json").is_file():
            _console().print(f"{target} is a run's output_dir: evaluating its trained model, {target / 'model'}")
            target = target / "model"
        model_config = read_model_config(target)  # not a model: said now, before an output folder is made
        model_size = ((model_config.get("clip") or {}).get("model_cfg") or {}).get("vision_cfg", {}).get("image_size")
        if input_size is not None and isinstance(model_size, int) and input_size != model_size:
            raise UserError(f"--input-size {input_size}, but the model's visual tower takes {model_size}x{model_size} frames: "
                            f"leave --input-size out (or pass {model_size})")
        frame_size = input_size if input_size is not None else model_size
        if short_side is not None and isinstance(frame_size, int) and short_side < frame_size:
            where = "--input-size" if input_size is not None else "the model's visual tower"
            raise UserError(f"--short-side {short_side} is smaller than the frame size {frame_size} ({where}): the test views resize the "
                            f"short side, then crop {frame_size}x{frame_size}; pass --short-side {frame_size} or more, or leave it out")
        # several lists are the splits of one dataset: named after it (ucf101/lists/testlist0N.txt → ucf101)
        name = list_files[0].stem if len(list_files) == 1 else _dataset_folder(list_files[0])
        lists = [str(f.resolve()) for f in list_files]  # absolute: the same evaluation whatever the working folder
        # one class CSV: the dataset's; one per list: each split's (K600's three 160-class splits)
        split_classes = [{"class_csv": str(c.resolve())} for c in class_csvs] if len(class_csvs) > 1 else [{}] * len(lists)
        recipe = {
            "runner": "compare" if compare else "evaluate",
            # ~ and .. folded as a recipe's output_dir is (load_recipe)
            "output_dir": os.path.normpath(os.path.expanduser(str(output_dir))) if output_dir else str(default_eval_dir(
                target, list_files[0], views=views, frames=num_frames, compare=compare, zero_shot=zero_shot, splits=len(list_files),
                short_side=short_side)),
            "checkpoint": str(target.resolve()),
            **({"plugins": plugins} if plugins else {}),
            "eval": {
                "num_workers": min(4, os.cpu_count() or 1),
                "datasets": [
                    {
                        "name": name,
                        "kind": "zero_shot" if zero_shot else "close_set",
                        "root": str((root or list_files[0].parent).resolve()),
                        **({"splits": [{"list": f, **per_split} for f, per_split in zip(lists, split_classes)]}
                           if zero_shot else {"list": lists[0]}),
                        **({"class_csv": str(class_csvs[0].resolve())} if len(class_csvs) == 1 else {}),
                        "num_clips": clips,
                        "num_crops": crops,
                        "num_frames": num_frames,
                        **({"input_size": input_size} if input_size is not None else {}),
                        **({"short_side": short_side} if short_side is not None else {}),
                    }
                ],
                "summary": {"zero_shot": [name]} if zero_shot else {"close_set": name},
            },
        }
        from ..config import apply_overrides, resolve_interpolations

        recipe = resolve_interpolations(apply_overrides(recipe, overrides))
        entry = ((recipe.get("eval") or {}).get("datasets") or [{}])[0]
        default_root = root is None and entry.get("root") == str(list_files[0].parent.resolve())  # not given nor overridden
        _check_list_paths(list_files[0], None if default_root else entry.get("root"), entry.get("list_format", "video"))
        cfg = _validated(recipe, source=f"for {target}")
    _run_validated(cfg, source=str(target) if is_recipe else f"for {target}", overwrite=overwrite)


def _check_list_paths(list_file: Path, root: str | None, list_format: str = "video") -> None:
    """Refuse up front (rather than with a missing-video error per file) a list none of whose first entries
    exists: a frame-folder list read as videos names ``list_format=frames``; without a root (``None``: the
    list's paths are read relative to its own folder) the error names ``--root``."""
    from ..data.annotations import read_annotation_list

    try:
        records = read_annotation_list(list_file, list_format)[:5]
    except (OSError, ValueError):  # a malformed list, an unknown format: the evaluation reports it
        return
    folder = Path(root).expanduser() if root is not None else list_file.resolve().parent
    if records and not any((folder / r.path).exists() for r in records):
        head, _, count = records[0].path.rpartition(" ")
        if list_format == "video" and count.isdigit() and (folder / head).is_dir():  # 'folder num_frames label' read as a video path
            raise UserError(
                f"{list_file} looks like a frame-folder list ('folder num_frames label': {folder / head} is a folder): "
                "evaluate it with the override eval.datasets.0.list_format=frames"
            )
        if root is not None:
            return  # the evaluation names the missing files (and on_error decides)
        raise UserError(
            f"--root not given, so the paths of {list_file} are read relative to its folder {folder}, where its "
            f"first entries do not exist (first: {folder / records[0].path}): pass --root FOLDER, the folder its paths are relative to"
        )


def _refuse_replacing_a_non_model_folder(output: Path) -> None:
    """--overwrite replaces a saved model's folder as a whole: any other folder with files is refused before the work."""
    from ..models.checkpoint import replaceable_model_folder_problem

    problem = replaceable_model_folder_problem(output)
    if problem is not None:
        raise UserError(problem)


#: ``mergevid eval`` options that build the recipe for a model directory → the recipe keys they set.
_MODEL_EVAL_OPTIONS = {
    "list_files": ("--list", "eval.datasets.N.list=LIST"),
    "class_csvs": ("--classes", "eval.datasets.N.class_csv=CSV"),
    "root": ("--root", "eval.datasets.N.root=DIR"),
    "views": ("--views", "eval.datasets.N.num_clips=4 eval.datasets.N.num_crops=3"),
    "num_frames": ("--frames", "eval.datasets.N.num_frames={}"),
    "input_size": ("--input-size", "eval.datasets.N.input_size={}"),
    "short_side": ("--short-side", "eval.datasets.N.short_side={}"),
    "compare": ("--compare", "runner=compare"),
    "zero_shot": ("--zero-shot", "eval.datasets.N.kind=zero_shot"),
    "output_dir": ("--output-dir", "output_dir={}"),
}


def _refuse_model_options_with_a_recipe(ctx: typer.Context, recipe: Path) -> None:
    """The options that describe a model directory's evaluation would be ignored with a recipe: name the keys instead."""
    # by name: typer may bring its own copy of click's ParameterSource enum
    given = [name for name in _MODEL_EVAL_OPTIONS if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"]
    if given:
        option, key = _MODEL_EVAL_OPTIONS[given[0]]
        key = key.format(ctx.params[given[0]])  # the value given, where the key takes it as it is
        raise UserError(
            f"{option} describes the evaluation of a model directory; {recipe} is a recipe, whose settings are its keys: "
            f"override them instead (e.g. mergevid eval {recipe} {key})"
        )


class ConvertFormat(str, enum.Enum):
    """Checkpoint formats ``mergevid convert`` reads."""

    mote_official = "mote-official"


@app.command("convert")
def convert_cmd(
    fmt: ConvertFormat = typer.Argument(..., help="Source format."),
    checkpoint: Path = typer.Argument(..., help="The checkpoint to convert."),
    output: Path = typer.Argument(..., help="Model directory to write."),
    clip_pretrained: Optional[str] = typer.Option(None, "--clip-pretrained", help="CLIP weights for the text tower (tag such as 'openai', or a local file)."),
    clip_name: Optional[str] = typer.Option(None, "--clip-name", help="open_clip architecture (default: inferred from shapes)."),
    interpolate_alpha: Optional[float] = typer.Option(None, "--interpolate-alpha", min=0.0, max=1.0, help="Reproduce the official test.py patching (0.99) with the --clip-pretrained weights."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT folder."),
) -> None:
    """Convert an official MoTE checkpoint (github.com/ZMHH-H/MoTE) into a mergekit_video model."""
    from ..models.checkpoint import save_model
    from ..models.convert import ConversionError, convert_official, load_official_checkpoint

    refuse_replacing_input(output, checkpoint)
    refuse_existing_output(output, overwrite, folder=True)
    _refuse_replacing_a_non_model_folder(output)
    if checkpoint.is_dir():
        raise UserError(f"{checkpoint} is a folder; pass the official checkpoint file in it (a .pt / .pth file)")
    if interpolate_alpha is not None and clip_pretrained is None:  # said before the checkpoint is read
        raise UserError("--interpolate-alpha needs --clip-pretrained: the CLIP weights to interpolate the visual tower with")
    try:
        ckpt = load_official_checkpoint(checkpoint)
    except (FileNotFoundError, ConversionError):
        raise
    except Exception as e:  # torch.load of a foreign file fails with pickle internals (e.g. "KeyError: 101")
        raise UserError(f"{checkpoint} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    model = convert_official(ckpt, clip_name=clip_name, clip_pretrained=clip_pretrained, interpolate_alpha=interpolate_alpha)
    save_model(model, output, overwrite=overwrite)
    cfg = model.config
    _console().print(
        f"[green]converted[/] {checkpoint} → {output}: {cfg['clip']['name']} + {cfg['head']['layers']}-layer head, "
        f"{cfg['head']['num_experts']} experts, {cfg['head']['num_source_classes']} source classes"
        + ("" if clip_pretrained else " (no text-tower weights: pass --clip-pretrained to evaluate on new class names)")
    )


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="Model directory or trainer checkpoint."),
    output: Path = typer.Argument(..., help="Directory to write."),
    dense: bool = typer.Option(False, "--dense", help="Collapse the experts into plain FFNs (the baseline's structure and keys)."),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="Weight merge for --dense (default: the model's own, mean)."),
    merge_arg: Optional[list[str]] = typer.Option(
        None, "--merge-arg", metavar="KEY=VALUE",
        help="An argument of the --dense merge strategy, repeatable: --strategy temperature_softmax --merge-arg tau=0.6, "
        "--strategy weighted --merge-arg weights=[1,2,3,4].",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT folder."),
    plugins: Optional[list[str]] = typer.Option(None, "--plugin", metavar="MODULE", help=PLUGIN_HELP + " E.g. the plugin of a --strategy."),
) -> None:
    """Export a model directory (from a trainer checkpoint), optionally collapsed to a dense model."""
    from ..config.loading import ConfigError, parse_override
    from ..models.checkpoint import count_parameters, export_dense, load, save_model

    _import_cli_plugins(plugins)
    merge_kwargs = {}
    for text in merge_arg or []:
        try:
            parsed = parse_override(text)
        except ConfigError:
            parsed = None
        if parsed is None or parsed.op != "set" or len(parsed.keys) != 1:
            raise UserError(f"--merge-arg {text!r}: expected KEY=VALUE, such as tau=0.6")
        if parsed.key in merge_kwargs:
            raise UserError(f"--merge-arg {text!r}: {parsed.key} is given twice")
        merge_kwargs[parsed.key] = parsed.value
    if (strategy or merge_kwargs) and not dense:
        raise UserError("--strategy and --merge-arg choose the merge of a --dense export; add --dense")
    if merge_kwargs and strategy is None and "base" not in merge_kwargs:
        raise UserError("--merge-arg is an argument of --strategy: name the strategy too, such as "
                        "--strategy temperature_softmax --merge-arg tau=0.6")
    if strategy is not None:
        from ..merging import requires_base
        from ..registry import MERGES
        from ..runners.schema import NO_BASE_MESSAGE

        _import_checkpoint_plugins(str(checkpoint))  # the plugins the model was saved with may register the strategy
        MERGES.get(strategy)  # an unknown name: the registry's error, with the close matches
        if requires_base(strategy):
            raise UserError(f"--strategy {strategy}: {strategy!r} {NO_BASE_MESSAGE}")
    if "base" in merge_kwargs:
        raise UserError("--merge-arg base: the experts of a MoTE model have no base model to merge relative to "
                        "(each is trained from its own init); use --strategy mean, weighted or temperature_softmax")
    if strategy is not None:  # the arguments, before the model is read
        from ..merging import check_merge_arguments

        try:
            check_merge_arguments(strategy, merge_kwargs, hidden=("base",))
        except ValueError as exc:
            raise UserError(f"--merge-arg: {exc}") from None
    refuse_replacing_input(output, checkpoint)
    refuse_existing_output(output, overwrite, folder=True)  # before the model is read
    _refuse_replacing_a_non_model_folder(output)
    model = load(checkpoint)
    if dense:
        export_dense(model, output, strategy=strategy, overwrite=overwrite, **merge_kwargs)
        out = load(output)
        from ..models.clip import plain_open_clip_name

        by_name = plain_open_clip_name(out.config["clip"])
        tower = (count_parameters(model.visual), count_parameters(out.visual))
        tower_said = f", visual tower {tower[1] / 1e6:.2f}M (was {tower[0] / 1e6:.2f}M)" if tower[0] != tower[1] else ""  # its experts
        _console().print(
            f"[green]exported dense[/] → {output}: temporal head {count_parameters(out.head) / 1e6:.2f}M params "
            f"(was {count_parameters(model.head) / 1e6:.2f}M){tower_said}; plain open_clip loads its CLIP part with "
            f"open_clip.create_model('local-dir:{output}')"
            + (f", or open_clip.create_model('{by_name}') and load_state_dict of clip.safetensors" if by_name else "")
        )
    else:
        save_model(model, output, overwrite=overwrite)
        _console().print(f"[green]exported[/] → {output}")


@bench_app.command("head")
def bench_head_cmd(
    output: Path = typer.Option(Path("bench_head.json"), "--output", help="JSON results file."),
    device: str = typer.Option("auto", "--device", help=f"{DEVICE_VALUES} (auto: cuda when available, else cpu)."),
    steps: int = typer.Option(50, "--steps", min=1, help="Timed iterations per measurement."),
    warmup: int = typer.Option(3, "--warmup", min=1, help="Untimed iterations before each measurement (at least 1: the first "
                                                          "call of each variant allocates and caches, and would be timed)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    frames: int = typer.Option(8, "--frames", min=1),
    shape: Optional[list[str]] = typer.Option(None, "--shape", help="Head shape WIDTHxLAYERS, repeatable (default: 512x4 and 768x6, the ViT-B/16 and ViT-L/14 heads)."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Append the table to this markdown file (e.g. docs/benchmarks.md)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --output file."),
) -> None:
    """Temporal head alone: MoTE train step vs plain-FFN step, merged eval vs plain eval (B/16 and L/14 shapes)."""
    from ..training.benchmark import HEAD_SHAPES, bench_head, head_shape, render_head_markdown
    from ..utils.io import atomic_write_json

    refuse_existing_output(output, overwrite)
    checked_device(device)
    if markdown is not None:
        refuse_existing_output(markdown, True)  # appended to: it must be a writable file's place
        if markdown.resolve() == output.resolve():  # the table would be appended into the JSON just written
            raise UserError(f"--markdown {markdown} is the --output file; give the markdown table a file of its own")
    shapes = [head_shape(s) for s in shape] if shape else HEAD_SHAPES
    res = bench_head(device=device, steps=steps, warmup=warmup, batch_size=batch_size, frames=frames, shapes=shapes)
    atomic_write_json(output, res, overwrite=overwrite)
    md = render_head_markdown(res)
    _console().print(md, markup=False, highlight=False, soft_wrap=True)  # a markdown table: never wrapped
    if markdown:
        with open(markdown, "a", encoding="utf-8") as f:
            f.write("\n" + md + "\n")


@bench_app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_train_cmd(
    ctx: typer.Context,
    recipe: Path = typer.Argument(..., help="A mote recipe (model, objective, batch size, frames)."),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    steps: int = typer.Option(10, "--steps", min=1),
    warmup: int = typer.Option(3, "--warmup", min=1, help="Untimed steps before each measurement (at least 1: the first "
                                                          "step allocates and caches, and would be timed)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Per-device batch (default: the recipe's total batch)."),
    output: Path = typer.Option(Path("bench_train.json"), "--output"),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="Also time the plain-FFN baseline and report the MoTE overhead."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --output file."),
) -> None:
    """Clips/s of a full training step (visual tower + head + WMR) on synthetic in-memory input; MFU on CUDA."""
    from ..training.benchmark import bench_train, render_train_markdown
    from ..utils.io import atomic_write_json

    refuse_existing_output(output, overwrite)
    cfg = _load_validated(recipe, _checked_overrides(ctx, overrides, recipe))
    if cfg["runner"] != "mote":
        raise UserError(f"{recipe} has runner {cfg['runner']!r}; mergevid bench train times the training step of a mote recipe")
    res = bench_train(cfg, steps=steps, warmup=warmup, batch_size=batch_size, baseline=baseline)
    atomic_write_json(output, res, overwrite=overwrite)
    _console().print(render_train_markdown(res), markup=False, highlight=False, soft_wrap=True)  # a markdown table: never wrapped
