"""``mergevid data ...`` and ``mergevid bench data`` (owned by the data pipeline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..data.watchdog import DEFAULT_READ_TIMEOUT_S
from ..runners.schema import SYNTHETIC
from .errors import UserError, refuse_existing_output
from .main import bench_app, data_app

#: ``mergevid data synth`` writes by default what a recipe's ``data.synthetic: {}`` writes.
_SYN = {key: field.default for key, field in SYNTHETIC.fields.items()}


def _parse_size(text: str) -> tuple[int, int]:
    """'HxW' -> (H, W)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"--size expects HxW such as 64x64, got {text!r}") from None
    return h, w


@data_app.command("synth")
def synth_cmd(
    out_dir: Path = typer.Argument(..., help="Folder to write the dataset into (must be empty or new)."),
    classes: int = typer.Option(_SYN["num_classes"], "--classes", min=2, help="Training classes (at least 2: a classifier of one class learns nothing)."),
    videos_per_class: int = typer.Option(_SYN["videos_per_class"], "--videos-per-class", help="Training videos per class."),
    val_per_class: int = typer.Option(_SYN["val_per_class"], "--val-per-class", help="Validation videos per training class."),
    novel_classes: int = typer.Option(_SYN["num_novel_classes"], "--novel-classes", help="Zero-shot classes (disjoint from training)."),
    frames: int = typer.Option(_SYN["frames"], "--frames", help="Frames per video."),
    size: str = typer.Option("x".join(map(str, _SYN["size"])), "--size", help="Frame size HxW (even numbers)."),
    fps: float = typer.Option(15.0, "--fps", help="Frame rate written in the files."),
    gop: Optional[int] = typer.Option(None, "--gop", help="Keyframe interval (default: x264's 250)."),
    texture: float = typer.Option(0.0, "--texture", help="Panning noise background strength 0..1 (realistic decode cost)."),
    noise: float = typer.Option(0.0, "--noise", help="Per-frame grain standard deviation in pixel levels, 0..64 on the 0-255 scale (camera-like bitrate; the benchmark uses 6)."),
    seed: int = typer.Option(_SYN["seed"], "--seed", help="Random seed."),
    workers: int = typer.Option(1, "--workers", min=1, help="Encoding processes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty folder: its videos/ folder, lists (train.txt, val.txt, novel.txt), class CSVs and settings are REPLACED; other files stay."),
) -> None:
    """Write a small synthetic video dataset (moving coloured shapes, H.264 mp4) with lists and class CSVs."""
    import time

    from ..data.synthetic import write_synthetic_dataset

    t0 = time.perf_counter()
    ds = write_synthetic_dataset(out_dir, num_classes=classes, videos_per_class=videos_per_class, val_per_class=val_per_class,
                                 num_novel_classes=novel_classes, frames=frames, size=_parse_size(size), fps=fps, gop=gop,
                                 texture=texture, noise=noise, seed=seed, workers=workers, overwrite=overwrite)
    typer.echo(f"wrote {ds.root} in {time.perf_counter() - t0:.1f} s")
    for name in ("train_list", "val_list", "class_csv", "novel_list", "novel_class_csv"):
        value = getattr(ds, name)
        if value is not None:
            typer.echo(f"  {name:16s} {value}")


@data_app.command("prepare")
def prepare_cmd(
    list_file: Path = typer.Argument(..., help="Annotation list ('relative/path.mp4 label' per line)."),
    out_dir: Path = typer.Argument(..., help="Output folder for the re-encoded videos, the new list and the report."),
    root: Optional[Path] = typer.Option(None, "--root", help="Dataset root the list's paths are relative to (default: the list's folder)."),
    short_side: int = typer.Option(256, "--short-side", help="Scale the short side down to this many pixels (never up)."),
    gop: int = typer.Option(16, "--gop", help="Keyframe every this many frames."),
    # one name per column: a --fastdecode/--no-fastdecode pair widened the option column until names were cut at 80 columns
    no_fastdecode: bool = typer.Option(False, "--no-fastdecode", help="Encode without x264 tune=fastdecode (on by default)."),
    fastdecode_flag: bool = typer.Option(False, "--fastdecode", hidden=True, help="tune=fastdecode: the default."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Parallel encoders (default: all cores)."),
    list_format: str = typer.Option("video", "--list-format", help="video | frames ('folder num_frames label')."),
    fps: float = typer.Option(30.0, "--fps", help="Frame rate for frame-folder inputs."),
    frame_index_base: int = typer.Option(1, "--frame-index-base", min=0, max=1,
                                         help="Frame folders: the number of the first image (1: img_00001.jpg, or 0)."),
    read_timeout: float = typer.Option(DEFAULT_READ_TIMEOUT_S, "--read-timeout",
                                       help="Seconds a source may take to open or to decode its next frames; past it the video fails as hung and the run goes on."),
) -> None:
    """Re-encode a dataset for fast training: short GOP, fastdecode, smaller short side; resumable."""
    from ..data.prepare import prepare_dataset, refuse_file_as_folder

    if no_fastdecode and fastdecode_flag:
        raise typer.BadParameter("--fastdecode and --no-fastdecode contradict each other: give one")
    fastdecode = not no_fastdecode
    refuse_file_as_folder(out_dir, "OUT_DIR")
    report = prepare_dataset(list_file=list_file, root=root or list_file.parent, out_dir=out_dir, short_side=short_side, gop=gop,
                             fastdecode=fastdecode, workers=workers, list_format=list_format, fps=fps, read_timeout_s=read_timeout,
                             frame_index_base=frame_index_base)
    typer.echo(f"{report.total} videos: {report.encoded} encoded, {report.skipped} already done, {report.failed} failed "
               f"({report.seconds:.1f} s)")
    if report.removed_temps:
        typer.echo(f"removed {report.removed_temps} partial encode{'s' * (report.removed_temps != 1)} left by an interrupted run")
    typer.echo(f"new list: {report.list_file}\nreport:   {report.report_path}")
    if report.failed:
        for f in report.failures[:10]:
            typer.echo(f"  failed: {f['path']}: {f['error']}", err=True)
        raise UserError(f"{report.failed} of {report.total} videos failed; they are listed in {report.report_path} "
                        "and left out of the new list")


@bench_app.command("data")
def bench_data_cmd(
    list_file: Optional[Path] = typer.Option(None, "--list", help="Annotation list to benchmark (default: a synthetic long-GOP set)."),
    root: Optional[Path] = typer.Option(None, "--root", help="Dataset root for --list (default: the list's folder)."),
    workers: int = typer.Option(1, "--workers", min=0, help="DataLoader workers for every pipeline (0: in-process), and encoding processes of its prepare step (at least 1)."),
    output: Path = typer.Option(Path("bench_data.json"), "--output", help="JSON results file."),
    videos: int = typer.Option(24, "--videos", min=1, help="Videos per file set (synthetic, or the first N of --list)."),
    num_frames: int = typer.Option(8, "--num-frames", min=1, help="Frames per clip (T)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Clips per batch."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timed sweeps over the videos per pipeline (medians reported)."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Where the synthetic and prepared sets are kept and reused (default: $MERGEKIT_VIDEO_CACHE, else ~/.cache/mergekit_video, in bench_data/)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --output file."),
) -> None:
    """Clips/s of our train/test pipelines vs a naive per-frame PIL pipeline vs the decode floor."""
    from ..data.bench import format_table, run_data_benchmark
    from ..data.prepare import refuse_file_as_folder

    if root is not None and list_file is None:
        raise UserError("--root is the folder of --list's videos; without --list the benchmark writes its own synthetic set: add --list")
    refuse_existing_output(output, overwrite)
    if work_dir is not None:
        refuse_file_as_folder(work_dir, "--work-dir")
    results = run_data_benchmark(list_file=list_file, root=root, workers=workers, num_videos=videos, num_frames=num_frames,
                                 batch_size=batch_size, repeats=repeats, work_dir=work_dir, output=output, overwrite=overwrite,
                                 log=typer.echo)
    typer.echo(format_table(results))
    typer.echo(f"results: {output}")


_ROOT_HINT = {
    "ucf101": "the UCF-101 folder (it holds ApplyEyeMakeup/, ApplyLipstick/, ...)",
    "hmdb51": "the folder that holds the 51 class folders (brush_hair/, cartwheel/, ...)",
    "ssv2": "the folder that holds the <id>.webm videos",
}


def recipe_snippet(fmt: str, result: Any, *, out: Path, root: Path | None, class_csv: Path) -> str:
    """The recipe sections for converted lists, as YAML (nested keys, paths quoted where needed) to merge into a
    recipe: ``data`` (training) and ``eval.datasets`` with the recipes' views (:data:`~mergekit_video.data.official_lists.EVAL_VIEWS`)
    and names (:func:`~mergekit_video.data.official_lists.eval_dataset_name`). UCF-101 / HMDB-51's numbered splits
    are one zero-shot dataset (mean ± std over them); Kinetics / SSv2 val and test are one close-set dataset each,
    not splits to average."""
    import yaml

    from ..data.official_lists import EVAL_VIEWS, eval_dataset_name

    root_value = str(root.absolute()) if root is not None else f"<{_ROOT_HINT[fmt]}>"
    sections: dict[str, Any] = {}
    if result.train:
        sections["data"] = {"root": root_value, "train_list": str((out / result.train[0]).absolute()),
                            **({"val_list": str((out / result.test[0]).absolute())} if result.test else {}),
                            "class_csv": str(class_csv.absolute())}
    n = len(result.class_names)
    if result.test:
        common = {"root": root_value, "class_csv": str(class_csv.absolute())}
        if fmt in ("ucf101", "hmdb51"):
            entries = [{"name": eval_dataset_name(fmt, result.test[0], n), "kind": "zero_shot", **common,
                        "splits": [{"list": str((out / name).absolute())} for name in result.test], **EVAL_VIEWS[fmt]}]
        else:
            entries = [{"name": eval_dataset_name(fmt, name, n), "kind": "close_set", **common,
                        "list": str((out / name).absolute()), **EVAL_VIEWS[fmt]} for name in result.test]
        sections["eval"] = {"datasets": entries}
    text = yaml.safe_dump(sections, sort_keys=False, default_flow_style=False, allow_unicode=True, width=1 << 16)
    views = {"ucf101": "MoTE's zero-shot views: 3 clips x 1 crop of 8 frames",
             "hmdb51": "MoTE's zero-shot views: 3 clips x 1 crop of 8 frames",
             "kinetics": "MoTE's close-set views: 4 clips x 3 crops",
             "ssv2": "one view, as MoTE's SSv2 (few-shot) protocol"}[fmt]
    kind_note = ("\n# kind: zero_shot is MoTE's protocol for a model trained on other classes (Kinetics); close_set for one\n"
                 "# trained on these; the few-shot recipes (fewshot_*.yaml) take kind: few_shot with num_clips: 1, num_crops: 1"
                 if fmt in ("ucf101", "hmdb51") and result.test else "")
    return ("# recipe sections for these lists (the lists' paths are relative to root): merge them into the recipe's data\n"
            "# and eval sections, in place of its entries of the same name; eval.summary names the datasets to score, so\n"
            f"# keep these names or update it ({views})" + kind_note + "\n" + text.rstrip("\n"))


@data_app.command("lists")
def lists_cmd(
    fmt: str = typer.Argument(..., metavar="FORMAT", help="ucf101 | hmdb51 | kinetics | ssv2."),
    inputs: list[Path] = typer.Argument(..., metavar="INPUTS", help="ucf101: the ucfTrainTestlist/ folder; hmdb51: testTrainMulti_7030_splits/; "
                                        "kinetics: the CSVs (train.csv, validate.csv, ...); ssv2: something-something-v2-labels.json and the train / validation JSON."),
    out: Path = typer.Option(..., "--out", help="Folder for the lists and the class CSV (created if new)."),
    root: Optional[Path] = typer.Option(None, "--root", help="The video folder the lists' paths are relative to (the recipe's root:). Required for kinetics (the files are "
                                        "found there by name); for the others, videos not under it are left out and listed."),
    names: str = typer.Option("words", "--names", help="ucf101 / hmdb51 class names: words ('Apply Eye Makeup', 'brush hair') or raw (the folder names)."),
    classes: Optional[Path] = typer.Option(None, "--classes", help="kinetics: the class CSV to take the ids from (the one written for the train split, when converting val alone)."),
    class_csv: Optional[str] = typer.Option(None, "--class-csv", help="File name of the class CSV written in --out (default: ucf_labels.csv, hmdb51_labels.csv, "
                                            "kinetics_<C>_labels.csv, ssv2_labels.csv)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace lists and class CSVs that exist in --out."),
) -> None:
    """Convert a dataset's official annotation files into annotation lists and a class CSV."""
    from ..data import official_lists as ol
    from ..data.annotations import write_annotation_list, write_class_names
    from ..data.prepare import refuse_file_as_folder
    from ..utils.io import atomic_write_text

    if fmt not in ol.FORMATS:
        raise typer.BadParameter(f"FORMAT must be one of {', '.join(ol.FORMATS)}, got {fmt!r}")
    if names not in ol.NAME_STYLES:
        raise typer.BadParameter(f"--names takes {' or '.join(ol.NAME_STYLES)}, got {names!r}")
    if classes is not None and fmt != "kinetics":
        raise UserError("--classes is for kinetics (its ids come from the labels); the other formats' class ids are fixed")
    if names != "words" and fmt not in ("ucf101", "hmdb51"):
        raise UserError("--names is for ucf101 and hmdb51; Kinetics and SSv2 names are taken as the files give them")
    if fmt in ("ucf101", "hmdb51") and len(inputs) != 1:
        raise UserError(f"{fmt} takes one INPUT, the folder of the official split files; got {len(inputs)}")
    if fmt == "kinetics" and root is None:
        raise UserError("kinetics needs --root, the video folder: the lists name the files found there")
    if class_csv is not None and (not class_csv or Path(class_csv).name != class_csv):
        raise UserError(f"--class-csv is a file name in --out, not a path: {class_csv!r}")
    refuse_file_as_folder(out, "--out")

    if fmt == "ucf101":
        result = ol.ucf101_lists(inputs[0], names=names)
    elif fmt == "hmdb51":
        result = ol.hmdb51_lists(inputs[0], names=names)
    elif fmt == "kinetics":
        result = ol.kinetics_lists(inputs, root=root, classes=classes)
    else:
        result = ol.ssv2_lists(inputs)
    if root is not None and fmt != "kinetics":
        result = ol.drop_missing(result, root)

    csv_path = out / (class_csv or result.class_csv)
    # an earlier conversion's list of missing videos for a list that now has none would be left beside it, wrong
    stale_missing = [p for name in result.lists if name not in result.missing
                     for p in (out / f"{Path(name).stem}_missing.txt", out / f"{Path(name).stem}_missing.csv") if p.is_file()]
    # --classes naming the class CSV this writes (the train split's, in the same --out): it is read, not rewritten
    reuse_classes = classes is not None and csv_path.resolve() == Path(classes).resolve()
    targets = ([out / name for name in result.lists] + ([] if reuse_classes else [csv_path])
               + [out / m.file_name for m in result.missing.values()] + stale_missing)
    given = {p.resolve() for p in inputs if p.is_file()} | ({p.resolve() for p in inputs[0].iterdir()} if fmt in ("ucf101", "hmdb51") and inputs[0].is_dir() else set())
    for target in targets:
        if target.resolve() in given:
            raise UserError(f"{target} is one of the official files being converted; write to another --out")
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
        if target.is_dir():
            raise UserError(f"{target} is a folder; name another --out")
    out.mkdir(parents=True, exist_ok=True)
    for name, records in result.lists.items():
        write_annotation_list(out / name, records, overwrite=overwrite)
    if not reuse_classes:
        write_class_names(csv_path, result.class_names, overwrite=overwrite)
    for m in result.missing.values():
        atomic_write_text(out / m.file_name, "\n".join(m.lines) + "\n", overwrite=overwrite)
    for p in stale_missing:
        p.unlink()
        typer.echo(f"removed {p}: an earlier conversion's missing videos (none are missing now)")

    width = max(len(n) for n in [*result.lists, csv_path.name])
    typer.echo(f"wrote {out}:")
    for name, records in result.lists.items():
        typer.echo(f"  {name:{width}s}  {len(records)} video{'s' * (len(records) != 1)}")
    typer.echo(f"  {csv_path.name:{width}s}  {len(result.class_names)} classes{' (the --classes file, kept)' if reuse_classes else ''}")
    for name, m in result.missing.items():
        typer.echo(f"{name}: {m.count} of {m.total} videos ({m.count / m.total:.1%}) not found under {root}; left out, listed in "
                   f"{out / m.file_name}", err=True)

    typer.echo("\n" + recipe_snippet(fmt, result, out=out, root=root, class_csv=csv_path))
